r"""Where the samples' recall is lost: by how typical each held-out image is.

  python -m experiments.recall_breakdown --pipeline=fashion_mnist_long128 \
    --num_samples=10000 --out=breakdown.json

Improved recall (`metrics.manifolds`, the eval's k) is the share of the
held-out images that fall inside a set's manifold. This splits it, for
three sets scored by the config's ruler (the shipped judge by default)
against the whole held-out split:

* samples: --num_samples of the pipeline's, drawn as `Pipeline.evaluate`
  draws them (the config's seed and controls, or --guidance and
  --temperature);
* reconstructions: the held-out images encoded and decoded;
* train: as many training images as samples (the real-vs-real floor).

Each row gives recall, precision, recall in each quartile of the held-out
images' own k-NN radius among themselves (first: the most typical images,
in dense regions; last: the least typical), recall per class (the images'
true labels), and the set's median k-NN radius over the held-out images'
(below 1: the set is more tightly clustered than the data). --pipeline is
anything `Pipeline.load` takes: a workdir, an exported file, a shipped name.
"""

import functools
import json

from absl import app
from absl import flags
import jax
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run

QUARTILES = 4


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import it beside other experiments)."""
  return {
      'pipeline': flags.DEFINE_string(
          'pipeline', None, 'A workdir, exported file or shipped name.'),
      'num_samples': flags.DEFINE_integer(
          'num_samples', 10_000, 'Samples (and training images of the floor).'),
      'guidance': flags.DEFINE_list(
          'guidance', None, "One scale, or one per level (top first); the "
          "config's when unset."),
      'temperature': flags.DEFINE_float(
          'temperature', None, "The sampler's; the config's when unset."),
      'out': flags.DEFINE_string('out', None, 'Also write the JSON here.'),
  }


def breakdown(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray,
              k: int, num_classes: int) -> dict[str, object]:
  """One row (see the module docstring) of `fake` against `real` features."""
  m = metrics_lib.manifolds(real, fake, k)
  edges = np.quantile(m.real_radii, np.linspace(0, 1, QUARTILES + 1))
  # Quartile i holds the radii in [edges[i], edges[i + 1]), the last closed.
  bins = np.clip(np.searchsorted(edges, m.real_radii, side='right') - 1, 0,
                 QUARTILES - 1)
  return {
      'recall': float(m.real_inside.mean()),
      'precision': float(m.fake_inside.mean()),
      'recall_by_typicality': [float(m.real_inside[bins == i].mean())
                               for i in range(QUARTILES)],
      'radius_quartile_edges': [float(e) for e in edges],
      'recall_by_class': [  # None for a class with no real images.
          float(m.real_inside[real_labels == c].mean())
          if np.any(real_labels == c) else None for c in range(num_classes)],
      'radius_ratio': float(np.median(m.fake_radii) /
                            np.median(m.real_radii)),
  }


def rows(pipe: api.Pipeline, num_samples: int, guidance=None,
         temperature=None) -> dict[str, object]:
  """The three rows of `pipe` (see the module docstring)."""
  config, mesh = pipe.config, pipe.mesh
  features, about = eval_run.feature_fn(config, pipe.workdir, mesh)
  held_out, recon, labels = [], [], []
  for images, batch_labels, _ in eval_run.real_batches(
      config, mesh, config.data.eval_split):
    held_out.append(features(images)[0])
    recon.append(features(np.clip(pipe.reconstruct(images), -1.0, 1.0))[0])
    labels.append(batch_labels)
  train = [features(images)[0] for images, _, _ in eval_run.real_batches(
      config, mesh, config.data.train_split, limit=num_samples)]
  s = config.sampling
  guidance = (builders.sampling_guidance(config) if guidance is None
              else guidance)
  temperature = s.temperature if temperature is None else temperature
  samples, _, _ = eval_run.pipeline_samples(
      pipe, num_samples, features, rng=jax.random.PRNGKey(config.seed),
      temperature=temperature, top_k=s.top_k, top_p=s.top_p,
      guidance=guidance)
  held_out, labels = np.concatenate(held_out), np.concatenate(labels)
  row = functools.partial(breakdown, held_out, labels,
                          k=config.eval.precision_recall_k,
                          num_classes=int(config.data.num_classes))
  return {**about, 'num_samples': num_samples, 'guidance': guidance,
          'temperature': temperature,
          'samples': row(samples.features),
          'reconstructions': row(np.concatenate(recon)),
          'train': row(np.concatenate(train))}


def main(argv, flag_values):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  guidance = f['guidance']
  if guidance is not None:
    guidance = tuple(float(g) for g in guidance)
    guidance = guidance[0] if len(guidance) == 1 else guidance
  result = rows(api.Pipeline.load(f['pipeline']), f['num_samples'],
                guidance=guidance, temperature=f['temperature'])
  text = json.dumps(result, indent=1)
  print(text)
  if f['out']:
    with open(f['out'], 'w') as out:
      out.write(text + '\n')


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline'])
  app.run(functools.partial(main, flag_values=_flags))

r"""Where the samples' recall is lost: by how typical each held-out image is.

  python -m experiments.recall_breakdown --pipeline=fashion_mnist_long128 \
    --num_samples=10000 --out=breakdown.json

Improved recall (`metrics.manifolds`, the eval's k) is the share of the
held-out images that fall inside a set's manifold. This splits it, for
three sets scored by the config's ruler (the shipped judge by default)
against the whole held-out split:

* samples: --num_samples of the pipeline's, drawn as `Pipeline.evaluate`
  draws them (the config's seed and controls, or --guidance,
  --temperature, --contrast and --discount);
* reconstructions: the held-out images encoded and decoded;
* train: as many training images as samples (the real-vs-real floor).

Each row gives recall, precision, recall in each quartile of the held-out
images' own k-NN radius among themselves (first: the most typical images,
in dense regions; last: the least typical), recall per class (the images'
true labels), and the set's median k-NN radius over the held-out images'
(below 1: the set is more tightly clustered than the data).

`bits` scores codes with the priors (with their labels; bits per code of
each level, top first): the held-out images' codes, their mean in each
typicality quartile, and the quantiles of each image's bits per code,
beside the samples' own codes. Samples drawn at the model's own
temperature with no guidance that hold fewer bits than the held-out codes
are simpler than the data, by the priors' own measure.

`copying` asks whether the samples (and the reconstructions) lie nearer
the training images than held-out images do (`metrics.copying`, every
training image the reference): `closer` 0.5 and `near_share` 0.05 are new
data's; a prior that copies its training examples would lift both towards
1 (and its recall towards the floor's, whose images are training images).

`cycle` asks whether stage 1 would give a set's codes back: the share of
each level's codes that decoding the maps and encoding the images returns,
for the held-out images' codes and for the samples'. A prior whose samples
were distributed as the data's codes would match the held-out share.

--grid=PATH also writes a PNG: on the left, held-out images inside the
samples' manifold (covered); on the right, images outside it (missed);
one class a row, the first --grid_per_class of each in the split's order.
--pipeline is anything `Pipeline.load` takes: a workdir, an exported
file, a shipped name. --discount_rule: the discount's rule
(`experiments.discount_rules`: the library's squared rule by default;
stop 53's rows were drawn by `excess`).
"""

import functools
import json

from absl import app
from absl import flags
from experiments import discount_rules
import jax
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import images as images_lib
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run

QUARTILES = 4
BITS_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


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
      'contrast': flags.DEFINE_list(
          'contrast', None, "The sampler's contrast with stage 1's code "
          "frequencies: one value, or one per level (top first); the "
          "config's when unset."),
      'discount': flags.DEFINE_list(
          'discount', None, "The sampler's discount by stage 1's code "
          "frequencies (sampling.discount): one value, or one per level "
          "(top first); the config's when unset."),
      'out': flags.DEFINE_string('out', None, 'Also write the JSON here.'),
      'grid': flags.DEFINE_string(
          'grid', None, 'Also write the covered / missed held-out images '
          'here (PNG).'),
      'grid_per_class': flags.DEFINE_integer(
          'grid_per_class', 8, 'Images of each class on each side of --grid.'),
      'discount_rule': discount_rules.define_flag(),
  }


def typicality(radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(quartile of each k-NN radius, 0 the smallest: the most typical
  images; the QUARTILES + 1 edges)."""
  edges = np.quantile(radii, np.linspace(0, 1, QUARTILES + 1))
  # Quartile i holds the radii in [edges[i], edges[i + 1]), the last closed.
  bins = np.clip(np.searchsorted(edges, radii, side='right') - 1, 0,
                 QUARTILES - 1)
  return bins, edges


def breakdown(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray,
              k: int, num_classes: int) -> dict[str, object]:
  """One row (see the module docstring) of `fake` against `real` features."""
  return manifold_row(metrics_lib.manifolds(real, fake, k), real_labels,
                      num_classes)


def manifold_row(m: metrics_lib.Manifolds, real_labels: np.ndarray,
                 num_classes: int) -> dict[str, object]:
  """`breakdown`'s row from the sets' `metrics.manifolds`."""
  bins, edges = typicality(m.real_radii)
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


def copying_row(train: np.ndarray, held_out: np.ndarray,
                features: np.ndarray) -> dict[str, float]:
  """`metrics.copying`'s figures of `features` (with the quartiles of their
  distance to the nearest training image over the held-out images')."""
  c = metrics_lib.copying(train, held_out, features)
  return {'closer': c.closer, 'near_share': c.near_share,
          'distance_ratio': c.distance_ratio,
          'distance_quartiles_ratio': [
              float(a / b) for a, b in zip(
                  np.quantile(c.distances, (0.25, 0.5, 0.75)),
                  np.quantile(c.held_out_distances, (0.25, 0.5, 0.75)))]}


def cycle_agreement(pipe: api.Pipeline, codes: list[np.ndarray],
                    batch_size: int = 1000) -> list[float]:
  """Per level, the share of `codes` (top first, [n, h, w] each) that
  encode(decode(codes)) returns."""
  same = np.zeros(len(codes))
  for i in range(0, len(codes[0]), batch_size):
    batch = [c[i:i + batch_size] for c in codes]
    again = pipe.encode(np.clip(pipe.decode(batch), -1.0, 1.0))
    same += [np.sum(a == b) for a, b in zip(again, batch)]
  return [float(s / c.size) for s, c in zip(same, codes)]


def bits_per_code(pipe: api.Pipeline, codes: list[np.ndarray],
                  labels: np.ndarray | None, batch_size: int = 1000
                  ) -> np.ndarray:
  """[levels, n] bits per code of each map under the priors."""
  n = len(codes[0])
  bits = np.concatenate([pipe.log_prob_codes(
      [c[i:i + batch_size] for c in codes],
      None if labels is None else labels[i:i + batch_size])
                         for i in range(0, n, batch_size)], axis=1)
  return bits / np.array([h * w for h, w in pipe.level_shapes])[:, None]


def bits_summary(bits: np.ndarray,
                 bins: np.ndarray | None = None) -> dict[str, object]:
  """Per level: the mean bits per code, the quantiles (BITS_QUANTILES) of
  each map's, and (given typicality `bins` of the maps) each quartile's
  mean."""
  out = {'per_code': [float(b.mean()) for b in bits],
         'quantiles': [[float(q) for q in np.quantile(b, BITS_QUANTILES)]
                       for b in bits]}
  if bins is not None:
    out['by_typicality'] = [[float(b[bins == i].mean())
                             for i in range(QUARTILES)] for b in bits]
  return out


def covered_and_missed(images: np.ndarray, labels: np.ndarray,
                       inside: np.ndarray, num_classes: int, per_class: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Two grids' images, one class a row of `per_class` (the first of the
  class, in order): those `inside` (covered), those not (missed). A row
  with too few images is filled with blank (-1) ones."""
  blank = np.full((per_class, *images.shape[1:]), -1.0, np.float32)

  def row(mask):
    chosen = images[np.flatnonzero(mask)[:per_class]]
    return np.concatenate([chosen, blank[len(chosen):]])

  covered = [row((labels == c) & inside) for c in range(num_classes)]
  missed = [row((labels == c) & ~inside) for c in range(num_classes)]
  return np.concatenate(covered), np.concatenate(missed)


def rows(pipe: api.Pipeline, num_samples: int, guidance=None,
         temperature=None, grid: str | None = None,
         grid_per_class: int = 8, contrast=None,
         discount=None) -> dict[str, object]:
  """The three rows of `pipe` (see the module docstring); `grid`: also
  write the covered / missed held-out images there (PNG)."""
  config, mesh = pipe.config, pipe.mesh
  features, about = eval_run.feature_fn(config, pipe.workdir, mesh)
  held_out, recon, labels, codes, pictures = [], [], [], [], []
  for images, batch_labels, _ in eval_run.real_batches(
      config, mesh, config.data.eval_split):
    if grid:
      pictures.append(images)
    held_out.append(features(images)[0])
    codes.append(pipe.encode(images))
    recon.append(features(np.clip(pipe.decode(codes[-1]), -1.0, 1.0))[0])
    labels.append(batch_labels)
  train = np.concatenate([features(images)[0] for images, _, _ in
                          eval_run.real_batches(config, mesh,
                                                config.data.train_split)])
  s = config.sampling
  guidance = (builders.sampling_guidance(config) if guidance is None
              else guidance)
  temperature = s.temperature if temperature is None else temperature
  contrast = (builders.sampling_contrast(config) if contrast is None
              else contrast)
  discount = (builders.sampling_discount(config) if discount is None
              else discount)
  samples, sample_labels, sample_codes = eval_run.pipeline_samples(
      pipe, num_samples, features, rng=jax.random.PRNGKey(config.seed),
      temperature=temperature, top_k=s.top_k, top_p=s.top_p,
      guidance=guidance, contrast=contrast, discount=discount)
  held_out, labels = np.concatenate(held_out), np.concatenate(labels)
  recon = np.concatenate(recon)
  k = config.eval.precision_recall_k
  num_classes = int(config.data.num_classes)
  row = functools.partial(breakdown, held_out, labels, k=k,
                          num_classes=num_classes)
  # The samples' manifolds serve their row, the held-out images'
  # typicality (their radii among themselves) and the grid.
  sampled = metrics_lib.manifolds(held_out, samples.features, k)
  bins, _ = typicality(sampled.real_radii)
  held_out_codes = [np.concatenate(c) for c in zip(*codes)]
  held_out_bits = bits_per_code(pipe, held_out_codes,
                                None if sample_labels is None else labels)
  if grid:
    covered, missed = covered_and_missed(
        np.concatenate(pictures), labels, sampled.real_inside,
        max(num_classes, 1), grid_per_class)
    images_lib.write_side_by_side(
        grid, images_lib.image_grid(covered, grid_per_class),
        images_lib.image_grid(missed, grid_per_class))
  return {**about, 'num_samples': num_samples, 'guidance': guidance,
          'temperature': temperature, 'contrast': contrast,
          'discount': discount,
          'samples': manifold_row(sampled, labels, num_classes),
          'reconstructions': row(recon),
          'train': row(train[:num_samples]),
          'copying': {'train_images': len(train),
                      'samples': copying_row(train, held_out,
                                             samples.features),
                      'reconstructions': copying_row(train, held_out, recon)},
          'cycle': {'held_out': cycle_agreement(pipe, held_out_codes),
                    'samples': cycle_agreement(pipe, sample_codes)},
          'bits': {'held_out': bits_summary(held_out_bits, bins),
                   'samples': bits_summary(bits_per_code(
                       pipe, sample_codes, sample_labels))}}


def main(argv, flag_values):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  guidance = f['guidance']
  if guidance is not None:
    guidance = tuple(float(g) for g in guidance)
    guidance = guidance[0] if len(guidance) == 1 else guidance
  contrast, discount = (
      None if f[name] is None else tuple(float(c) for c in f[name])
      for name in ('contrast', 'discount'))
  pipe = api.Pipeline.load(f['pipeline'])
  with discount_rules.discount_rule(pipe, f['discount_rule']):
    result = rows(pipe, f['num_samples'], guidance=guidance,
                  temperature=f['temperature'], grid=f['grid'],
                  grid_per_class=f['grid_per_class'], contrast=contrast,
                  discount=discount)
  result['discount_rule'] = f['discount_rule']
  text = json.dumps(result, indent=1)
  print(text)
  if f['out']:
    with open(f['out'], 'w') as out:
      out.write(text + '\n')


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline'])
  app.run(functools.partial(main, flag_values=_flags))

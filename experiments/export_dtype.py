r"""What storing the priors' weights in float16 changes, on a workdir.

Exports the workdir's pipeline twice (`Pipeline.export`, prior_dtype
'float32' and 'float16') into a temporary directory, loads each file back
and prints, per file: its size; the priors' held-out bits per code (the
whole held-out split, encoded by the same VQ-VAE); and --num_samples
class-balanced samples drawn as --mode=sample draws them (the config's
seed, batch size, controls, guidance, contrast and discount), scored as
--mode=eval scores them against the held-out split (the config's ruler:
FID, precision, recall, class agreement, IS), with the share of samples
whose codes equal the float32 file's at every level. Rows are printed as
they finish and written to --out.

  python -m experiments.export_dtype --config=configs/fashion_mnist.py:long \
    --workdir=W --num_samples=10000 --out=export_dtype.json
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import prior_attribution
from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import `compare` beside other experiments)."""
  config = config_flags.DEFINE_config_file('config', None, 'Config file.')
  workdir = flags.DEFINE_string('workdir', None,
                                'A workdir with stage 1 and every prior.')
  num_samples = flags.DEFINE_integer(
      'num_samples', 1000, 'Class-balanced samples drawn from each file.')
  limit = flags.DEFINE_integer(
      'limit', 0, 'Held-out images scored (the first ones); 0: all.')
  out = flags.DEFINE_string('out', None, 'JSON file of the rows.')
  flags.mark_flags_as_required(['config', 'workdir'])
  return config, workdir, num_samples, limit, out


def compare(config, workdir: str, num_samples: int, limit: int | None,
            print_row=print) -> dict:
  """The rows of each stored dtype (see the module docstring)."""
  pipe = api.Pipeline.load(workdir, config, require_priors=True)
  config, mesh = pipe.config, pipe.mesh
  features, about = eval_run.feature_fn(config, workdir, mesh)
  images, codes, held_out_labels = prior_attribution.held_out_codes(
      pipe, mesh, limit)
  real = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  real.add(*features(images))
  positions = [c[0].size for c in codes]
  num_classes = int(config.data.num_classes)
  s = config.sampling
  rows, reference = [], None
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in builders.EXPORT_DTYPES:
      path = os.path.join(tmp, f'{dtype}.msgpack')
      pipe.export(path, prior_dtype=dtype)
      loaded = api.Pipeline.load(path)
      start = time.time()
      batch = int(config.prior.eval_batch_size)  # Bounded memory.
      bits = np.concatenate([
          loaded.log_prob_codes([c[i:i + batch] for c in codes],
                                held_out_labels[i:i + batch]
                                if num_classes else None)
          for i in range(0, len(held_out_labels), batch)], axis=1)
      fake, sample_labels, sampled = eval_run.pipeline_samples(
          loaded, num_samples, features, rng=jax.random.PRNGKey(config.seed),
          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
          guidance=builders.sampling_guidance(config),
          contrast=builders.sampling_contrast(config),
          discount=builders.sampling_discount(config))
      if reference is None:
        reference = sampled
      same = [np.all(a == b, axis=(1, 2)) for a, b in zip(sampled, reference)]
      row = {'dtype': dtype, 'megabytes': os.path.getsize(path) / 1e6,
             'held_out_bits_per_code': [
                 float(b.mean() / p) for b, p in zip(bits, positions)],
             **eval_run.sample_metrics(config, real, fake, sample_labels),
             'samples_equal': float(np.mean(np.all(same, axis=0))),
             'samples_equal_per_level': [float(x.mean()) for x in same],
             'seconds': time.time() - start}
      rows.append(row)
      print_row(row)
  return {'workdir': workdir, 'steps': pipe.steps, **about,
          'held_out_examples': len(held_out_labels),
          'guidance': builders.sampling_guidance(config),
          'contrast': builders.sampling_contrast(config),
          'discount': builders.sampling_discount(config), 'rows': rows}


def _print(row):
  bits = ' / '.join(f'{b:.5f}' for b in row['held_out_bits_per_code'])
  per_level = ' / '.join(f'{x:.1%}' for x in row['samples_equal_per_level'])
  agreement = row.get('class_agreement')  # Unconditional: none.
  print(f'| {row["dtype"]} | {row["megabytes"]:.1f} | {bits} | '
        f'{"-" if agreement is None else f"{agreement:.2%}"} | '
        f'{row["precision"]:.4f} | '
        f'{row["recall"]:.4f} | {row["fid"]:.4f} | '
        f'{row["inception_score"]:.3f} | {row["samples_equal"]:.1%} '
        f'({per_level}) |', flush=True)


def main(flag_values):
  config, workdir, num_samples, limit, out = flag_values
  print('| stored priors | MB | held-out bits per code (top first) | class '
        'agr. | precision | recall | FID | IS | samples equal to float32\'s '
        '(per level) |\n|---|---|---|---|---|---|---|---|---|', flush=True)
  result = compare(config.value, workdir.value, num_samples.value,
                   limit.value or None, _print)
  if out.value:
    files.atomic_write(out.value, lambda f: f.write(
        json.dumps(result, indent=1).encode()))


if __name__ == '__main__':
  _flags = _define_flags()
  app.run(lambda argv: main(_flags))

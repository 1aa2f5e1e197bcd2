r"""Bottom priors below `:long`'s stage 1 and top prior, trained and measured
on an accelerator image that has JAX and not TensorFlow (docs/results.md,
"Where recall stands": the bottom prior is where recall is lost, and a
wider prior trained for longer takes hours on a 2-core CPU).

Here, where the data can be read, once:

  python -m experiments.bottom_study --prepare --bundle=workdir_bottom

writes BUNDLE/base, a workdir holding the shipped `fashion_mnist_long128`
file's stage 1 as its checkpoint and the codes of every image (docs/usage.md,
"Stages from an exported file"), and BUNDLE/real.npz, the judge's outputs
for the held-out split and 10,000 training images
(`Pipeline.write_real_features`): 28.4 MB, 70 s here. On the device (carry
BUNDLE, and an ml_collections wheel in .whl/: experiments/gpu_session.sh's
part `bottom`; the file's top prior is read from the package there):

  python -m experiments.bottom_study --bundle=workdir_bottom --out=OUT \
    --variants=shipped,256x32000,512x32000

Each variant is a row: 'shipped' evaluates the file's own bottom prior
(128 channels, 16,000 steps); WIDTHxSTEPS[xLAYERS][wPOWER] trains a bottom
prior of that width, steps, gated layers and loss weight
(`prior.code_weight`, none without `w`) with `--mode=prior
--config.prior.level=1`, in a copy of BUNDLE/base under OUT whose top prior
comes from the file (as `--config.prior.from_export` writes it), then
evaluates it. Every evaluation is
`Pipeline.evaluate(--num_samples, real_features=BUNDLE/real.npz)` at the
config's settings (`:long`'s guidance and discount), so rows are comparable
with each other and with the eval's figures at the same sample count. A row
is printed and written to OUT/bottom_study.json as it finishes; rows already
there at the same --num_samples are not run again, and a variant killed
while training resumes from its last checkpoint.

What travels to a lent device is the working tree (tracked files, and what
a call carries) up to 64 MiB, and the tracked tree alone is 57.8 MiB, 53.6
of them the three shipped files. This study reads one of them, so for its
call take the other two out of the tree, and put them back after it:

  P=vqvae2_jax/pretrained; mkdir -p /tmp/held
  git rm -q --cached $P/fashion_mnist.msgpack $P/fashion_mnist_long.msgpack
  mv $P/fashion_mnist.msgpack $P/fashion_mnist_long.msgpack /tmp/held/
  # the device call: bash experiments/gpu_session.sh OUT bottom, carrying
  # workdir_bottom and .whl
  mv /tmp/held/*.msgpack $P/ && git reset -q -- $P

The tree is then 20.5 MiB, with the bundle (27.1 MiB) 47.6 MiB.
"""

import functools
import os
import shutil
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import stages
from vqvae2_jax import workdir as workdir_lib

SHIPPED = 'fashion_mnist_long128'


def _define_flags():
  flags.DEFINE_string('bundle', 'workdir_bottom', 'The directory --prepare '
                      'writes: base/ (a workdir) and real.npz.')
  flags.DEFINE_bool('prepare', False, 'Write the bundle (needs TensorFlow and '
                    'the data), then stop.')
  flags.DEFINE_string('pipeline', SHIPPED, 'The exported file or shipped '
                      'name whose stage 1 and top prior the base holds.')
  flags.DEFINE_list('variants', ['shipped', '256x32000', '512x32000'],
                    "Rows: 'shipped' (the file's own priors) or "
                    'WIDTHxSTEPS[xLAYERS][wPOWER].')
  flags.DEFINE_integer('num_samples', 10000, 'Samples per row (and floor '
                       'images written by --prepare).')
  flags.DEFINE_string('out', '', 'Where variants train and the JSON goes.')
  return flags.FLAGS


def parse_variant(spec: str) -> dict[str, Any] | None:
  """'256x16000' -> {'width': 256, 'steps': 16000}, 'x8' adds 'layers',
  'w0.75' at the end 'code_weight' (`prior.code_weight` of the bottom
  level); 'shipped' -> None."""
  if spec == 'shipped':
    return None
  sizes, weighed, weight = spec.partition('w')
  try:
    values = [int(p) for p in sizes.split('x')]
    power = float(weight) if weighed else 0.0
  except ValueError:
    values, power = [], 0.0
  if len(values) not in (2, 3) or min(values) < 1 or not power >= 0:
    raise app.UsageError(
        f'Variant {spec!r}: write shipped or WIDTHxSTEPS[xLAYERS][wPOWER], '
        'positive integers and a power >= 0, e.g. 256x16000, 96x16000x12 or '
        '128x16000w0.75.')
  variant = dict(zip(('width', 'steps', 'layers'), values))
  if weighed:
    variant['code_weight'] = power
  return variant


def base_config(config: ml_collections.ConfigDict, pipeline: str
                ) -> ml_collections.ConfigDict:
  """`config` with stage 1 and the priors taken from the file `pipeline`."""
  config = config.copy_and_resolve_references()
  config.vqvae_train.from_export = pipeline
  config.prior.from_export = pipeline
  return config


def prepare(config: ml_collections.ConfigDict, pipeline: str, bundle: str,
            num_floor: int, report=print) -> dict[str, Any]:
  """Writes BUNDLE/base (stage 1 from `pipeline`, and the codes: what
  needs the images) and BUNDLE/real.npz. Each stage resumes or skips as the
  CLI's do."""
  base = os.path.join(bundle, 'base')
  config = base_config(config, pipeline)
  for mode in ('vqvae', 'codes'):
    report(f'prepare: --mode={mode} in {base}')
    stages.run(mode, config, base)
  real = os.path.join(bundle, 'real.npz')
  report(f'prepare: the judge\'s features of the real images -> {real}')
  header = api.Pipeline.load(pipeline).write_real_features(real, num_floor)
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(bundle) for f in fs)
  report(f'prepare: {bundle} holds {files.size_text(size)}; carry it')
  return header


def variant_config(config: ml_collections.ConfigDict,
                   variant: dict[str, int]) -> ml_collections.ConfigDict:
  """`config` training only the bottom prior, at the variant's sizes."""
  config = config.copy_and_resolve_references()
  last = builders.num_levels(config) - 1
  config.prior.level = last
  level = config.prior[f'level_{last}']
  level.num_channels = variant['width']
  if 'layers' in variant:
    level.num_layers = variant['layers']
  config.prior.num_train_steps = variant['steps']
  if 'code_weight' in variant:
    config.prior.code_weight = (0.0,) * last + (variant['code_weight'],)
  return config


def train_variant(config: ml_collections.ConfigDict, pipeline: str,
                  bundle: str, out: str, name: str, variant: dict[str, int]
                  ) -> tuple[str, dict]:
  """(the variant's workdir, what its training took): a copy of the base's
  stage 1 and codes, the priors above the bottom from `pipeline`, its
  bottom prior trained (or resumed)."""
  workdir = os.path.join(out, name)
  base = workdir_lib.Workdir(os.path.join(bundle, 'base'))
  for source in (base.vqvae, base.codes):
    target = os.path.join(workdir, os.path.relpath(source, base.root))
    if not os.path.exists(target):  # Whole or not at all: copied, renamed.
      partial = target + '.partial'
      shutil.rmtree(partial, ignore_errors=True)
      shutil.copytree(source, partial)
      os.replace(partial, target)
  run = variant_config(config, variant)
  for level in range(run.prior.level):
    above = base_config(config, pipeline)
    above.prior.level = level
    stages.run('prior', above, workdir)
  start = time.time()
  stages.run('prior', run, workdir)
  seconds = time.time() - start
  level = run.prior.level
  metrics = files.read_json(workdir_lib.metrics_json(
      workdir_lib.Workdir(workdir).prior(level))) or {}
  return workdir, {
      # The stage's wall time, its evaluations included; steps_per_sec is
      # the training steps' alone (compilation included).
      'train_s': seconds, 'steps_per_sec': metrics.get('steps_per_sec'),
      'steps': variant['steps'],
      'held_out_bits': metrics.get('eval/bits_per_code'),
      'train_bits': metrics.get('eval_train/bits_per_code'),
      'params': metrics.get('num_params')}


def evaluate_row(pipeline: Any, real: str, num_samples: int) -> dict:
  """The sample figures of a loaded pipeline at its config's settings."""
  got = pipeline.evaluate(num_samples, real_features=real)
  keys = ('fid', 'precision', 'recall', 'class_agreement', 'inception_score',
          'num_examples', 'guidance', 'discount')
  return {**{k: got['samples'].get(k) for k in keys},
          'floor_recall': got['real_vs_real']['recall'],
          'eval_s': got['seconds']}


def run_rows(config: ml_collections.ConfigDict, pipeline: str, bundle: str,
             out: str, variants: list[str], num_samples: int,
             report=print) -> dict[str, Any]:
  """Every variant's row, in order, each written to OUT/bottom_study.json
  as it finishes; those already there at `num_samples` are kept, not run
  again (one of another count is evaluated again; its training resumes)."""
  parsed = [(name, parse_variant(name)) for name in variants]
  real = os.path.join(bundle, 'real.npz')
  if not os.path.isfile(os.path.join(bundle, 'base', 'config.json')):
    raise app.UsageError(
        f'No bundle at {bundle}. Fix: write it where the data can be read '
        '(python -m experiments.bottom_study --prepare --bundle=...) and '
        'carry it here.')
  path = os.path.join(out, 'bottom_study.json')
  results = files.read_json(path) or {'rows': {}}
  results.update(num_samples=num_samples, pipeline=pipeline)
  for name, variant in parsed:
    done = results['rows'].get(name)
    if done and done['num_examples'] == num_samples:
      report(f'{name}: already in {path}')
      continue
    if variant is None:
      row = {'train_s': 0.0}
      pipe = api.Pipeline.load(pipeline)
    else:
      workdir, row = train_variant(config, pipeline, bundle, out, name,
                                   variant)
      pipe = api.Pipeline.load(workdir)
    row.update(evaluate_row(pipe, real, num_samples))
    results['rows'][name] = row
    files.write_json(path, results)
    report(row_line(name, row))
  return results


def row_line(name: str, row: dict) -> str:
  """One printed line a row."""
  bits = row.get('held_out_bits')
  return (f'| {name} | {"" if bits is None else f"{bits:.3f}"} | '
          f'{row["class_agreement"]:.2%} | {row["precision"]:.3f} | '
          f'{row["recall"]:.3f} | {row["fid"]:.3f} | '
          f'{row["inception_score"]:.2f} | {row["train_s"]:.0f} s'
          + (f' ({row["steps_per_sec"]:.1f} steps/s)'
             if row.get('steps_per_sec') else '') + ' |')


def main(argv, flag_values):
  del argv
  f = {k: flag_values[k].value for k in ('bundle', 'prepare', 'pipeline',
                                         'variants', 'num_samples', 'out')}
  config = flag_values['config'].value
  if f['prepare']:
    prepare(config, f['pipeline'], f['bundle'], f['num_samples'])
    return
  for name in f['variants']:
    parse_variant(name)  # Refused before anything runs.
  if not f['out']:
    raise app.UsageError('--out is required without --prepare.')
  print('| variant | held-out bits | class agr. | precision | recall | FID | '
        'IS | its stage (training, evaluation of bits) |', flush=True)
  run_rows(config, f['pipeline'], f['bundle'], f['out'], f['variants'],
           f['num_samples'], report=functools.partial(print, flush=True))


if __name__ == '__main__':
  _flags = _define_flags()
  config_flags.DEFINE_config_file(
      'config', 'configs/fashion_mnist.py:long', 'The config of the base '
      'workdir and the variants (--config.x=y overrides).')
  app.run(functools.partial(main, flag_values=_flags))

r"""Gated PixelCNN against causal transformer priors, on the same codes.

  python -m experiments.prior_families --base_workdir=workdir/fashion_mnist \
    --out=/tmp/prior_families --seconds=120 --num_samples=1000
  python -m experiments.prior_families --smoke --out=/tmp/families_smoke

Both families train on the SAME extracted codes: the stage-1 VQ-VAE and codes
of --base_workdir (made there first when missing; otherwise only read),
linked into <out>/<family>/ as `prior_scaling` does. The PixelCNN is the
recipe of --config; the transformer of each level gets the width that
brings its parameter count nearest the PixelCNN's of that level
(--transformer_layers blocks, the PixelCNN's heads, MLP ratio 4), so the
comparison is per parameter.

Equal wall clock: before training, each level's jitted train step is timed
on a batch of the level's shape (after its compilation), and the level trains
for --seconds / (seconds per step) steps, its schedule (warm-up, cosine
decay) fitted to those steps. The budget is the train steps' time; start-up,
compilation and the held-out evaluation come on top and are reported apart.

A row per family and level: parameters, steps, train codes/s (timed step),
held-out bits per code (Polyak weights, with labels), cached sampling seconds
per map at batch 1 and 16 (`sampling.sample_level` after compilation, the
step timer's barely trained weights: the time does not depend on their
values); and,
with --num_samples > 0, --mode=eval's sample metrics (the config's ruler).

Writes <out>/prior_families.json, .md (the table) and .png (held-out bits
per code of each level, both families). The figures depend on what else the
machine runs: compare rows of one run.
"""

import functools
import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np

from experiments import prior_scaling
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax import stages
from vqvae2_jax.train import prior_trainer

# The families --families may name: 'transformer_cross' is the transformer
# whose lower levels cross-attend to the upper codes (cond_mode 'cross')
# instead of adding them to the inputs.
FAMILIES = ('pixelcnn', 'transformer', 'transformer_cross')


def _define_flags():
  """This script's flags (defined only when it runs)."""
  return (
      config_flags.DEFINE_config_file(
          'config', 'configs/fashion_mnist.py', 'The recipe (PixelCNN sizes).'),
      flags.DEFINE_string('base_workdir', None,
                          'Workdir whose VQ-VAE and codes both families use '
                          '(made when missing; --smoke: <out>/base).'),
      flags.DEFINE_string('out', None, "Directory of the families' workdirs "
                          'and tables.'),
      flags.DEFINE_float('seconds', 120.0,
                         'Train-step seconds per family and level.'),
      flags.DEFINE_integer('transformer_layers', 4, 'Transformer blocks.'),
      flags.DEFINE_integer('num_samples', 0,
                           '--mode=eval samples per family; 0 skips eval.'),
      flags.DEFINE_list('levels', None,
                        'Levels to train and measure (default: every one).'),
      flags.DEFINE_list('sampling_batches', ['1', '16'],
                        'Batch sizes of the sampling-time rows.'),
      flags.DEFINE_bool('smoke', False,
                        'fashion_mnist.py:tiny on a few images, a second per '
                        'level: checks that the script runs.'),
      flags.DEFINE_list('families', ['pixelcnn', 'transformer'],
                        f'Families to train, in order: of {FAMILIES}.'),
  )


def num_params(model: Any, level: int, shapes: list[tuple[int, int]],
               num_classes: int) -> int:
  """Parameters of `model` as level `level`'s prior (no compilation)."""
  codes, cond, labels = builders.prior_init_inputs(level, shapes, num_classes)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), codes, cond_codes=cond, labels=labels, train=False))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables))


def transformer_config(config: ml_collections.ConfigDict, layers: int,
                       cond_mode: str = 'add') -> ml_collections.ConfigDict:
  """`config` with a transformer on every level, each as wide as makes its
  parameter count nearest the PixelCNN's of that level; `cond_mode` for the
  lower levels."""
  out = config.copy_and_resolve_references()
  shapes = builders.level_shapes(config)
  classes = int(config.data.num_classes)
  for level in range(builders.num_levels(config)):
    section = out.prior[f'level_{level}']
    target = num_params(builders.build_prior(config, level), level, shapes,
                        classes)
    heads = int(section.num_heads)
    section.kind = 'transformer'
    section.num_layers = layers
    if level:
      section.cond_mode = cond_mode
    best = None
    for width in range(heads, 1025, heads):
      section.num_channels = width
      n = num_params(builders.build_prior(out, level), level, shapes, classes)
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (width, n)
      if n > target:
        break
    section.num_channels = best[0]
  return out


def _batch(config: ml_collections.ConfigDict, level: int) -> dict[str, Any]:
  """A random global batch of level `level`'s training input."""
  rng = np.random.default_rng(0)
  k, b = int(config.model.num_embeddings), int(config.prior.batch_size)
  shapes = builders.level_shapes(config)[:level + 1]
  batch = {'codes': [rng.integers(0, k, (b, *s), dtype=np.int32)
                     for s in shapes]}
  batch['label'] = rng.integers(0, max(int(config.data.num_classes), 1), b,
                                dtype=np.int32)
  return batch


def step_seconds(config: ml_collections.ConfigDict, level: int,
                 steps: int = 10) -> tuple[float, Any]:
  """Seconds of one compiled train step of level `level`'s prior.

  Returns:
    (seconds, the timed steps' variables on the default device): weights of
    the prior's shapes for `sampling_seconds`, whose time does not depend on
    their values (one init fewer to compile).
  """
  mesh = parallel.create_mesh(config.mesh)
  progs = prior_trainer.programs(config, level, mesh)
  state = progs.init(jax.random.PRNGKey(0))
  batch = parallel.shard_batch(_batch(config, level), mesh)
  state, metrics = progs.train_step(state, batch)  # Compiles.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = progs.train_step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  # Off the mesh's devices: the sampler runs on one, as --mode=sample's.
  variables = jax.device_put(jax.device_get(
      {'params': state.params, **state.extra}))
  return seconds, variables


def sampling_seconds(config: ml_collections.ConfigDict, level: int,
                     batch: int, variables: Any) -> float:
  """Seconds per map of the cached sampler of level `level` at `batch`.

  `variables`: the prior's (`step_seconds`'): random or barely trained
  weights time the same as trained ones.
  """
  model = builders.build_prior(config, level)
  shapes = builders.level_shapes(config)
  classes = int(config.data.num_classes)
  cond = tuple(jnp.zeros((batch, *s), jnp.int32) for s in shapes[:level])
  labels = jnp.zeros((batch,), jnp.int32) if classes else None
  kwargs = dict(shape=(batch, *shapes[level]), cond_codes=cond, labels=labels)
  sampling.compile_sampler(model, variables, **kwargs)
  start = time.perf_counter()
  jax.block_until_ready(sampling.sample_level(
      model, variables, rng=jax.random.key(1), **kwargs))
  return (time.perf_counter() - start) / batch


def run_family(config: ml_collections.ConfigDict, base: str, workdir: str,
               seconds: float, num_samples: int, sampling_batches: list[int],
               levels_to_run: list[int]) -> dict[str, Any]:
  """Trains each level for `seconds` of train steps, then measures it."""
  prior_scaling.link_stages(base, workdir)
  levels = {}
  for level in levels_to_run:
    per_step, variables = step_seconds(config, level)
    steps = max(2, int(seconds / per_step))
    run = config.copy_and_resolve_references()
    p = run.prior
    p.level = level
    p.num_train_steps = steps
    p.warmup_steps = min(p.warmup_steps, steps // 10)
    p.eval_every = p.checkpoint_every = steps
    p.log_every = max(1, min(p.log_every, steps))
    start = time.time()
    result = stages.run('prior', run, workdir)['prior'][f'level_{level}']
    codes = math.prod(builders.level_shapes(config)[level])
    levels[f'level_{level}'] = {
        'num_params': result['num_params'], 'steps': steps,
        'step_seconds': per_step,
        'train_codes_per_sec': p.batch_size * codes / per_step,
        'wall_seconds': time.time() - start,
        'held_out': result['eval/bits_per_code'],
        'train': result['eval_train/bits_per_code'],
        'sampling_seconds_per_map': {
            str(b): sampling_seconds(config, level, b, variables)
            for b in sampling_batches},
    }
  row = {'levels': levels}
  if num_samples:
    eval_config = config.copy_and_resolve_references()
    eval_config.eval.num_samples = num_samples
    eval_config.eval.cas = False
    eval_config.sampling.rejection_keep = 1.0
    eval_config.sampling.guidance = 1.0  # The model as trained.
    eval_config.sampling.guidance_per_level = ()
    report = stages.run('eval', eval_config, workdir)['eval']
    row['samples'] = {k: report['samples'].get(k) for k in (
        'num_examples', 'class_agreement', 'precision', 'recall', 'fid',
        'inception_score')}
    row['ruler'] = report.get('judge') or report.get('features')
  return row


def format_table(rows: dict[str, Any]) -> str:
  """Markdown: one line per family and level."""
  batches = sorted({b for r in rows.values() for l in r['levels'].values()
                    for b in l['sampling_seconds_per_map']}, key=int)
  head = (['family', 'level', 'params', 'steps', 'train codes/s',
           'held-out bits/code', 'train bits/code'] +
          [f's/map (batch {b})' for b in batches])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for family, r in rows.items():
    for level, l in sorted(r['levels'].items()):
      lines.append('| ' + ' | '.join(
          [family, level[len('level_'):], f'{l["num_params"]:,}',
           str(l['steps']), f'{l["train_codes_per_sec"]:,.0f}',
           f'{l["held_out"]:.4f}', f'{l["train"]:.4f}'] +
          [f'{l["sampling_seconds_per_map"][b]:.4f}' for b in batches]) +
                   ' |')
  sampled = {f: r for f, r in rows.items() if 'samples' in r}
  if sampled:
    lines += ['', '| family | samples | class agr. | precision | recall | '
              'FID | IS |', '|---|---|---|---|---|---|---|']
    for family, r in sampled.items():
      s = r['samples']
      agreement = s.get('class_agreement')
      lines.append(
          f'| {family} | {s["num_examples"]} | '
          f'{"-" if agreement is None else f"{100 * agreement:.1f}%"} | '
          f'{s["precision"]:.3f} | {s["recall"]:.3f} | {s["fid"]:.3f} | '
          f'{s["inception_score"]:.2f} |')
  return '\n'.join(lines) + '\n'


def plot(rows: dict[str, Any], path: str) -> None:
  """Held-out bits per code of each level: a bar per family."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  w, h, m = 560, 360, 50
  image = Image.new('RGB', (w, h), 'white')
  draw = ImageDraw.Draw(image)
  levels = sorted({l for r in rows.values() for l in r['levels']})
  values = [r['levels'][l]['held_out'] for r in rows.values() for l in levels]
  top = max(values + [1e-9]) * 1.15
  colours = {'pixelcnn': (200, 30, 30), 'transformer': (30, 90, 200),
             'transformer_cross': (30, 160, 60)}
  draw.text((m, 8), 'held-out bits per code at equal train seconds '
            '(red: PixelCNN, blue: transformer, green: cross-attention)',
            fill='black')
  draw.line([m, h - m, w - 10, h - m], fill='black')
  slot = (w - m - 10) / max(len(levels), 1)
  bar = slot / (len(rows) + 1)
  for i, level in enumerate(levels):
    draw.text((m + i * slot + bar / 2, h - m + 6), level, fill='black')
    for j, (family, r) in enumerate(rows.items()):
      value = r['levels'][level]['held_out']
      x = m + i * slot + bar / 2 + j * bar
      y = h - m - value / top * (h - 2 * m)
      draw.rectangle([x, y, x + bar * 0.9, h - m],
                     fill=colours.get(family, (90, 90, 90)))
      draw.text((x, y - 14), f'{value:.3f}', fill='black')
  files.atomic_write(path, lambda f: image.save(f, format='PNG'))


def smoke_config() -> ml_collections.ConfigDict:
  """fashion_mnist.py:tiny on 96 train and 40 held-out images: the tests'
  `stage2_config` (tests/conftest.py), whose workdirs a smoke run may take
  as --base_workdir."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('tiny')
  config.data.train_split = 'train[:96]'
  config.data.eval_split = 'test[:40]'
  config.vqvae_train.eval_batch_size = 16
  config.prior.eval_batch_size = 16
  config.prior.codes_per_shard = 32
  return config


def main(argv, flag_values):
  del argv
  (config, base, out, seconds, layers, num_samples, levels, batches,
   smoke, families) = (f.value for f in flag_values)
  if not out:
    raise app.UsageError('--out is required.')
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown or not families:
    raise app.UsageError(f'--families={",".join(families)}: use names of '
                         f'{FAMILIES}.')
  if smoke:
    config, seconds = smoke_config(), min(seconds, 1.0)
  # Before any JAX work (the width search below), as --mode runs do.
  parallel.split_host_cpu(int(config.mesh.get('cpu_devices', 0)))
  base = base or (os.path.join(out, 'base') if smoke else None)
  if not base:
    raise app.UsageError('--base_workdir is required (or --smoke).')
  if all(os.path.isdir(os.path.join(base, d)) for d in ('vqvae', 'codes')):
    # Only read (through links): a run here would rewrite its config.json.
    print(f'Base workdir {base}: its stage 1 and codes')
  else:
    print(f'Base workdir {base}: stage 1 and codes (resumed when made)')
    stages.run('vqvae', config, base)
    stages.run('codes', config, base)
  configs = {family: config if family == 'pixelcnn' else transformer_config(
      config, layers, 'cross' if family == 'transformer_cross' else 'add')
             for family in families}
  levels = ([int(l) for l in levels] if levels else
            list(range(builders.num_levels(config))))
  if num_samples and len(levels) < builders.num_levels(config):
    raise app.UsageError('--num_samples needs every level (--levels unset).')
  rows = {}
  for family in families:
    print(f'--- {family}')
    rows[family] = {
        'changes': {k: configs[family].prior[k].to_dict() for k in
                    sorted(configs[family].prior) if k.startswith('level_')},
        **run_family(configs[family], base, os.path.join(out, family),
                     seconds, num_samples, [int(b) for b in batches],
                     levels)}
  rows_json = {'seconds': seconds, 'smoke': smoke,
               'devices': jax.device_count(), 'rows': rows}
  files.write_json(os.path.join(out, 'prior_families.json'), rows_json)
  table = format_table(rows)
  print(f'\nEqual train-step time: {seconds:g} s per family and level, '
        f'{jax.device_count()} JAX device(s).')
  print(table)
  files.atomic_write(os.path.join(out, 'prior_families.md'),
                     lambda f: f.write(table.encode()))
  plot(rows, os.path.join(out, 'prior_families.png'))
  print(json.dumps({f: {l: v['held_out'] for l, v in r['levels'].items()}
                    for f, r in rows.items()}))


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

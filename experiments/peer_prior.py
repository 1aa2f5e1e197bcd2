r"""Stage 2 against the PyTorch reference's PixelSNAIL priors, on the same codes.

  python -m experiments.peer_prior --workdir=workdir/fashion_mnist \
    --out=/tmp/peer_prior --peer_python=$PEER_PYTHON --peer_code=$PEER_DIR \
    --seconds=300                        # about 45 minutes on 2 CPU cores
  python -m experiments.peer_prior ... --parts=train --rows=reference,ours

The codes are those --mode=codes extracted in --workdir (read only; a
finished two-level run: its VQ-VAE decodes every sample). Parts (--parts;
each one's results are kept in <out>/peer_prior.json with its settings, and
a part already there with the same settings is not run again, so an
interrupted study continues where it stopped):

- export: both levels' codes (and labels) of the training and held-out
  splits to <out>/codes/{train,eval}_{top,bottom,label}.npy, which the
  reference's side reads (experiments/peer_prior_runner.py: its own
  PixelSNAIL and training recipe, run in its own Python; its docstring says
  what of train_pixelsnail.py is kept);
- train: per level, top first, each row for --seconds of train steps, back
  to back on the same machine: 'reference' (its PixelSNAIL, Adam 3e-4,
  batch --batch, dropout 0.1, cross-entropy, no class input), 'ours' (our
  prior and recipe, unconditional: built without a class input, as for a
  dataset without labels) and 'ours_labels' (ours with the class labels,
  its default on Fashion-MNIST; scored with them). Held-out bits per code
  are measured at --evals evenly spaced marks (evaluation not counted in
  the training seconds; ours scores its Polyak weights, as --mode=prior
  does). Our cosine schedule needs a step count: it is calibrated from our
  step rate measured for a few seconds before the timed run
  (--our_steps sets it instead);
- speed: train codes/s of one train step on a fixed batch, per level,
  ours ('ours' row) and the reference's in alternating rounds
  (--speed_rounds of --speed_seconds each, as experiments/peer_speed.py);
- sampling: seconds per map at each batch of --sample_batches, per level:
  the reference's own `sample.py` `sample_model` loop (its whole network on
  the prefix at every position) against our cached sampler
  (`sampling.sample_level`, compiled first; compilation not counted);
- samples: --num_samples samples of each row's trained priors
  (temperature 1; ours_labels class-balanced), decoded with --workdir's
  VQ-VAE, scored with the project's ruler (config.eval.features; 'auto' is
  the shipped judge for Fashion-MNIST) against the held-out split: FID,
  precision, recall, IS (and class agreement for ours_labels).

Sizes: the reference's defaults (channel 256, 4 blocks of 4 residual
blocks: 85M parameters per level at 4x4 codes) do not train in minutes on a
CPU, so both sides are scaled to the same parameter count: the reference's
structure with --peer_channel, --peer_n_block and --peer_n_res_block, and
ours (the workdir's recipe) with the width (num_channels) whose parameter
count is closest to the reference's, per level and row.

Writes <out>/peer_prior.md (the tables) and <out>/peer_prior.png (held-out
bits per code against training seconds, per level). PEER_PYTHON and PEER_DIR
can stand in for --peer_python and --peer_code (docs/reference.md says how
to set them up).
"""

import functools
import json
import math
import os
import statistics
import subprocess
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import peer_speed
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import hostmem
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import code_iterators
from vqvae2_jax.data import codes as codes_lib

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'peer_prior_runner.py')
LEVELS = ('top', 'bottom')
ROWS = ('reference', 'ours', 'ours_labels')
PARTS = ('export', 'train', 'speed', 'sampling', 'samples')


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import its functions)."""
  return dict(
      workdir=flags.DEFINE_string(
          'workdir', None, 'A finished two-level workdir (read only).'),
      out=flags.DEFINE_string('out', None, 'Where results and models go.'),
      peer_python=flags.DEFINE_string(
          'peer_python', os.environ.get('PEER_PYTHON'),
          'A Python with torch and numpy (default: $PEER_PYTHON).'),
      peer_code=flags.DEFINE_string(
          'peer_code', os.environ.get('PEER_DIR'),
          'Checkout of rosinality/vq-vae-2-pytorch (default: $PEER_DIR).'),
      parts=flags.DEFINE_list('parts', list(PARTS), 'Parts to run.'),
      rows=flags.DEFINE_list('rows', list(ROWS), 'Rows to train.'),
      seconds=flags.DEFINE_float(
          'seconds', 300.0, 'Training seconds per row and level.'),
      evals=flags.DEFINE_integer(
          'evals', 6, 'Held-out evaluations per training, evenly spaced.'),
      eval_examples=flags.DEFINE_integer(
          'eval_examples', 0, 'Held-out examples scored (0: all).'),
      batch=flags.DEFINE_integer('batch', 32, 'Train batch, both sides '
                                 "(train_pixelsnail.py's default)."),
      our_steps=flags.DEFINE_integer(
          'our_steps', 0, 'Our schedule length (0: calibrated).'),
      peer_channel=flags.DEFINE_integer('peer_channel', 64,
                                        'Reference channel and res_channel.'),
      peer_n_block=flags.DEFINE_integer('peer_n_block', 2,
                                        'Reference PixelBlocks.'),
      peer_n_res_block=flags.DEFINE_integer(
          'peer_n_res_block', 2, 'Reference residual blocks per PixelBlock.'),
      peer_threads=flags.DEFINE_integer(
          'peer_threads', 2, "The reference's torch threads (2 was faster "
          'than 1 on an idle 2-core machine, 1 on a loaded one: see '
          'docs/results.md).'),
      speed_rounds=flags.DEFINE_integer('speed_rounds', 3,
                                        'Alternating speed rounds.'),
      speed_seconds=flags.DEFINE_float('speed_seconds', 10.0,
                                       'Each side per speed round.'),
      sample_batches=flags.DEFINE_list('sample_batches', ['1', '16'],
                                       'Batches timed per map.'),
      sample_repeats=flags.DEFINE_integer('sample_repeats', 3,
                                          'Timed maps per batch.'),
      num_samples=flags.DEFINE_integer('num_samples', 1000,
                                       'Samples scored per row.'),
      sample_batch=flags.DEFINE_integer('sample_batch', 100,
                                        'Batch of the scored samples.'),
  )


# Export.


def open_codes(workdir: str) -> codes_lib.CodeDataset:
  """The workdir's extraction (shard digests checked), two levels only."""
  dataset = codes_lib.CodeDataset(workdir_lib.Workdir(workdir).codes,
                                  vqvae=None)
  if len(dataset.level_shapes) != 2:
    raise app.UsageError(
        f'{workdir} has {len(dataset.level_shapes)} levels; the reference '
        'has a top and a bottom prior. Fix: pass a two-level workdir.')
  return dataset


def export_codes(workdir: str, out_dir: str) -> dict[str, Any]:
  """Writes <out_dir>/{train,eval}_{top,bottom,label}.npy (int16/int32).

  Returns:
    What was written: per split the number of examples, the level shapes,
    K per level and the extraction's manifest digest.
  """
  dataset = open_codes(workdir)
  os.makedirs(out_dir, exist_ok=True)
  info = {'level_shapes': [list(s) for s in dataset.level_shapes],
          'num_embeddings': dataset.num_embeddings,
          'num_classes': dataset.num_classes,
          'vqvae': dataset.manifest['vqvae'].get('digest'), 'splits': {}}
  for split in ('train', 'eval'):
    codes = dataset.split(split)
    got = codes.read(np.arange(codes.num_examples), (0, 1))
    arrays = {LEVELS[0]: got['codes'][0], LEVELS[1]: got['codes'][1],
              'label': got['label']}
    for name, array in arrays.items():
      dtype = np.int16 if name != 'label' and max(
          dataset.num_embeddings) <= 2**15 else np.int32
      path = os.path.join(out_dir, f'{split}_{name}.npy')
      files.atomic_write(path, functools.partial(
          _save_npy, array=array.astype(dtype)))
    info['splits'][split] = codes.num_examples
  return info


def _save_npy(f, array):
  np.save(f, array, allow_pickle=False)


def read_exported(out_dir: str, split: str) -> dict[str, np.ndarray]:
  return {name: np.load(os.path.join(out_dir, f'{split}_{name}.npy'))
          for name in (*LEVELS, 'label')}


# Sizes.


def peer_args(flag_values: dict[str, Any], num_embeddings: int,
              level_shapes) -> list[str]:
  """The runner's model flags (the reference's structure, scaled)."""
  c = flag_values['peer_channel']
  return [f'--channel={c}', f'--res_channel={c}',
          f'--n_block={flag_values["peer_n_block"]}',
          f'--n_res_block={flag_values["peer_n_res_block"]}',
          f'--n_class={num_embeddings}',
          '--top_shape={}x{}'.format(*level_shapes[0]),
          '--bottom_shape={}x{}'.format(*level_shapes[1])]


def count_params(config: ml_collections.ConfigDict, level: int) -> int:
  """Parameters of our level-`level` prior under `config` (no compilation)."""
  model = builders.build_prior(config, level)
  codes, cond, labels = builders.prior_init_inputs(
      level, builders.level_shapes(config), model.num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
      codes, cond_codes=cond, labels=labels, train=False))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


def with_width(config: ml_collections.ConfigDict, level: int,
               channels: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  out.prior[f'level_{level}'].num_channels = int(channels)
  return out


def match_width(config: ml_collections.ConfigDict, level: int,
                target: int) -> tuple[int, int]:
  """(num_channels, params) of level `level` closest to `target` params.

  Widths are multiples of the level's attention heads (and of 2).
  """
  heads = int(config.prior[f'level_{level}'].num_heads)
  unit = heads * 2 // math.gcd(heads, 2)
  best = None
  low, high = 1, 4096 // unit  # Parameters grow with the width: bisect.
  while low < high:
    mid = (low + high) // 2
    if count_params(with_width(config, level, mid * unit), level) < target:
      low = mid + 1
    else:
      high = mid
  for k in (low - 1, low):
    if k >= 1:
      n = count_params(with_width(config, level, k * unit), level)
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (k * unit, n)
  return best


def row_config(base: ml_collections.ConfigDict, row: str,
               batch: int) -> ml_collections.ConfigDict:
  """Our recipe for a row: 'ours' without a class input, batch `batch`."""
  config = ml_collections.ConfigDict(base.to_dict())
  if row == 'ours':
    config.data.num_classes = 0
  config.prior.batch_size = batch
  return config


# The reference's side.


def check_peer(peer_python: str | None, peer_code: str | None) -> None:
  """Raises app.UsageError naming the fix when the reference is missing."""
  peer_speed.check_peer(peer_python, peer_code)
  if not os.path.isfile(os.path.join(peer_code, 'pixelsnail.py')):
    raise app.UsageError(f'--peer_code={peer_code!r} has no pixelsnail.py. '
                         f'Fix: {peer_speed._SETUP}.')  # pylint: disable=protected-access


def run_peer(peer_python: str, peer_code: str, args: list[str],
             log: Callable[[str], None] = print,
             timeout: float = 7200) -> dict[str, Any]:
  """Runs the reference runner; its last stdout line as JSON.

  Other stdout lines (the evaluations of a training) are logged as they
  come.
  """
  command = [peer_python, _RUNNER, f'--peer_code={peer_code}', *args]
  with subprocess.Popen(command, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) as proc:
    lines = []
    start = time.time()
    for line in proc.stdout:
      lines.append(line.rstrip('\n'))
      log(f'  reference: {lines[-1][:200]}')
      if time.time() - start > timeout:
        proc.kill()
    err = proc.stderr.read()
    if proc.wait():
      raise RuntimeError(f'The reference runner failed ({" ".join(command)}):'
                         f'\n{err[-3000:]}')
  return json.loads(lines[-1])


# Our side.


def _marks(seconds: float, evals: int) -> list[float]:
  return [seconds * k / evals for k in range(1, evals + 1)]


def train_ours(config: ml_collections.ConfigDict, level: int,
               dataset: codes_lib.CodeDataset, *, seconds: float, evals: int,
               eval_examples: int, use_labels: bool, mesh,
               our_steps: int = 0, log: Callable[[str], None] = print
               ) -> tuple[dict[str, Any], Any]:
  """Trains our prior of one level for `seconds` of train steps.

  Returns:
    (the row: params, steps, planned steps, train_s, first_step_s, curve
    of {'step', 'train_s', 'bits'}, codes_per_s; the eval params).
  """
  from vqvae2_jax.train import prior_trainer  # pylint: disable=g-import-not-at-top
  levels = tuple(range(level + 1))
  batch = int(config.prior.batch_size)
  train_split, eval_split = dataset.split('train'), dataset.split('eval')

  def start(cfg):
    progs = prior_trainer.programs(cfg, level, mesh)
    state = progs.init(jax.random.fold_in(jax.random.PRNGKey(cfg.seed),
                                          level))
    batches = code_iterators.create_train_iterator(
        train_split, global_batch_size=batch, mesh=mesh, seed=cfg.seed,
        levels=levels)
    return progs, state, batches

  planned = int(our_steps)
  if not planned:  # Calibrate the schedule's length on our step rate.
    progs, state, batches = start(config)
    state, metrics = progs.train_step(state, next(batches))
    jax.block_until_ready(metrics)
    steps, begin = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - begin < min(10.0, seconds / 10):
      state, metrics = progs.train_step(state, next(batches))
      jax.block_until_ready(metrics)
      steps += 1
    rate = steps / (time.perf_counter() - begin)
    planned = max(int(config.prior.warmup_steps) + 1, int(rate * seconds))
    log(f'  ours: {rate:.1f} steps/s measured, schedule of {planned} steps')
    del state
  config = ml_collections.ConfigDict(config.to_dict())
  config.prior.num_train_steps = planned
  progs, state, batches = start(config)
  eval_fn = progs.eval_cond if use_labels else progs.eval_uncond

  def held_out(state):
    return prior_trainer.evaluate(
        eval_fn, state.eval_params(), code_iterators.create_eval_iterator(
            eval_split, global_batch_size=int(config.prior.eval_batch_size),
            mesh=mesh, levels=levels,
            num_examples=eval_examples or None))['bits_per_code']

  curve = [{'step': 0, 'train_s': 0.0, 'bits': held_out(state)}]
  log(f'  ours: {json.dumps(curve[-1])}')
  begin = time.perf_counter()
  state, metrics = progs.train_step(state, next(batches))  # Compiles.
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - begin
  step, train_s = 1, 0.0
  for mark in _marks(seconds, evals):
    begin = time.perf_counter()
    while train_s + time.perf_counter() - begin < mark and step < planned:
      state, metrics = progs.train_step(state, next(batches))
      jax.block_until_ready(metrics)
      step += 1
    train_s += time.perf_counter() - begin
    curve.append({'step': step, 'train_s': train_s, 'bits': held_out(state),
                  'train_bits_last_batch': float(metrics['bits_per_code'])})
    log(f'  ours: {json.dumps(curve[-1])}')
    if step >= planned:
      break
  codes = math.prod(dataset.level_shapes[level])
  row = {'params': count_params(config, level), 'steps': step,
         'planned_steps': planned, 'train_s': train_s,
         'first_step_s': first_step_s, 'curve': curve,
         'codes_per_s': (step - 1) * batch * codes / max(train_s, 1e-9),
         'num_channels': int(config.prior[f'level_{level}'].num_channels)}
  return row, jax.device_get(state.eval_params())


def save_params(path: str, params) -> None:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  data = serialization.msgpack_serialize(
      jax.tree.map(np.asarray, serialization.to_state_dict(params)))
  files.atomic_write(path, lambda f: f.write(data))


def load_params(path: str):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


class OurStep:
  """Our train step of one level on a fixed batch of random codes."""

  def __init__(self, config, level: int, level_shapes, mesh):
    from vqvae2_jax.train import prior_trainer  # pylint: disable=g-import-not-at-top
    self._progs = prior_trainer.programs(config, level, mesh)
    self._state = self._progs.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = int(config.prior.batch_size)
    k = int(config.model.num_embeddings)
    self._codes = batch * math.prod(level_shapes[level])
    self._batch = parallel.shard_batch(
        {'codes': [rng.integers(0, k, (batch, *level_shapes[l]), np.int32)
                   for l in range(level + 1)],
         'label': np.zeros((batch,), np.int32)}, mesh)
    for _ in range(3):  # Compiles, then warms up.
      jax.block_until_ready(self._step())

  def _step(self):
    self._state, metrics = self._progs.train_step(self._state, self._batch)
    return metrics

  def codes_per_s(self, seconds: float) -> float:
    steps, begin = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - begin < seconds:
      jax.block_until_ready(self._step())
      steps += 1
    return steps * self._codes / (time.perf_counter() - begin)


def time_our_sampler(model, variables, shape, cond_codes, repeats: int
                     ) -> dict[str, Any]:
  """Seconds of `sampling.sample_level` per map (compiled first)."""
  from vqvae2_jax import sampling  # pylint: disable=g-import-not-at-top
  begin = time.perf_counter()
  sampling.compile_sampler(model, variables, shape=shape,
                           cond_codes=cond_codes)
  compile_s = time.perf_counter() - begin
  times = []
  for i in range(repeats):
    begin = time.perf_counter()
    jax.block_until_ready(sampling.sample_level(
        model, variables, shape=shape, cond_codes=cond_codes,
        rng=jax.random.PRNGKey(i)))
    times.append(time.perf_counter() - begin)
  return {'median': statistics.median(times), 'best': min(times),
          'runs': times, 'compile_s': compile_s}


# Tables.


def _at(curve, seconds):
  """Bits at the last evaluation at or before `seconds`."""
  done = [p for p in curve if p['train_s'] <= seconds + 1e-9]
  return done[-1]['bits'] if done else None


def time_to_reach(curve, bits):
  """Training seconds of the first evaluation at or below `bits`, or None."""
  for p in curve:
    if p['bits'] <= bits:
      return p['train_s']
  return None


def train_table(train: dict[str, Any]) -> list[str]:
  lines = ['| level | row | params | steps | train s | held-out bits/code | '
           "at the reference's final time | time to the reference's final "
           '| curve (train s: bits) |', '|' + '---|' * 9]
  for level in LEVELS:
    ref = train.get(f'reference/{level}')
    for row in ROWS:
      r = train.get(f'{row}/{level}')
      if r is None:
        continue
      final = r['curve'][-1]['bits']
      at_ref = reach = '-'
      if ref is not None and row != 'reference':
        value = _at(r['curve'], ref['train_s'])
        at_ref = '-' if value is None else f'{value:.3f}'
        t = time_to_reach(r['curve'], ref['curve'][-1]['bits'])
        reach = ('not reached' if t is None else
                 f'{t:.0f} s ({t / ref["train_s"]:.0%})')
      curve = ', '.join(f'{p["train_s"]:.0f}: {p["bits"]:.3f}'
                        for p in r['curve'])
      lines.append(f'| {level} | {row} | {r["params"]:,} | {r["steps"]} | '
                   f'{r["train_s"]:.0f} | {final:.3f} | {at_ref} | {reach} | '
                   f'{curve} |')
  return lines


def speed_table(speed: dict[str, Any]) -> list[str]:
  lines = ['| level | params ours / reference | ours codes/s | '
           'reference codes/s | ours / reference (median of rounds) |',
           '|---|---|---|---|---|']
  for level in LEVELS:
    s = speed.get(level)
    if s:
      m = s['median']
      lines.append(f'| {level} | {s["params"]["ours"]:,} / '
                   f'{s["params"]["reference"]:,} | {m["ours"]:,.0f} | '
                   f'{m["reference"]:,.0f} | {m["ratio"]:.2f}x |')
  return lines


def sampling_table(timed: dict[str, Any]) -> list[str]:
  lines = ['| level | batch | reference s per call (its `sample_model`) | '
           'ours s per call (cached) | speed-up | ours compile s |',
           '|---|---|---|---|---|---|']
  for key, s in timed.items():
    level, batch = key.split('/')
    ref, ours = s['reference']['median'], s['ours']['median']
    lines.append(f'| {level} | {batch} | {ref:.3f} | {ours:.4f} | '
                 f'{ref / ours:,.0f}x | {s["ours"]["compile_s"]:.1f} |')
  return lines


def samples_table(samples: dict[str, Any]) -> list[str]:
  lines = ['| row | samples | precision | recall | FID | IS | class agr. |',
           '|---|---|---|---|---|---|---|']
  for row, s in samples.items():
    if row == 'real_vs_real':
      continue
    agreement = s.get('class_agreement')
    lines.append(
        f'| {row} | {s["num_examples"]} | {s["precision"]:.3f} | '
        f'{s["recall"]:.3f} | {s["fid"]:.3f} | {s["inception_score"]:.2f} | '
        + ('-' if agreement is None else f'{agreement:.1%}') + ' |')
  floor = samples.get('real_vs_real')
  if floor:
    lines.append(f'| real vs real (the workdir\'s eval) | '
                 f'{floor.get("num_examples", "-")} | '
                 f'{floor["precision"]:.3f} | {floor["recall"]:.3f} | '
                 f'{floor["fid"]:.3f} | {floor["inception_score"]:.2f} | - |')
  return lines


def format_tables(results: dict[str, Any]) -> str:
  out = []
  settings = results.get('settings', {})
  if settings:
    out.append('Settings: ' + ', '.join(  # The JSON has the workdir.
        f'{k}={v}' for k, v in settings.items() if k != 'workdir'))
  for title, key, fn in (
      ('Held-out bits per code against training seconds', 'train',
       train_table),
      ('Train step throughput at equal parameter count', 'speed',
       speed_table),
      ('Sampling: seconds to draw one batch of maps (median)', 'sampling',
       sampling_table),
      ('Samples decoded by the same VQ-VAE, scored by the same ruler',
       'samples', samples_table)):
    if results.get(key):
      out += ['', f'{title}:', '', *fn(results[key])]
  return '\n'.join(out) + '\n'


_COLOURS = {'reference': (200, 30, 30), 'ours': (30, 90, 200),
            'ours_labels': (30, 150, 60)}


def plot(train: dict[str, Any], path: str) -> None:
  """Held-out bits per code against training seconds, one panel per level."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  pw, h, m = 420, 380, 60
  image = Image.new('RGB', (2 * pw, h), 'white')
  draw = ImageDraw.Draw(image)
  for panel, level in enumerate(LEVELS):
    curves = {row: train[f'{row}/{level}']['curve'] for row in ROWS
              if f'{row}/{level}' in train}
    if not curves:
      continue
    # The first evaluation (untrained, ~9 bits) would flatten the rest.
    points = [p for c in curves.values() for p in c if p['train_s'] > 0]
    xs = [p['train_s'] for p in points] or [1.0]
    ys = [p['bits'] for p in points] or [0.0]
    x1, y0, y1 = max(xs) * 1.05, min(ys) - 0.05, max(ys) + 0.05
    left = panel * pw

    def px(x, y, left=left, x1=x1, y0=y0, y1=y1):
      return (left + m + x / x1 * (pw - m - 15),
              h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - m - 40))

    draw.rectangle([left + m, 40, left + pw - 15, h - m], outline='black')
    draw.text((left + m, 8), f'{level}: held-out bits per code', fill='black')
    draw.text((left + pw // 2 - 30, h - 22), 'train seconds', fill='black')
    for frac in (0.0, 0.5, 1.0):
      x, y = px(frac * x1, y0 + frac * (y1 - y0))
      draw.text((x - 10, h - m + 4), f'{frac * x1:.0f}', fill='black')
      draw.text((left + 4, y - 6), f'{y0 + frac * (y1 - y0):.3f}',
                fill='black')
    for i, (row, curve) in enumerate(curves.items()):
      pts = [px(p['train_s'], p['bits']) for p in curve if p['train_s'] > 0]
      colour = _COLOURS[row]
      if len(pts) > 1:
        draw.line(pts, fill=colour, width=2)
      for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
      draw.text((left + m + 8 + 120 * i, 24), row, fill=colour)
  files.atomic_write(path, lambda f: image.save(f, format='PNG'))


# The study.


class Study:
  """The parts of one study, its results kept in <out>/peer_prior.json."""

  def __init__(self, f: dict[str, Any], log: Callable[[str], None] = print):
    self.f, self.log = f, log
    self.out = f['out']
    os.makedirs(self.out, exist_ok=True)
    self.json_path = os.path.join(self.out, 'peer_prior.json')
    self.results = files.read_json(self.json_path) or {}
    self.codes_dir = os.path.join(self.out, 'codes')
    with open(workdir_lib.Workdir(f['workdir']).config_json) as fh:
      self.base = ml_collections.ConfigDict(json.load(fh))
    self.dataset = open_codes(f['workdir'])
    self.shapes = [tuple(s) for s in self.dataset.level_shapes]
    self.k = int(self.base.model.num_embeddings)
    self.mesh = parallel.create_mesh(self.base.mesh)
    self.peer = peer_args(f, self.k, self.shapes) + [
        f'--threads={f["peer_threads"]}']
    self.results['settings'] = {
        'workdir': f['workdir'], 'seconds': f['seconds'],
        'batch': f['batch'], 'evals': f['evals'],
        'eval_examples': f['eval_examples'] or 'all',
        'reference': ' '.join(self.peer),
        'devices': f'{jax.device_count()} {jax.default_backend()}',
        'cores': os.cpu_count()}

  def save(self):
    files.write_json(self.json_path, self.results)

  def _done(self, part: str, key: str, settings: dict[str, Any]):
    got = self.results.get(part, {}).get(key)
    if got is not None and got.get('settings') == settings:
      self.log(f'{part} {key}: already in {self.json_path}')
      return got
    return None

  def _keep(self, part: str, key: str, settings, value):
    value['settings'] = settings
    self.results.setdefault(part, {})[key] = value
    self.save()

  def peer_run(self, *args: str, timeout: float = 7200) -> dict[str, Any]:
    return run_peer(self.f['peer_python'], self.f['peer_code'],
                    [*self.peer, f'--batch={self.f["batch"]}', *args],
                    self.log, timeout)

  def reference_params(self) -> dict[str, int]:
    got = self.results.get('reference_params')
    if got and got.get('args') == self.peer:
      return got
    got = self.peer_run('--mode=params')
    got = {'top': got['top'], 'bottom': got['bottom'], 'args': self.peer}
    self.results['reference_params'] = got
    self.save()
    return got

  def our_config(self, row: str) -> ml_collections.ConfigDict:
    """Our recipe for `row`, each level's width matched to the reference."""
    config = row_config(self.base, row, self.f['batch'])
    target = self.reference_params()
    for level, name in enumerate(LEVELS):
      width, _ = match_width(config, level, target[name])
      config = with_width(config, level, width)
    return config

  def export(self):
    info = export_codes(self.f['workdir'], self.codes_dir)
    self.results['export'] = info
    self.save()
    self.log(f'Exported codes to {self.codes_dir}: {info["splits"]}')

  def train(self):
    marks = ','.join(f'{s:g}' for s in _marks(self.f['seconds'],
                                               self.f['evals']))
    for level, name in enumerate(LEVELS):
      for row in self.f['rows']:
        key = f'{row}/{name}'
        settings = {'seconds': self.f['seconds'], 'evals': self.f['evals'],
                    'eval_examples': self.f['eval_examples'],
                    'batch': self.f['batch'], 'reference': self.peer}
        weights = self.weights(row, name)
        if self._done('train', key, settings) and os.path.exists(weights):
          continue
        self.log(f'--- train {key}: {self.f["seconds"]:g} s')
        if row == 'reference':
          got = self.peer_run(
              '--mode=train', f'--level={name}', f'--codes={self.codes_dir}',
              f'--seconds={self.f["seconds"]}', f'--eval_at={marks}',
              f'--eval_examples={self.f["eval_examples"]}',
              f'--save={weights}')
          got = {k: got[k] for k in ('params', 'steps', 'train_s', 'curve',
                                     'codes_per_s')}
        else:
          got, params = train_ours(
              self.our_config(row), level, self.dataset,
              seconds=self.f['seconds'], evals=self.f['evals'],
              eval_examples=self.f['eval_examples'],
              use_labels=row == 'ours_labels', mesh=self.mesh,
              our_steps=self.f['our_steps'], log=self.log)
          save_params(weights, params)
        self._keep('train', key, settings, got)
        self.log(f'{key}: {got["steps"]} steps in {got["train_s"]:.0f} s, '
                 f'held-out {got["curve"][-1]["bits"]:.3f} bits/code')

  def weights(self, row: str, level: str) -> str:
    ext = 'pt' if row == 'reference' else 'msgpack'
    return os.path.join(self.out, f'{row}_{level}.{ext}')

  def speed(self):
    config = self.our_config('ours')
    params = self.reference_params()
    for level, name in enumerate(LEVELS):
      settings = {'rounds': self.f['speed_rounds'],
                  'seconds': self.f['speed_seconds'],
                  'batch': self.f['batch'], 'reference': self.peer}
      if self._done('speed', name, settings):
        continue
      ours = OurStep(self._trained_config(config, f'ours/{name}'), level,
                     self.shapes, self.mesh)
      rounds = []
      for i in range(self.f['speed_rounds']):
        mine = ours.codes_per_s(self.f['speed_seconds'])
        theirs = self.peer_run('--mode=speed', f'--level={name}',
                               f'--seconds={self.f["speed_seconds"]}')
        rounds.append({'ours': mine, 'reference': theirs['codes_per_s'],
                       'ratio': mine / theirs['codes_per_s']})
        self.log(f'speed {name} round {i + 1}: ours {mine:,.0f} codes/s, '
                 f'reference {theirs["codes_per_s"]:,.0f}')
      median = {k: statistics.median(r[k] for r in rounds)
                for k in ('ours', 'reference', 'ratio')}
      self._keep('speed', name, settings, {
          'rounds': rounds, 'median': median,
          'params': {'ours': count_params(config, level),
                     'reference': params[name]}})

  def _trained_config(self, config: ml_collections.ConfigDict,
                      key: str) -> ml_collections.ConfigDict:
    """`config` with the schedule length the train part used for `key`.

    The step's speed does not depend on it, but its programs are then the
    ones `train_ours` compiled (`prior_trainer.programs` is cached) when
    both parts run in one process: not compiled again.
    """
    planned = self.results.get('train', {}).get(key, {}).get('planned_steps')
    if not planned:
      return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.prior.num_train_steps = planned
    return config

  def _our_priors(self, row: str):
    config = self.our_config(row)
    priors = []
    for level, name in enumerate(LEVELS):
      model = builders.build_prior(config, level)
      path = self.weights(row, name)
      if os.path.exists(path):
        params = load_params(path)
      else:  # Untrained weights time the same.
        codes, cond, labels = builders.prior_init_inputs(
            level, self.shapes, model.num_classes)
        params = model.init({'params': jax.random.PRNGKey(level)}, codes,
                            cond_codes=cond, labels=labels,
                            train=False)['params']
      priors.append((model, {'params': params}))
    return config, priors

  def sampling(self):
    _, priors = self._our_priors('ours')
    weights = ','.join(self.weights('reference', name) for name in LEVELS)
    if not all(os.path.exists(p) for p in weights.split(',')):
      weights = ''
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in self.f['sample_batches']):
      settings = {'repeats': self.f['sample_repeats'],
                  'reference': self.peer, 'trained': bool(weights)}
      if all(self._done('sampling', f'{name}/{batch}', settings)
             for name in LEVELS):
        continue
      theirs = self.peer_run('--mode=sample', f'--weights={weights}',
                             f'--sample_batch={batch}',
                             f'--repeats={self.f["sample_repeats"]}')
      top = jnp.asarray(rng.integers(0, self.k, (batch, *self.shapes[0])),
                        jnp.int32)
      for level, name in enumerate(LEVELS):
        model, variables = priors[level]
        mine = time_our_sampler(model, variables,
                                (batch, *self.shapes[level]),
                                (top,) if level else (),
                                self.f['sample_repeats'])
        self._keep('sampling', f'{name}/{batch}', settings, {
            'reference': theirs['map_s'][name], 'ours': mine})
        self.log(f'sampling {name} batch {batch}: reference '
                 f'{theirs["map_s"][name]["median"]:.3f} s/map, ours '
                 f'{mine["median"]:.4f} s/map')

  def samples(self):
    from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
    from vqvae2_jax import sampling  # pylint: disable=g-import-not-at-top
    from vqvae2_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top
    from vqvae2_jax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    n, batch = self.f['num_samples'], self.f['sample_batch']
    settings = {'num_samples': n, 'train': {
        k: v.get('settings') for k, v in self.results.get('train', {}).items()}}
    todo = [row for row in self.f['rows']
            if all(os.path.exists(self.weights(row, name)) for name in LEVELS)
            and not self._done('samples', row, settings)]
    if not todo:
      return
    pipeline = api.Pipeline.load(self.f['workdir'], priors=False,
                                 mesh=self.mesh)
    features, about = eval_run.feature_fn(self.base, self.f['workdir'],
                                          self.mesh)
    real = eval_run.held_out_stats(self.base, self.mesh, features)
    for row in todo:
      requested = None
      if row == 'reference':
        path = os.path.join(self.out, 'reference_samples.npz')
        weights = ','.join(self.weights(row, name) for name in LEVELS)
        self.peer_run('--mode=sample', f'--weights={weights}', '--repeats=0',
                      f'--num={n}', f'--sample_batch={batch}',
                      f'--samples_out={path}')
        with np.load(path) as drawn:
          codes = [drawn[name] for name in LEVELS]
      else:
        config, priors = self._our_priors(row)
        if row == 'ours_labels':
          requested = np.arange(n, dtype=np.int32) % int(
              config.data.num_classes)
        codes = [[], []]
        for i, begin in enumerate(range(0, n, batch)):
          labels = None if requested is None else jnp.asarray(
              np.resize(requested[begin:begin + batch], batch))
          got = sampling.sample_hierarchy(
              priors, self.shapes, batch_size=batch, labels=labels,
              rng=jax.random.fold_in(jax.random.PRNGKey(1), i))
          for level in range(2):
            codes[level].append(np.asarray(got[level])[:n - begin])
        codes = [np.concatenate(c) for c in codes]
      fake = metrics_lib.FeatureStats(max_features=n)
      for begin in range(0, n, batch):
        images = np.clip(pipeline.decode([c[begin:begin + batch]
                                          for c in codes]), -1.0, 1.0)
        fake.add(*features(images))
      got = eval_run.sample_metrics(self.base, real, fake, requested)
      got = {k: float(v) if isinstance(v, (float, np.floating)) else v
             for k, v in got.items()}
      got['ruler'] = about.get('judge') or about.get('features')
      self._keep('samples', row, settings, got)
      self.log(f'samples {row}: precision {got["precision"]:.3f}, recall '
               f'{got["recall"]:.3f}, FID {got["fid"]:.3f}, IS '
               f'{got["inception_score"]:.2f}')
    report = files.read_json(os.path.join(
        workdir_lib.Workdir(self.f['workdir']).root, 'eval', 'report.json'))
    floor = (report or {}).get('real_vs_real')
    if floor and floor.get('num_examples', n) == n:
      self.results['samples']['real_vs_real'] = floor
      self.save()

  def write_tables(self) -> str:
    table = format_tables(self.results)
    files.atomic_write(os.path.join(self.out, 'peer_prior.md'),
                       lambda f: f.write(table.encode()))
    if self.results.get('train'):
      plot(self.results['train'], os.path.join(self.out, 'peer_prior.png'))
    return table


def main(argv, flag_values):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  for name in ('workdir', 'out'):
    if not f[name]:
      raise app.UsageError(f'--{name} is required.')
  unknown = set(f['parts']) - set(PARTS) | set(f['rows']) - set(ROWS)
  if unknown:
    raise app.UsageError(f'Unknown parts or rows {sorted(unknown)}; parts: '
                         f'{list(PARTS)}, rows: {list(ROWS)}.')
  if set(f['parts']) - {'export'}:
    check_peer(f['peer_python'], f['peer_code'])
  hostmem.tune_malloc()
  with open(workdir_lib.Workdir(f['workdir']).config_json) as fh:
    cpu_devices = json.load(fh)['mesh']['cpu_devices']
  parallel.split_host_cpu(cpu_devices)  # Before JAX starts.
  study = Study(f)
  print(f'Stage 2 against the reference on {f["workdir"]}\'s codes; '
        f'{study.results["settings"]}', flush=True)
  for part in PARTS:
    if part in f['parts'] or (part == 'export' and not os.path.exists(
        os.path.join(study.codes_dir, 'eval_label.npy'))):
      getattr(study, part)()
  print(study.write_tables())


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

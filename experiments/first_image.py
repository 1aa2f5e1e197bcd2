r"""Seconds from a fresh process to its first sampled image, cold and warm.

  python -m experiments.first_image --export=path/to/model.msgpack
  python -m experiments.first_image --config=configs/imagenet256.py \
    --make_export=/tmp/imagenet256_random.msgpack   # random weights, then timed
  python -m experiments.first_image --smoke         # tiny config, seconds
  python -m experiments.first_image --export=FILE --runs=off,off --load_only

Each run is a new Python process that imports the package, calls
`Pipeline.load(export, compilation_cache_dir=...)` and
`sample(n=--batch)`, and then samples once more (the same programs, already
compiled: what sampling alone costs). The runs (--runs):

* off: no persistent compilation cache (JAX's default; a
  JAX_COMPILATION_CACHE_DIR in the environment is not passed on);
* cold: an empty cache directory: every program is compiled, then written
  to the cache;
* warm: the same directory again: the programs are read back.

The table gives the seconds from starting the process to: its imports done,
`Pipeline.load` done, the first image; then the load's own seconds and the
file's megabytes read per second of it (1 MB = 1e6 bytes; the file comes
from the page cache when it was read recently, else from the disk); the
second image's own seconds;
the seconds JAX reported for tracing and lowering and for compiling (or
reading back) programs, and the persistent cache's hits and misses. Loading
compiles no model (shapes come from `jax.eval_shape`, weights from the
file), so what stands between the load and the first image is compiling the
samplers and the decoder, and sampling. --load_only stops each process
after the load (a paper-size image takes minutes on a CPU).

--make_export writes random weights for --config (no training) in the
export format of --mode=export (`Pipeline.export`): the priors' weights are
drawn by numpy from their shapes (`compiled_steps.random_variables`), the
(small) VQ-VAE's by its own init, both on the CPU. A jitted random init of
a paper-size prior compiles for about 75 s on an H200, longer than
everything measured here. The weights' values do not change how long
sampling takes.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags

_EXPORT = flags.DEFINE_string(
    'export', '', 'Exported pipeline to time (default: the --make_export '
    'file).')
_CONFIG = flags.DEFINE_string(
    'config', 'configs/imagenet256.py',
    "Config for --make_export: 'path/to/config.py[:variant]'.")
_MAKE_EXPORT = flags.DEFINE_string(
    'make_export', '', 'First write an export with random weights for '
    '--config here (no training).')
_RUNS = flags.DEFINE_list('runs', ['cold', 'warm'],
                          'Runs in order: off, cold and/or warm.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Images sampled per call.')
_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', '', 'Compilation cache directory of the cold and warm runs; '
    'it must be empty or new. Default: a temporary one, deleted after.')
_SMOKE = flags.DEFINE_bool(
    'smoke', False, 'configs/fashion_mnist.py:tiny, random weights, in a '
    'temporary directory (the tests).')
_LOAD_ONLY = flags.DEFINE_bool(
    'load_only', False, 'Time the load only: each process ends after '
    '`Pipeline.load` (no image).')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows here.')
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'Seconds allowed per run.')
# Internal: the measured process.
_CHILD = flags.DEFINE_bool('child', False, 'Run one measured process.')

_SMOKE_CONFIG = 'configs/fashion_mnist.py:tiny'
_RESULT = 'FIRST_IMAGE_RESULT '  # Prefixes the child's one line of JSON.
_RUNS_KNOWN = ('off', 'cold', 'warm')
# JAX's monitoring events: durations summed, counts counted.
_TRACE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                 '/jax/core/compile/jaxpr_to_mlir_module_duration')
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_HIT_EVENT = '/jax/compilation_cache/cache_hits'
_MISS_EVENT = '/jax/compilation_cache/cache_misses'


def make_export(config_path: str, path: str) -> dict[str, Any]:
  """Writes an exported pipeline of random weights for a config.

  The same file `--mode=export` writes (`Pipeline.export`), readable by
  `Pipeline.load(path)`, with checkpoint steps 0.

  Args:
    config_path: 'path/to/config.py[:variant]'.
    path: the file to write.

  Returns:
    {'path', 'bytes', 'seconds', 'params': parameters of each prior}.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from experiments import compiled_steps
  from vqvae2_jax import builders
  from vqvae2_jax import parallel
  from vqvae2_jax import api
  # pylint: enable=g-import-not-at-top
  start = time.perf_counter()
  config = api.load_config(config_path)
  # The host's CPU device: the file is written from host memory anyway, and
  # an accelerator would only add copies.
  cpu = jax.devices('cpu')[0]
  vqvae = builders.build_vqvae(config)
  with jax.default_device(cpu):
    key = jax.random.key(0)
    vqvae_variables = jax.jit(lambda k: vqvae.init(
        {'params': k, 'vq': k}, builders.vqvae_init_inputs(config),
        train=False))(key)
  shapes = builders.level_shapes(config)
  priors, params = [], []
  for level in range(builders.num_levels(config)):
    model = builders.build_prior(config, level)
    codes, cond, labels = builders.prior_init_inputs(level, shapes,
                                                     model.num_classes)
    with jax.default_device(cpu):
      variables = compiled_steps.random_variables(
          model, codes, cond_codes=cond, labels=labels, train=False)
    params.append(sum(x.size for x in jax.tree.leaves(variables)))
    priors.append((model, variables))
  steps = {'vqvae': 0, **{f'prior_{level}': 0 for level in range(len(priors))}}
  pipe = api.Pipeline(config, vqvae, vqvae_variables, priors, steps,
                           mesh=parallel.create_mesh(devices=[cpu]))
  pipe.export(path)
  return {'path': path, 'bytes': os.path.getsize(path),
          'seconds': time.perf_counter() - start, 'params': params}


def _child(export: str, cache_dir: str, batch: int,
           load_only: bool = False) -> dict[str, Any]:
  """The measured process: load, first image, second image."""
  stamps = {}
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vqvae2_jax import api
  # pylint: enable=g-import-not-at-top
  stamps['imported'] = time.time()
  cpu = time.process_time()
  seconds, counts = collections.Counter(), collections.Counter()
  compiled = []  # Names of the programs compiled (or read back), in order.

  def on_duration(event, duration, **kwargs):
    seconds.update({event: duration})
    if event == _COMPILE_EVENT:
      compiled.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(
      lambda event, **_: counts.update({event: 1}))
  pipe = api.Pipeline.load(export, compilation_cache_dir=cache_dir)
  stamps['loaded'] = time.time()
  load_cpu_s = time.process_time() - cpu  # Every thread's.
  load_compiled = list(compiled)
  device = jax.devices()[0]
  about = {'load_compiled': load_compiled, 'load_cpu_s': load_cpu_s,
           'bytes': os.path.getsize(export),
           'device': f'{device.device_kind} ({device.platform}) x '
                     f'{jax.device_count()}', 'jax': jax.__version__}
  if load_only:
    return {'stamps': stamps, **about}
  labels = (np.arange(batch) % pipe.num_classes if pipe.num_classes
            else None)
  images, codes = pipe.sample(labels=labels, n=batch, key=0)
  stamps['first_image'] = time.time()
  first_compiled = compiled[len(load_compiled):]
  compile_s = seconds[_COMPILE_EVENT]
  trace_s = sum(seconds[e] for e in _TRACE_EVENTS)
  hits, misses = counts[_HIT_EVENT], counts[_MISS_EVENT]
  pipe.sample(labels=labels, n=batch, key=1)
  stamps['second_image'] = time.time()
  return {'stamps': stamps, 'compile_s': compile_s, 'trace_s': trace_s,
          'cache_hits': hits, 'cache_misses': misses, **about,
          'first_compiled': first_compiled,
          # Recompilations would show here: the same shapes, the same code.
          'second_compiled': compiled[len(load_compiled) + len(
              first_compiled):],
          'image_shape': list(images.shape),
          'codes_sum': [int(np.sum(c, dtype=np.int64)) for c in codes]}


def run_once(export: str, cache_dir: str, batch: int, timeout: int,
             load_only: bool = False) -> dict[str, Any]:
  """One measured process; its figures in seconds from its start."""
  command = [sys.executable, '-m', 'experiments.first_image', '--child',
             f'--export={export}', f'--cache_dir={cache_dir}',
             f'--batch={batch}', f'--load_only={load_only}']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  if not cache_dir:  # 'off' means no cache, even one the environment names.
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (root, env.get('PYTHONPATH', '')) if p)
  start = time.time()
  done = subprocess.run(command, cwd=root, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  end = time.time()
  lines = [l for l in done.stdout.splitlines() if l.startswith(_RESULT)]
  if done.returncode or not lines:
    raise RuntimeError(f'The measured process failed ({done.returncode}):\n'
                       + done.stderr[-3000:])
  result = json.loads(lines[-1][len(_RESULT):])
  stamps = result.pop('stamps')
  for name, stamp in stamps.items():
    result[f'{name}_s'] = stamp - start
  result['load_s'] = stamps['loaded'] - stamps['imported']
  result['load_mb_per_s'] = result['bytes'] / 1e6 / result['load_s']
  if 'second_image' in stamps:
    result['second_image_s'] = stamps['second_image'] - stamps['first_image']
  result['process_s'] = end - start
  return result


def _dir_size(path: str) -> tuple[int, int]:
  """(files, bytes) under `path`."""
  files = size = 0
  for parent, _, names in os.walk(path):
    for name in names:
      files += 1
      size += os.path.getsize(os.path.join(parent, name))
  return files, size


def measure(export: str, runs: list[str], batch: int, cache_dir: str,
            timeout: int, load_only: bool = False) -> list[dict[str, Any]]:
  """The runs in order, each a fresh process; one row each."""
  rows = []
  for name in runs:
    row = {'run': name, 'batch': batch,
           **run_once(export, '' if name == 'off' else cache_dir, batch,
                      timeout, load_only)}
    if name != 'off':
      row['cache_files'], row['cache_bytes'] = _dir_size(cache_dir)
    rows.append(row)
    print(_format_row(row), flush=True)
  return rows


_COLUMNS = (  # (title, the row's field, digits after the point or None).
    ('run', 'run', None), ('batch', 'batch', None),
    ('imports s', 'imported_s', 1), ('loaded s', 'loaded_s', 1),
    ('1st image s', 'first_image_s', 1), ('load s', 'load_s', 2),
    ('load MB/s', 'load_mb_per_s', 0), ('2nd image s', 'second_image_s', 2),
    ('trace s', 'trace_s', 1), ('compile s', 'compile_s', 1),
    ('hits', 'cache_hits', None), ('misses', 'cache_misses', None),
    ('cache MB', 'cache_mb', 1))
_HEADER = 'run   ' + ' '.join(f'{title:>{len(title)}}'
                              for title, _, _ in _COLUMNS[1:])


def _format_row(row: dict[str, Any]) -> str:
  """One line of the table; '-' for what a run did not measure."""
  row = dict(row, cache_mb=row['cache_bytes'] / 1e6 if 'cache_bytes' in row
             else None)
  cells = [f'{row["run"]:5}']
  for title, field, digits in _COLUMNS[1:]:
    value = row.get(field)
    text = '-' if value is None else (
        str(value) if digits is None else f'{value:.{digits}f}')
    cells.append(f'{text:>{len(title)}}')
  return ' '.join(cells)


def _check_runs(runs: list[str]) -> None:
  unknown = [r for r in runs if r not in _RUNS_KNOWN]
  if unknown or not runs:
    raise app.UsageError(f'--runs={",".join(runs)}: use some of '
                         f'{",".join(_RUNS_KNOWN)}.')
  if 'warm' in runs and 'cold' not in runs[:runs.index('warm')]:
    raise app.UsageError('--runs: a warm run needs a cold run before it '
                         '(which fills the cache).')


def main(argv):
  del argv
  if _CHILD.value:
    result = _child(_EXPORT.value, _CACHE_DIR.value, _BATCH.value,
                    _LOAD_ONLY.value)
    print(_RESULT + json.dumps(result), flush=True)
    return
  _check_runs(_RUNS.value)
  scratch = tempfile.mkdtemp(prefix='first_image_')
  try:
    export = _EXPORT.value
    config = _SMOKE_CONFIG if _SMOKE.value else _CONFIG.value
    make = _MAKE_EXPORT.value or (
        os.path.join(scratch, 'random.msgpack') if _SMOKE.value else '')
    if make:
      made = make_export(config, make)
      print(f'Wrote {made["path"]}: random weights for {config} '
            f'({made["bytes"] / 1e6:.1f} MB, priors of '
            f'{" and ".join(f"{p:,}" for p in made["params"])} '
            f'parameters) in {made["seconds"]:.1f} s', flush=True)
      export = export or make
    if not export:
      raise app.UsageError('Nothing to time. Fix: pass --export=FILE, or '
                           '--make_export=FILE (with --config).')
    cache_dir = _CACHE_DIR.value or os.path.join(scratch, 'cache')
    if os.path.isdir(cache_dir) and os.listdir(cache_dir):
      raise app.UsageError(f'--cache_dir={cache_dir} is not empty, so a cold '
                           'run would not be cold. Fix: pass an empty or new '
                           'directory.')
    print(f'{export}: {os.path.getsize(export) / 1e6:.1f} MB; seconds from '
          'the start of a new process; compilation cache: '
          f'{cache_dir}', flush=True)
    print(_HEADER)
    print('-' * len(_HEADER))
    rows = measure(export, _RUNS.value, _BATCH.value, cache_dir,
                   _TIMEOUT.value, _LOAD_ONLY.value)
    print(f'on {rows[0]["device"]}, jax {rows[0]["jax"]}; trace s: tracing '
          'and lowering; compile s: compiling or reading back programs; '
          'hits/misses: the persistent cache\'s (0/0 without one); load '
          'MB/s: the file\'s megabytes per second of `Pipeline.load`.')
    if _JSON.value:
      with open(_JSON.value, 'w') as f:
        json.dump({'export': export, 'rows': rows}, f, indent=1)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)

r"""Memory of the programs that make an image, one program at a time.

  python -m experiments.bench_sampler_memory       # paper sizes, compiled only
  python -m experiments.bench_sampler_memory --rows=sampler_1 --top=8
  python -m experiments.bench_sampler_memory --dtype=float32 --rows=step_1
  python -m experiments.bench_sampler_memory --device_peak   # GPU/TPU: also run
  python -m experiments.bench_sampler_memory --smoke         # tiny, seconds

For the ImageNet-256 config's priors (the 242.6M-parameter 32x32 top prior
with 4 attention blocks, the 287.1M-parameter 64x64 lower prior with its
20-block conditioning stack) and VQ-VAE, in --dtype compute (float32
weights), as `experiments/accelerator_check.py` builds them, the programs
(--rows):

* sampler_<level>: the cached sampler (`sampling._build`, lowered with the
  arguments `sampling.compile_sampler` gives it), at each --batch_sizes;
* reference_<level>: the reference sampler (a whole forward pass per
  position), likewise;
* init_<level>: the jitted random init of the prior (`jax.jit(model.init)`
  on one example, as accelerator_check's check_sampler does); batch 1;
* decoder: the VQ-VAE's decoder from codes to 256x256 images;
* step_<level>: the prior trainer's own train step (what accelerator_check
  runs before the sampler, in the same process).

Each is compiled on abstract inputs (nothing is allocated, so paper sizes
compile on a small CPU) and reported from XLA's buffer assignment
(`compiled.memory_analysis()`): arguments, outputs, donated (aliased)
outputs, temporaries, and the peak = arguments + outputs - aliased +
temporaries, in GiB; and the largest arrays the program materialises
(instructions outside fusions in `compiled.as_text()`; --top lists more).

--device_peak (an accelerator; with --smoke also a CPU, which reports no
figures) runs each program once, with zero inputs, in a new process of its
own, and adds the device's own `peak_bytes_in_use` after compiling and after
running: the figure is the process's peak since it started, so one process
per program keeps an earlier program's peak out of the next one's row, and
the compile column shows what compiling alone allocated (most likely
XLA:GPU's autotuning of convolutions, whose buffers come from the same
device allocator).

What was found (issue 29), GiB. XLA:CPU, compiled only (bfloat16 compute;
float32 in brackets; XLA:CPU computes bfloat16 in float32, hence its larger
bfloat16 temporaries): sampler_0 1.83 (0.93) at batch 1, 2.31 (1.31) at 16;
sampler_1 2.15 (1.10) and 2.48 (1.52) (the weights: 0.90 and 1.07 GiB);
init_0 2.09, init_1 2.47; the decoder 0.01 and 0.14; step_1 8.06
(8.29) and 44.74 (55.09). On an H200 (jax 0.11.2, bfloat16 compute,
--device_peak's method by hand): the samplers of both levels, two images
and the decoding peaked at 2.61 GiB at batch 1 and 2.83 GiB at batch 16,
1.97 GiB of it the weights; a jitted init, 0.90 GiB, but each compiled for
about 75 s. The lower prior's train step at batch 16: 27.0 GiB in bfloat16;
in float32 the device's peak reached 67.4 GiB (72.4 GB) while it compiled,
with 4.3 GiB in use and before it ran (XLA's own figure for running it:
41.8 GiB). That matches the 72 GB read after a batch-1 sampler check: most
likely the peak of an earlier program of the same process (the float32
step compiling), not the sampler's, which stays under 3 GiB.
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import compiled_steps
from vqvae2_jax import builders
from vqvae2_jax import parallel
from vqvae2_jax import sampling

_ROWS = flags.DEFINE_list(
    'rows', ['sampler_0', 'sampler_1', 'init_0', 'init_1', 'decoder',
             'step_1'],
    'Programs: sampler_<level>, reference_<level>, init_<level>, decoder, '
    'step_<level> (0 = the 32x32 top prior).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'],
                                 'Batch sizes (init rows: always 1).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'Compute dtype (weights stay float32).')
_TOP = flags.DEFINE_integer('top', 1, 'Largest arrays listed per program.')
_DEVICE_PEAK = flags.DEFINE_bool(
    'device_peak', False, 'Also run each program once in its own process '
    'and read the device\'s peak (GPU/TPU; CPU only with --smoke).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny models (the tests).')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows (bytes) here.')
# Internal: measure one 'row:batch' in this process and print it as JSON.
_ONE = flags.DEFINE_string('one', '', 'Measure one row:batch (internal).')

_RESULT = 'SAMPLER_MEMORY_RESULT '
def config_for(smoke: bool, dtype: str):
  """The paper's config (or the toy one) in `dtype` compute."""
  config = (compiled_steps.smoke_config() if smoke
            else compiled_steps.paper_config())
  config.model.dtype = config.prior.dtype = dtype
  return config


def _prior_inputs(config, level: int):
  model = builders.build_prior(config, level)
  codes, cond, labels = builders.prior_init_inputs(
      level, builders.level_shapes(config), model.num_classes)
  init = lambda key: model.init(key, codes, cond_codes=cond, labels=labels,
                                train=False)
  return model, init


def lower_row(row: str, config, batch: int
              ) -> tuple[jax.stages.Lowered, Any]:
  """One program lowered on abstract inputs.

  Returns:
    (lowered program, its positional arguments: `jax.ShapeDtypeStruct`s, and
    the few small concrete ones the program is given as they are).
  """
  kind, _, level = row.partition('_')
  shapes = builders.level_shapes(config)
  if kind in ('sampler', 'reference'):
    level = int(level)
    model, init = _prior_inputs(config, level)
    variables = jax.eval_shape(init, jax.random.key(0))
    shape = (batch, *shapes[level])
    cond = tuple(jax.ShapeDtypeStruct((batch, *s), jnp.int32)
                 for s in shapes[:level])
    labels = (jax.ShapeDtypeStruct((batch,), jnp.int32)
              if model.num_classes else None)
    # The arguments `sampling.compile_sampler` gives the sampler.
    args = (variables, jax.random.key(0),
            jax.ShapeDtypeStruct((batch,), jnp.int32), cond, labels,
            jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0),
            jnp.float32(1.0))  # temperature, top_k, top_p, guidance.
    if kind == 'reference':
      args += (jnp.int32(0),)
    # pylint: disable-next=protected-access
    fn = sampling._build(model, shape, kind == 'reference', None)
    return fn.lower(*args), args
  if kind == 'init':
    _, init = _prior_inputs(config, int(level))
    args = (jax.random.key(0),)
    return jax.jit(init).lower(*args), args
  if row == 'decoder':
    vqvae = builders.build_vqvae(config)
    variables = jax.eval_shape(lambda key: vqvae.init(
        {'params': key, 'vq': key}, builders.vqvae_init_inputs(config),
        train=False), jax.random.key(0))
    codes = [jax.ShapeDtypeStruct((batch, *s), jnp.int32) for s in shapes]
    decode = jax.jit(lambda v, c: vqvae.apply(v, c,
                                              method=vqvae.decode_codes))
    return decode.lower(variables, codes), (variables, codes)
  if kind == 'step':
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    lowered, _ = compiled_steps.lower_step(f'prior_{level}', config, batch,
                                           mesh)
    positional, _ = lowered.args_info
    return lowered, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), positional,
        is_leaf=lambda x: isinstance(x, jax.stages.ArgInfo))
  raise ValueError(f'Unknown row {row!r}. Fix: use sampler_<level>, '
                   'reference_<level>, init_<level>, decoder or step_<level>.')


def _zeros(abstract: Any) -> Any:
  """`abstract` with zeros (PRNG keys: key 0) for its abstract leaves."""

  def zero(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x  # Already concrete (the sampler's controls and key).
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.split(jax.random.key(0), x.shape) if x.shape else (
          jax.random.key(0))
    return jnp.zeros(x.shape, x.dtype)

  return jax.tree.map(zero, abstract)


def _device_peak() -> Optional[int]:
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def measure(row: str, config, batch: int, top: int,
            run: bool = False) -> dict[str, Any]:
  """XLA's figures of one program (and, with `run`, the device's own).

  Returns:
    {'row', 'batch', 'arguments', 'outputs', 'aliased', 'temporaries',
    'peak', 'compile_s', 'largest': [[bytes, what, count]], and with `run`
    'device_peak_compile', 'device_peak_run' (None where not reported)},
    sizes in bytes.
  """
  start = time.perf_counter()
  lowered, args = lower_row(row, config, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  out = {'row': row, 'batch': batch,
         'arguments': m.argument_size_in_bytes,
         'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes,
         'temporaries': m.temp_size_in_bytes,
         'peak': compiled_steps.peak_bytes(compiled)['peak'],
         'compile_s': compile_s,
         'largest': [list(x) for x in compiled_steps.largest_arrays(compiled.as_text(),
                                                     top)]}
  if run:
    out['device_peak_compile'] = _device_peak()
    jax.block_until_ready(compiled(*_zeros(args)))
    out['device_peak_run'] = _device_peak()
  return out


def measure_in_new_process(row: str, batch: int, smoke: bool, dtype: str,
                           top: int) -> dict[str, Any]:
  """`measure(..., run=True)` in a new process: its peaks are its own."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (root, env.get('PYTHONPATH', '')) if p)
  command = [sys.executable, '-m', 'experiments.bench_sampler_memory',
             f'--one={row}:{batch}', f'--dtype={dtype}', f'--top={top}',
             f'--smoke={smoke}']
  done = subprocess.run(command, cwd=root, env=env, capture_output=True,
                        text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith(_RESULT)]
  if done.returncode or not lines:
    raise RuntimeError(f'{row} at batch {batch} failed in its process '
                       f'({done.returncode}):\n{done.stderr[-3000:]}')
  return json.loads(lines[-1][len(_RESULT):])


def row_map(row: str, config) -> str:
  """'HxW' of a prior's map, 'HxWxC' of the decoder's images."""
  if row == 'decoder':
    size = config.data.image_size
    return f'{size}x{size}x{config.data.channels}'
  h, w = builders.level_shapes(config)[int(row.split('_')[1])]
  return f'{h}x{w}'


def _gib(x: Optional[float]) -> str:
  return '-' if x is None else f'{x / compiled_steps.GIB:.2f}'


def main(argv):
  del argv
  config = config_for(_SMOKE.value, _DTYPE.value)
  if _ONE.value:
    row, _, batch = _ONE.value.partition(':')
    result = measure(row, config, int(batch), _TOP.value, run=True)
    print(_RESULT + json.dumps(result), flush=True)
    return
  device = jax.devices()[0]
  if _DEVICE_PEAK.value and device.platform == 'cpu' and not _SMOKE.value:
    raise app.UsageError(
        '--device_peak runs every program, and a CPU reports no device '
        'peak. Fix: run it on a GPU or TPU (or with --smoke, to try it).')
  print(f'jax {jax.__version__}, {device.device_kind} ({device.platform}), '
        f'{_DTYPE.value} compute; XLA\'s buffers of each compiled program '
        '(GiB)' + (', and the device\'s own peak, one process per program'
                   if _DEVICE_PEAK.value else ''))
  header = (f'{"program":12} {"map":>9} {"batch":>5} {"args":>6} '
            f'{"out":>6} {"alias":>6} {"temp":>6} {"peak":>6} '
            f'{"compile s":>9}'
            + (f' {"dev compile":>11} {"dev run":>7}'
               if _DEVICE_PEAK.value else '') + '  largest array')
  print(header)
  print('-' * len(header))
  rows = []
  for row in _ROWS.value:
    batches = [1] if row.startswith('init_') else sorted(
        {int(b) for b in _BATCH_SIZES.value})
    for batch in batches:
      if _DEVICE_PEAK.value:
        r = measure_in_new_process(row, batch, _SMOKE.value, _DTYPE.value,
                                   _TOP.value)
      else:
        r = measure(row, config, batch, _TOP.value)
      rows.append(r)
      largest = [f'{size / 2**20:.1f} MiB {what}' + (f' (x{n})' if n > 1
                                                       else '')
                 for size, what, n in r['largest']]
      print(f'{row:12} {row_map(row, config):>9} {batch:>5} '
            f'{_gib(r["arguments"]):>6} {_gib(r["outputs"]):>6} '
            f'{_gib(r["aliased"]):>6} {_gib(r["temporaries"]):>6} '
            f'{_gib(r["peak"]):>6} {r["compile_s"]:>9.1f}'
            + (f' {_gib(r["device_peak_compile"]):>11} '
               f'{_gib(r["device_peak_run"]):>7}' if _DEVICE_PEAK.value
               else '')
            + '  ' + (largest[0] if largest else '-'), flush=True)
      for line in largest[1:]:
        print(f'{"":>88}{line}' if _DEVICE_PEAK.value else f'{"":>68}{line}')
  print('peak = args + out - alias + temp (XLA\'s buffer assignment; '
        'compiled, not run). dev compile / dev run: the device\'s '
        'peak_bytes_in_use after compiling / after one run, in a process '
        'of its own.')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'dtype': _DTYPE.value, 'smoke': _SMOKE.value,
                 'device_kind': device.device_kind, 'rows': rows}, f,
                indent=1)


if __name__ == '__main__':
  app.run(main)

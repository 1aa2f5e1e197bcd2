r"""Peak memory of the paper-size train steps, with and without remat.

  python -m experiments.bench_memory
  python -m experiments.bench_memory --rows=prior_1 --batch_sizes=1,16
  python -m experiments.bench_memory --compile_remat   # XLA:CPU with remat
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m experiments.bench_memory --rows=prior_0 --fsdp=8
  python -m experiments.bench_memory --smoke   # tiny models, seconds

For the train step that `--mode=vqvae` or `--mode=prior` runs with the
ImageNet-256 config (the paper's sizes: the 242.6M-parameter 32x32 top
prior, the 64x64 lower prior with its conditioning stack, the 256x256
VQ-VAE), at each per-device batch size, one device's memory:

* XLA:CPU: the compiled step's buffers (`compiled.memory_analysis()`;
  compiled, never run, so sizes beyond this machine's memory are fine):
  the arguments (train state and batch), the temporaries and the peak,
  arguments + outputs - donated aliases + temporaries. XLA:CPU does not
  honour remat: its scheduler recomputes the rematerialized blocks right
  after the forward pass, so its figures with remat equal those without
  (`--compile_remat` shows it; on a toy 10-layer chain with and without
  `jax.checkpoint`: 484.5 MiB both). They are the without-remat figures.
* kept: what the program keeps from the forward pass for the backward pass
  (JAX's residuals of the loss, computed on shapes, before any backend),
  without and with remat, and the most one block keeps (what a
  rematerialized block holds while it is recomputed and differentiated).
* est. peak: XLA:CPU's peak at per-device batch 1 without remat (state,
  gradients, optimizer temporaries, one example's activations) + kept (+ one
  block with remat): what an accelerator whose compiler honours remat
  (TPU, GPU) needs, conservatively (the batch-1 activations count twice; at
  batch 16 without remat it is 14% above XLA:CPU's own figure, which fuses
  some intermediates away).

With `--fsdp=n` the mesh is (data=1, fsdp=n) over n devices (fake CPU
devices through XLA_FLAGS, as above): the state is split n ways (see
`parallel.state_shardings`), the global batch is n times the per-device batch,
and the figures are per device.
"""

import json
import time
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections

from experiments import compiled_steps
from vqvae2_jax import builders
from vqvae2_jax import parallel

_ROWS = flags.DEFINE_list(
    'rows', ['prior_0', 'vqvae'],
    'Steps to compile: prior_<level> (0 = the 32x32 top prior) or vqvae.')
_BATCH_SIZES = flags.DEFINE_list(
    'batch_sizes', ['1', '8', '16', '32'], 'Per-device batch sizes.')
_FSDP = flags.DEFINE_integer(
    'fsdp', 1, 'Devices on the fsdp axis (the mesh is (1, fsdp)).')
_SMOKE = flags.DEFINE_bool(
    'smoke', False, 'Tiny models of the same architecture (for the tests).')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows (bytes) here.')
_COMPILE_REMAT = flags.DEFINE_bool(
    'compile_remat', False, 'Also compile each step with remat (XLA:CPU '
    'gives the same figures as without).')

def measure(row: str, config: ml_collections.ConfigDict, batch: int,
            mesh: jax.sharding.Mesh, compile_remat: bool) -> dict[str, Any]:
  """One row and per-device batch: XLA:CPU's figures and the kept bytes.

  Returns:
    {'row', 'batch', 'params', 'compile_s', 'arguments', 'temporaries',
    'peak' (XLA:CPU, without remat), 'peak_remat' (XLA:CPU with remat, or
    None), 'kept', 'kept_remat', 'block'} in bytes.
  """
  out = {'row': row, 'batch': batch, 'peak_remat': None}
  for remat in ((False, True) if compile_remat else (False,)):
    config = config.copy_and_resolve_references()
    config.model.remat = config.prior.remat = remat
    start = time.perf_counter()
    lowered, params = compiled_steps.lower_step(row, config,
                                                batch * mesh.size, mesh)
    memory = compiled_steps.peak_bytes(lowered.compile())
    if remat:
      out['peak_remat'] = memory['peak']
    else:
      out.update(params=params, compile_s=time.perf_counter() - start,
                 **memory)
  for remat in (False, True):
    config = config.copy_and_resolve_references()
    config.model.remat = config.prior.remat = remat
    kept = compiled_steps.kept_bytes(row, config, batch)
    out['kept_remat' if remat else 'kept'] = kept['kept']
    out['block'] = kept['block']
  return out


def row_shape(row: str, config: ml_collections.ConfigDict) -> str:
  """'HxW' of a prior's code map, 'HxWxC' of the VQ-VAE's images."""
  if row == 'vqvae':
    size = config.data.image_size
    return f'{size}x{size}x{config.data.channels}'
  h, w = builders.level_shapes(config)[int(row.split('_')[1])]
  return f'{h}x{w}'


def main(argv):
  del argv
  config = (compiled_steps.smoke_config() if _SMOKE.value
            else compiled_steps.paper_config())
  fsdp = _FSDP.value
  if fsdp > jax.device_count():
    raise app.UsageError(
        f'--fsdp={fsdp} but JAX sees {jax.device_count()} device(s). Fix: '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={fsdp} (on CPU).')
  mesh = parallel.create_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': fsdp}), devices=jax.devices()[:fsdp])
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, mesh '
        f'{dict(mesh.shape)}; per-device figures from XLA\'s buffer '
        'assignment (compiled, not run)')
  header = (f'{"step":8} {"map":>11} {"params":>12} {"batch/dev":>9} '
            f'{"state GiB":>9} {"XLA:CPU peak":>12} {"kept":>6} '
            f'{"kept remat":>10} {"block":>6} {"est. peak":>9} '
            f'{"est. remat":>10} {"remat fits 16":>13}')
  print(header)
  print('-' * len(header))
  results = []
  gib = lambda x: f'{x / compiled_steps.GIB:.2f}'
  for row in _ROWS.value:
    base = None  # XLA:CPU's peak at per-device batch 1.
    for batch in sorted({1, *(int(b) for b in _BATCH_SIZES.value)}):
      r = measure(row, config, batch, mesh, _COMPILE_REMAT.value)
      base = base or r['peak']
      r['estimate'] = base + r['kept']
      r['estimate_remat'] = base + r['kept_remat'] + r['block']
      results.append(r)
      fits = ('yes' if r['estimate_remat'] <= compiled_steps.TPU_V3_CORE
              else 'no')
      print(f'{row:8} {row_shape(row, config):>11} {r["params"]:>12,} '
            f'{batch:>9} {gib(r["arguments"]):>9} {gib(r["peak"]):>12} '
            f'{gib(r["kept"]):>6} {gib(r["kept_remat"]):>10} '
            f'{gib(r["block"]):>6} {gib(r["estimate"]):>9} '
            f'{gib(r["estimate_remat"]):>10} {fits:>13}'
            + (f'  (XLA:CPU with remat: {gib(r["peak_remat"])})'
               if r['peak_remat'] is not None else ''), flush=True)
  print('GiB per device. state: params, Adam moments, Polyak weights '
        '(priors), codebook statistics (VQ-VAE) and the batch; XLA:CPU peak: '
        'compiled step without remat; kept: kept for the backward pass '
        'without / with remat; block: the most one block keeps; est. peak: '
        'XLA:CPU peak at batch 1 + kept (+ block with remat). 16 GiB: one '
        'TPU v3 core.')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'mesh': dict(mesh.shape), 'rows': results}, f, indent=1)


if __name__ == '__main__':
  app.run(main)

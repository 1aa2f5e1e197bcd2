r"""The paper-size steps and sampler on an accelerator: speed, memory, MFU.

  python -m experiments.accelerator_check                 # GPU or TPU
  python -m experiments.accelerator_check --remat --prior_batch=32
  python -m experiments.accelerator_check --smoke         # CPU, seconds

Runs, in bfloat16 compute (float32 params), on the first device JAX sees:

* stage 1: the VQ-VAE train step of the ImageNet-256 config (256x256x3
  images) at --vqvae_batch: images/s;
* stage 2: the train step of each level's prior (32x32 top, 242.6M
  parameters; 64x64 lower with its conditioning stack) at --prior_batch:
  codes/s;
* stage 3: the cached sampler of both levels at --sample_batch, then
  decoding: seconds per 256x256 image.

For each, the peak memory (XLA's buffer assignment of the compiled program,
`compiled.memory_analysis()`, and the device's own peak where it reports
one) and the model FLOP utilisation: the program's FLOPs, counted on its
lowered module (`lowered.cost_analysis()`; the compiled program's count
omits XLA:GPU's cuDNN convolutions), per second over the chip's peak dense
bfloat16 FLOP/s from `PEAK_BF16_FLOPS` (by `device_kind`; unknown kinds, CPUs
included, are reported without MFU). The sampler's FLOPs per call are the
scan body's, which XLA counts once, so the sampler gets no MFU. Weights are
random: speed does not depend on them.

`--smoke` runs the same code on toy sizes (64x64 images) in a few seconds
on a CPU, which the tests do.
"""

import json
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import imagenet256
from experiments import compiled_steps
from vqvae2_jax import builders
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax.train import prior_trainer
from vqvae2_jax.train import vqvae_trainer

_SMOKE = flags.DEFINE_bool('smoke', False, 'Toy sizes (CPU, seconds).')
_VQVAE_BATCH = flags.DEFINE_integer('vqvae_batch', 32, 'Stage-1 batch.')
_PRIOR_BATCH = flags.DEFINE_integer('prior_batch', 16, 'Prior batch.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 16,
                                     'Images sampled at once.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps per stage.')
_REMAT = flags.DEFINE_bool('remat', False, 'Rematerialize (less memory).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'Compute dtype of every stage.')
_JSON = flags.DEFINE_string('json', '', 'Also write the results here.')

# Peak dense bfloat16 FLOP/s of one JAX device, by a substring of its
# device_kind (first match wins), from the vendors' data sheets. A TPU v2/v3
# JAX device is one core (half a chip); v4 and later are one chip.
PEAK_BF16_FLOPS = (
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('TPU v6 lite', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('TPU v3', 61.5e12),
    ('TPU v2', 22.5e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  """The device's peak bf16 FLOP/s, or None for a kind not in the table."""
  for key, flops in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return None


def lowered_flops(lowered: jax.stages.Lowered) -> Optional[float]:
  """FLOPs of one call of a program, counted on its lowered module.

  The lowered (pre-optimisation) module still has every convolution and dot
  as an HLO op, so XLA's cost analysis counts 2 FLOPs per multiply-add of
  each (padding taps excluded) plus one per element of the elementwise ops.
  The compiled program's count is not used: XLA:GPU leaves out the
  convolutions it runs as cuDNN custom calls (2.59 GFLOP for the paper-size
  stage-1 step, whose lowered module counts 0.876 TFLOP).

  Args:
    lowered: `jax.jit(f).lower(*args)`.

  Returns:
    The FLOPs, or None where the backend gives no positive count.
  """
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def device_peak_bytes(device: jax.Device) -> Optional[int]:
  """The device's own peak allocation so far (GPU/TPU), or None."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def timed_calls(fn: Callable[[], Any], calls: int) -> float:
  """Seconds per call of `fn` over `calls` calls, after one warm-up call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / max(calls, 1)


def config_for(smoke: bool, dtype: str, remat: bool
               ) -> ml_collections.ConfigDict:
  """The paper's config (or the toy one) with the dtype and remat set."""
  config = (compiled_steps.smoke_config() if smoke
            else imagenet256.get_config())
  config.model.dtype = config.prior.dtype = dtype
  config.model.remat = config.prior.remat = remat
  return config


def _random_batch(config: ml_collections.ConfigDict, stage: str, batch: int,
                  level: int = 0) -> dict[str, Any]:
  """Random images (stage 'vqvae') or codes and labels of levels 0..level."""
  rng = np.random.default_rng(0)
  if stage == 'vqvae':
    return {'image': rng.uniform(
        -1, 1, (batch, *builders.image_shape(config))).astype(np.float32)}
  k = config.model.num_embeddings
  return {'codes': [rng.integers(0, k, (batch, *s), dtype=np.int32)
                    for s in builders.level_shapes(config)[:level + 1]],
          'label': rng.integers(0, max(config.data.num_classes, 1), batch,
                                dtype=np.int32)}


def check_step(name: str, config: ml_collections.ConfigDict, stage: str,
               batch: int, steps: int, mesh: Any, level: int = 0
               ) -> dict[str, Any]:
  """Compiles and times a trainer's own train step on one device."""
  if stage == 'vqvae':
    progs = vqvae_trainer.programs(config, mesh)
    per_example = 1
  else:
    progs = prior_trainer.programs(config, level, mesh)
    h, w = builders.level_shapes(config)[level]
    per_example = h * w
  state = progs.init(jax.random.PRNGKey(0))
  data = parallel.shard_batch(_random_batch(config, stage, batch, level),
                              mesh)
  start = time.perf_counter()
  lowered = progs.train_step.lower(state, data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], data)
    return metrics

  seconds = timed_calls(step, steps)
  return {'name': name, 'batch': batch, 'seconds': seconds,
          'throughput': batch * per_example / seconds,
          'unit': 'img/s' if stage == 'vqvae' else 'codes/s',
          'flops': lowered_flops(lowered), 'compile_s': compile_s,
          'xla_peak_bytes': compiled_steps.peak_bytes(compiled)['peak']}


def check_sampler(config: ml_collections.ConfigDict, batch: int
                  ) -> dict[str, Any]:
  """Seconds per image: both levels' cached samplers and the decoder."""
  shapes = builders.level_shapes(config)
  priors = []
  for level in range(len(shapes)):
    model = builders.build_prior(config, level)
    codes, cond, labels = builders.prior_init_inputs(
        level, shapes, model.num_classes)
    variables = jax.jit(lambda key, m=model, c=codes, u=cond, y=labels: m.init(
        key, c, cond_codes=u, labels=y, train=False))(jax.random.key(level))
    priors.append((model, variables))
  vqvae = builders.build_vqvae(config)
  vq_vars = jax.jit(lambda key: vqvae.init(
      {'params': key, 'vq': key}, builders.vqvae_init_inputs(config),
      train=False))(jax.random.key(9))
  decode = jax.jit(lambda v, c: vqvae.apply(v, c, method=vqvae.decode_codes))
  labels = jnp.arange(batch, dtype=jnp.int32) % max(
      config.data.num_classes, 1)

  def sample_images():
    codes = sampling.sample_hierarchy(
        priors, shapes, batch_size=batch, labels=labels,
        rng=jax.random.key(1))
    return decode(vq_vars, codes)

  start = time.perf_counter()
  jax.block_until_ready(sample_images())  # Compiles every part.
  compile_s = time.perf_counter() - start
  seconds = timed_calls(sample_images, 1)
  return {'name': 'sampler + decode', 'batch': batch, 'seconds': seconds,
          'throughput': seconds / batch, 'unit': 's/image', 'flops': None,
          'compile_s': compile_s, 'xla_peak_bytes': None}


def run(smoke: bool, dtype: str, remat: bool, vqvae_batch: int,
        prior_batch: int, sample_batch: int, steps: int) -> dict[str, Any]:
  """Every check on the first device; returns the device and the rows."""
  device = jax.devices()[0]
  mesh = parallel.create_mesh(devices=[device])
  config = config_for(smoke, dtype, remat)
  peak = peak_flops(device.device_kind)
  rows = [check_step('stage 1 train step', config, 'vqvae', vqvae_batch,
                     steps, mesh)]
  for level in range(builders.num_levels(config)):
    rows.append(check_step(f'prior {level} train step', config, 'prior',
                           prior_batch, steps, mesh, level))
  rows.append(check_sampler(config, sample_batch))
  for row in rows:
    achieved = row['flops'] / row['seconds'] if row['flops'] else None
    row['tflops_per_s'] = achieved / 1e12 if achieved else None
    row['mfu'] = achieved / peak if achieved and peak else None
  return {'device_kind': device.device_kind, 'platform': device.platform,
          'peak_bf16_flops': peak, 'dtype': dtype, 'remat': remat,
          'smoke': smoke, 'device_peak_bytes': device_peak_bytes(device),
          'rows': rows}


def _fmt(x: Optional[float], spec: str) -> str:
  """`x` formatted by `spec` (a trailing '%' is printed, not applied)."""
  if x is None:
    return '-'
  if spec.endswith('%'):
    return format(x, spec[:-1]) + '%'
  return format(x, spec)


def main(argv):
  del argv
  result = run(_SMOKE.value, _DTYPE.value, _REMAT.value, _VQVAE_BATCH.value,
               _PRIOR_BATCH.value, _SAMPLE_BATCH.value, _STEPS.value)
  peak = result['peak_bf16_flops']
  print(f'jax {jax.__version__}, {jax.device_count()} device(s), using one: '
        f'{result["device_kind"]} ({result["platform"]}); peak bf16 '
        + (f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown: no MFU')
        + f'; {result["dtype"]} compute, remat '
        f'{"on" if result["remat"] else "off"}'
        + (', smoke sizes' if result['smoke'] else ''))
  header = (f'{"what":20} {"batch":>5} {"s/call":>9} {"throughput":>18} '
            f'{"TFLOP/call":>10} {"TFLOP/s":>8} {"MFU":>6} '
            f'{"XLA peak GiB":>12} {"compile s":>9}')
  print(header)
  print('-' * len(header))
  for r in result['rows']:
    peak_gib = (r['xla_peak_bytes'] / compiled_steps.GIB
                if r['xla_peak_bytes'] else None)
    print(f'{r["name"]:20} {r["batch"]:>5} {r["seconds"]:>9.4f} '
          f'{r["throughput"]:>10,.3f} {r["unit"]:>7} '
          f'{_fmt(r["flops"] and r["flops"] / 1e12, ".3f"):>10} '
          f'{_fmt(r["tflops_per_s"], ".2f"):>8} '
          f'{_fmt(r["mfu"] and 100 * r["mfu"], ".1f%"):>6} '
          f'{_fmt(peak_gib, ".2f"):>12} {r["compile_s"]:>9.1f}', flush=True)
  device_peak = result['device_peak_bytes']
  print('device peak memory in use: '
        + (f'{device_peak / compiled_steps.GIB:.2f} GiB' if device_peak
           else 'not reported by this device'))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)

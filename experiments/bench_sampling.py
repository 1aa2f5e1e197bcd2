r"""Seconds per sampled code map: cached sampler vs. reference sampler.

  python -m experiments.bench_sampling
  python -m experiments.bench_sampling --rows=top32 --batch_sizes=1

Rows (reduced ImageNet-256 priors that fit a 2-core CPU; the paper's are
512 channels x 20 blocks):

* top32: the 32x32 top prior: K=512, 1000 classes, 128 channels, 10 gated
  blocks, filter 5, 4 causal attention blocks of 8 heads among them.
* lower64: the 64x64 lower prior: K=512, 1000 classes, 64 channels, 6 gated
  blocks, filter 5, a 4-block conditioning stack over the 32x32 top codes.

Both samplers run jitted and are compiled ahead of the timed call
(`sampling.compile_sampler`; compile time is reported apart). The cached
sampler is timed on calls sampling whole maps. The reference sampler reruns
the full prior at every position, so each of its steps costs the same; it is
timed on the first --reference_positions positions and scaled to the whole
map (h * w positions). Each time is the fastest of --repeats calls. Weights
are random (timing does not depend on them); float32 on one CPU device.
"""

import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import sampling
from vqvae2_jax.models import pixelcnn

_ROWS = flags.DEFINE_list('rows', ['top32', 'lower64'], 'Rows to measure.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'],
                                 'Batch sizes to measure.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'Timed calls of each sampler; the fastest counts.')
_REFERENCE_POSITIONS = flags.DEFINE_integer(
    'reference_positions', 3, 'Positions the reference sampler is timed on.')

ROWS = {
    'top32': dict(
        shape=(32, 32), upper=(),
        prior=dict(num_embeddings=512, num_channels=128, num_layers=10,
                   filter_size=5, dropout_rate=0.1, attention_layers=4,
                   num_heads=8, num_classes=1000, cond_num_embeddings=(),
                   cond_stack_blocks=0, num_output_layers=1)),
    'lower64': dict(
        shape=(64, 64), upper=((32, 32),),
        prior=dict(num_embeddings=512, num_channels=64, num_layers=6,
                   filter_size=5, dropout_rate=0.1, attention_layers=0,
                   num_heads=8, num_classes=1000, cond_num_embeddings=(512,),
                   cond_stack_blocks=4, num_output_layers=1)),
}


def _timed(fn, repeats: int = 1) -> float:
  """The fastest of `repeats` calls, in seconds (shared cores add noise)."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure(name: str, batch: int, reference_positions: int
            ) -> dict[str, Any]:
  """Seconds per map of both samplers for one row and batch size."""
  row = ROWS[name]
  model = pixelcnn.PixelCNNPrior(**row['prior'])
  shape = (batch, *row['shape'])
  rng = np.random.default_rng(0)
  cond = tuple(jnp.asarray(rng.integers(0, 512, (batch, *s)), jnp.int32)
               for s in row['upper'])
  labels = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, *row['shape']), jnp.int32),
      cond_codes=tuple(c[:1] for c in cond), labels=labels[:1],
      train=False))(jax.random.key(0))
  params = sum(x.size for x in jax.tree.leaves(variables))
  kwargs = dict(shape=shape, cond_codes=cond, labels=labels,
                rng=jax.random.key(1))

  compile_kwargs = dict(shape=shape, cond_codes=cond, labels=labels)
  compile_cached = _timed(lambda: sampling.compile_sampler(
      model, variables, **compile_kwargs))
  repeats = _REPEATS.value
  cached_s = _timed(lambda: sampling.sample_level(model, variables, **kwargs),
                    repeats)

  compile_reference = _timed(lambda: sampling.compile_sampler(
      model, variables, **compile_kwargs, reference=True))
  n = min(reference_positions, shape[1] * shape[2])
  step_s = _timed(lambda: sampling.reference_sample_level(
      model, variables, **kwargs, num_positions=n), repeats) / n
  reference_s = step_s * shape[1] * shape[2]
  return dict(row=name, batch=batch, params=params, cached_s=cached_s / batch,
              reference_s=reference_s / batch, ratio=reference_s / cached_s,
              reference_step_s=step_s, compile_s=compile_cached,
              reference_compile_s=compile_reference)


def main(argv):
  del argv
  reference_positions = _REFERENCE_POSITIONS.value
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at '
        'start (other processes share these cores)')
  print(f'Reference sampler timed on the first {reference_positions} positions '
        'of each map and scaled to h*w positions (every step reruns the whole '
        f'prior, so each costs the same). Each time is the fastest of '
        f'{_REPEATS.value} calls.')
  header = (f'{"row":8} {"batch":>5} {"params":>9} {"cached s/map":>13} '
            f'{"reference s/map":>16} {"ratio":>8} {"ref s/step":>11} '
            f'{"compile s":>10} {"ref compile s":>14}')
  print(header)
  print('-' * len(header))
  for name in _ROWS.value:
    if name not in ROWS:
      raise ValueError(f'Unknown row {name!r}; choose from {sorted(ROWS)}.')
    for batch in _BATCH_SIZES.value:
      r = measure(name, int(batch), reference_positions)
      print(f'{r["row"]:8} {r["batch"]:>5} {r["params"]:>9,} '
            f'{r["cached_s"]:>13.3f} {r["reference_s"]:>16.1f} '
            f'{r["ratio"]:>7.0f}x {r["reference_step_s"]:>11.3f} '
            f'{r["compile_s"]:>10.1f} {r["reference_compile_s"]:>14.1f}',
            flush=True)
  print('s/map: seconds per sampled map (batch time / batch); ratio: '
        'reference / cached; ref s/step: one reference position for the whole '
        'batch; compile s: of the cached / reference sampler.')
  print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
  app.run(main)

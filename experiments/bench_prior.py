r"""Train-step throughput of the PixelCNN priors on this machine.

  python -m experiments.bench_prior
  python -m experiments.bench_prior --models=fashion_mnist_0 --batch_sizes=1,64

A batch that does not fit in memory prints a row saying so (the ImageNet-256
top prior needs about 39 GB at batch 32) and the table goes on.

Times the jitted, sharded prior train step (forward, backward, Adam, Polyak
update) of the Fashion-MNIST priors (each level) and of the ImageNet-256 top
prior (32x32 codes, 512 channels, 20 layers, 4 attention layers of 8 heads)
on random codes, and prints codes/s (code positions per second of training),
the wall and CPU seconds per step (CPU seconds, summed over threads, stay
meaningful on a machine shared with other jobs) and the compile time. The
step is the one `--mode=prior` runs.
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import fashion_mnist
from configs import imagenet256
from vqvae2_jax import builders
from vqvae2_jax import parallel
from vqvae2_jax.train import prior_trainer
from vqvae2_jax.train import train_state

# name -> (config module, level, timed steps).
_MODELS = {
    'fashion_mnist_0': (fashion_mnist, 0, 50),
    'fashion_mnist_1': (fashion_mnist, 1, 50),
    'imagenet256_0': (imagenet256, 0, 2),
}

_NAMES = flags.DEFINE_list('models', list(_MODELS), 'Priors to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1'], 'Global batch sizes.')
_STEPS = flags.DEFINE_integer('steps', 0,
                              'Timed steps per model (0: its default).')


def level_shapes(config) -> list[tuple[int, int]]:
  size = config.data.image_size
  return [(size // f, size // f) for f in config.model.downsample_factors]


def time_prior(config, level: int, batch_size: int, steps: int) -> dict:
  """Compiles and times `steps` train steps of level `level`'s prior."""
  mesh = parallel.create_mesh(config.mesh)
  model = builders.build_prior(config, level)
  tx, schedule = prior_trainer.create_optimizer(config)
  shapes = level_shapes(config)
  init_fn = prior_trainer.make_init_fn(
      model, tx, level=level, level_shapes=shapes,
      use_polyak=config.prior.polyak_decay > 0)
  state, shardings = train_state.create_sharded_state(init_fn, mesh,
                                                       jax.random.PRNGKey(0))
  step = train_state.jit_train_step(
      prior_trainer.make_train_step(
          model, tx, schedule,
          label_drop_rate=config.prior.label_drop_rate,
          polyak_decay=config.prior.polyak_decay), shardings, mesh)
  rng = np.random.default_rng(0)
  k = config.model.num_embeddings
  batch = parallel.shard_batch({
      'codes': [rng.integers(0, k, (batch_size, *s), dtype=np.int32)
                for s in shapes[:level + 1]],
      'label': rng.integers(0, max(config.data.num_classes, 1), batch_size,
                            dtype=np.int32)}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch)  # Compiles.
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  cpu_seconds = (time.process_time() - cpu_start) / steps
  h, w = shapes[level]
  return {'params': sum(x.size for x in jax.tree.leaves(state.params)),
          'step_s': seconds, 'cpu_s': cpu_seconds,
          'codes_per_s': batch_size * h * w / seconds,
          'compile_s': compile_s}


def main(argv):
  del argv
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  print(f'{"prior":<17} {"map":>6} {"params":>11} {"batch":>5} '
        f'{"s/step":>9} {"cpu s/step":>10} {"codes/s":>10} {"compile s":>9}')
  for name in _NAMES.value:
    if name not in _MODELS:
      raise app.UsageError(
          f'Unknown model {name!r}; choose from {list(_MODELS)}.')
    module, level, steps = _MODELS[name]
    config = module.get_config()
    h, w = level_shapes(config)[level]
    for batch_size in (int(b) for b in _BATCH_SIZES.value):
      try:
        r = time_prior(config, level, batch_size, _STEPS.value or steps)
      except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        print(f'{name:<17} {f"{h}x{w}":>6} {"":>11} {batch_size:>5} '
              'out of memory on this machine', flush=True)
        continue
      print(f'{name:<17} {f"{h}x{w}":>6} {r["params"]:>11,} {batch_size:>5} '
            f'{r["step_s"]:>9.4f} {r["cpu_s"]:>10.4f} '
            f'{r["codes_per_s"]:>10,.0f} {r["compile_s"]:>9.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)

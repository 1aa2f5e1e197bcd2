r"""Throughput of the VQ-VAE: train step, encode and decode, images/s.

  python -m experiments.bench_vqvae
  XLA_FLAGS=--xla_cpu_use_onednn=true python -m experiments.bench_vqvae

Rows: the Fashion-MNIST config at its batch size; the ImageNet-256
architecture (2 levels, 32x32 and 64x64 latents of 256x256x3 images, K=512,
D=64, 128 hidden channels, 2 residual layers of 64) at batch 4; and, to
compare with PyTorch figures for rosinality's VQ-VAE (303 train img/s at
32x32x3 batch 32, 4.5 img/s at 256x256x3 batch 4, 2 threads), that
architecture with its residual bottleneck of 32 on 32x32x3 at batch 32.
`--rows=peer_protocol --dtypes=float32` times experiments/peer_protocol.py's
model (the reference's size on 32x32x1 at batch 64; its own run: 294
train img/s, 652 s for 3000 steps). Each row is timed in float32 and
bfloat16 compute (float32 params). One device (all host cores) unless
--cpu_devices=N: the host CPU split into N JAX devices, each step data
parallel over them, as config.mesh.cpu_devices does in --mode=vqvae (the
Fashion-MNIST default uses 2 on this 2-core machine):

  python -m experiments.bench_vqvae --rows=peer_protocol,peer_arch_32px \
    --dtypes=float32 --cpu_devices=2

The train step is the trainer's own jitted step (Adam, donated state). Rows
the reference was timed on (peer_arch_32px, peer_protocol) also print its
train img/s from the JSON files in --peer_dir (recorded on the machine of
the docs' figures, see docs/reference.md; not the same moment, so compare
on a quiet machine) and ours divided by it. Without --peer_dir those
columns are left out.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from configs import fashion_mnist
from configs import imagenet256
from experiments import peer_protocol
from vqvae2_jax import hostmem
from vqvae2_jax import parallel
from vqvae2_jax.train import vqvae_trainer

_MIN_SECONDS = flags.DEFINE_float(
    'min_seconds', 5.0, 'Time each measurement for at least this long.')
_ROWS = flags.DEFINE_list(
    'rows', ['fashion_mnist', 'peer_arch_32px', 'imagenet256_arch'],
    'Rows to measure (also: imagenet256_arch_32px, peer_protocol, tiny).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'Compute dtypes to measure.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0,
    'Split the host CPU into this many JAX devices and time steps that are '
    'data parallel over them (as config.mesh.cpu_devices); 0: one device.')
_PEER_DIR = flags.DEFINE_string(
    'peer_dir', '',
    "Folder of the PyTorch reference's recorded figures "
    '(peer_rosinality.json, peer_rosinality_fmnist.json; docs/reference.md); '
    'rows they cover get the reference img/s and our ratio to it. Empty: no '
    'reference columns.')


def peer_train_images_per_s(row: str, peer_dir: str) -> float | None:
  """The reference's recorded train img/s for a row, if it has one.

  peer_arch_32px: its default VQ-VAE on 32x32x3 at batch 32 (median step of
  its benchmark); peer_protocol: its 3000-step Fashion-MNIST run (training
  seconds with its input, as experiments/peer_protocol.py counts ours).
  Both were measured by the reference's own runs, whose JSON files are in
  `peer_dir`; None without them (an empty `peer_dir` included).
  """
  if not peer_dir:
    return None
  try:
    if row == 'peer_arch_32px':
      with open(os.path.join(peer_dir, 'peer_rosinality.json')) as f:
        sizes = json.load(f)['vqvae']['sizes']
      for size in sizes:
        if size['batch'] == 32 and list(size['image']) == [32, 32, 3]:
          return float(size['train_images_per_s'])
    if row == 'peer_protocol':
      with open(os.path.join(peer_dir, 'peer_rosinality_fmnist.json')) as f:
        return float(json.load(f)['train_images_per_second'])
  except (OSError, KeyError, ValueError):
    return None
  return None


def _row_config(name: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config, batch size) of a benchmark row."""
  if name == 'fashion_mnist':
    config = fashion_mnist.get_config()
    return config, config.vqvae_train.batch_size
  if name == 'tiny':  # Smoke tests.
    config = fashion_mnist.get_config('tiny')
    return config, config.vqvae_train.batch_size
  if name == 'peer_protocol':
    # experiments/peer_protocol.py's model and batch: the reference's
    # 3000 steps took 652 s on this machine, 217 ms/step (294 img/s).
    return peer_protocol.apply_protocol(fashion_mnist.get_config()), 64
  config = imagenet256.get_config()
  if name == 'imagenet256_arch':
    return config, 4
  if name == 'imagenet256_arch_32px':
    config.data.image_size = 32
    return config, 32
  if name == 'peer_arch_32px':
    # rosinality's default VQ-VAE sizes (residual bottleneck 32, 1.39M
    # params), on the 32x32x3 batch-32 setting of the PyTorch figure.
    config.data.image_size = 32
    config.model.num_residual_hiddens = 32
    return config, 32
  raise ValueError(f'Unknown row {name!r}.')


def _time(fn, min_seconds: float) -> float:
  """Seconds per call of `fn` (already compiled), averaged over >= 2 calls."""
  jax.block_until_ready(fn())
  calls, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(fn())
    calls += 1
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds and calls >= 2:
      return elapsed / calls


def measure(config: ml_collections.ConfigDict, batch_size: int,
            min_seconds: float, num_devices: int = 1) -> dict[str, float]:
  """Images/s of the train step, encode and decode, data parallel over the
  first `num_devices` devices."""
  mesh = parallel.create_mesh(devices=jax.devices()[:num_devices])
  progs = vqvae_trainer.programs(config, mesh)
  model, state = progs.model, progs.init(jax.random.PRNGKey(0))
  size, channels = config.data.image_size, config.data.channels
  images = np.random.default_rng(0).uniform(
      -1, 1, (batch_size, size, size, channels)).astype(np.float32)
  batch = parallel.shard_batch({'image': images}, mesh)
  holder = {'state': state}

  def train():
    holder['state'], metrics = progs.train_step(holder['state'], batch)
    return metrics

  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))
  variables = holder['state'].variables()
  codes = encode(variables, batch['image'])
  result = {'params_M': sum(x.size for x in jax.tree.leaves(state.params)) / 1e6}
  for name, fn in (('train', train),
                   ('encode', lambda: encode(variables, batch['image'])),
                   ('decode', lambda: decode(variables, codes))):
    result[name] = batch_size / _time(fn, min_seconds)
    variables = holder['state'].variables()
  return result


def main(argv):
  del argv
  if _PEER_DIR.value and not os.path.isdir(_PEER_DIR.value):
    raise app.UsageError(
        f'--peer_dir={_PEER_DIR.value!r} is not a folder. Fix: pass the '
        "folder of the reference's recorded JSON files (docs/reference.md), "
        'or leave --peer_dir empty for a table without reference columns.')
  hostmem.tune_malloc()  # As --mode=vqvae does.
  parallel.split_host_cpu(_CPU_DEVICES.value)  # Before JAX starts.
  num_devices = min(max(1, _CPU_DEVICES.value), jax.device_count())
  print(f'jax {jax.__version__}, timed on {num_devices} of '
        f'{jax.device_count()} device(s) '
        f'{jax.devices()[0].device_kind}, {os.cpu_count()} host cores, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'{"row":24s} {"image":>11s} {"batch":>5s} {"params":>7s} '
        f'{"dtype":>8s} {"train img/s":>11s} {"encode img/s":>12s} '
        f'{"decode img/s":>12s} {"reference":>9s} {"ratio":>5s}')
  for row in _ROWS.value:
    peer = peer_train_images_per_s(row, _PEER_DIR.value)
    train_by_dtype = {}
    for dtype in _DTYPES.value:
      config, batch_size = _row_config(row)
      config.model.dtype = dtype
      r = measure(config, batch_size, _MIN_SECONDS.value, num_devices)
      train_by_dtype[dtype] = r['train']
      shape = f'{config.data.image_size}x{config.data.image_size}x' \
              f'{config.data.channels}'
      print(f'{row:24s} {shape:>11s} {batch_size:5d} {r["params_M"]:6.2f}M '
            f'{dtype:>8s} {r["train"]:11.1f} {r["encode"]:12.1f} '
            f'{r["decode"]:12.1f}'
            + (f' {peer:9.1f} {r["train"] / peer:5.2f}' if peer else ''),
            flush=True)
    if {'float32', 'bfloat16'} <= set(train_by_dtype):
      print(f'{row:24s} train bfloat16/float32 speed ratio: '
            f'{train_by_dtype["bfloat16"] / train_by_dtype["float32"]:.2f}',
            flush=True)


if __name__ == '__main__':
  app.run(main)

r"""Stage-1 training speed against the PyTorch reference, back to back.

  python -m experiments.peer_speed \
    --peer_python=/path/to/torch-venv/bin/python \
    --peer_code=/path/to/vq-vae-2-pytorch            # about 3 minutes
  python -m experiments.peer_speed --cpu_devices=0   # ours on one device

The reference's default VQ-VAE (rosinality/vq-vae-2-pytorch,
`VQVAE(in_channel=1)`) and ours at its size (experiments/peer_protocol.py's
`apply_protocol`: 128 hidden channels, 2 residual blocks of 32, K=512,
D=64, the default recipe otherwise), both training on one fixed batch of 64
random 32x32x1 images in [-1, 1]. Rounds alternate between the two
(--rounds, each side timed for at least --seconds after its warm-up), so
both see the same machine, and the table gives each round's images/s and
the median ratio, ours / reference. The reference runs in its own Python
(with torch; experiments/peer_vqvae_timer.py, started once per round, 2
threads); ours in this process: the trainer's jitted step, data parallel
over --cpu_devices CPU devices (2 by default, as configs/fashion_mnist.py
sets `mesh.cpu_devices`).

How to get the reference: see docs/reference.md (a checkout of
rosinality/vq-vae-2-pytorch at ef5f67c and a virtual environment with
`pip install torch numpy`). PEER_PYTHON and PEER_DIR can stand in for the
two flags.
"""

import functools
import json
import os
import statistics
import subprocess
import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import fashion_mnist
from experiments import peer_protocol
from vqvae2_jax import hostmem
from vqvae2_jax import parallel
from vqvae2_jax.train import vqvae_trainer


def _define_flags():
  """This script's flags (defined only when it runs, so that
  experiments/peer_prior.py can import `check_peer`)."""
  return dict(
      peer_python=flags.DEFINE_string(
          'peer_python', os.environ.get('PEER_PYTHON'),
          'A Python with torch and numpy (default: $PEER_PYTHON).'),
      peer_code=flags.DEFINE_string(
          'peer_code', os.environ.get('PEER_DIR'),
          'Checkout of rosinality/vq-vae-2-pytorch (default: $PEER_DIR).'),
      rounds=flags.DEFINE_integer('rounds', 3, 'Alternating rounds.'),
      seconds=flags.DEFINE_float(
          'seconds', 20.0, 'Each side timed for at least this per round.'),
      cpu_devices=flags.DEFINE_integer(
          'cpu_devices', 2, 'Our side: the host CPU as this many JAX '
          'devices, the step data parallel over them (0: one device).'),
      json=flags.DEFINE_string('json', None, 'Also write the rounds here.'),
  )


_BATCH = 64
_TIMER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'peer_vqvae_timer.py')
_SETUP = ('see docs/reference.md: a checkout of '
          'rosinality/vq-vae-2-pytorch and a virtual environment with '
          '`pip install torch numpy`')


def check_peer(peer_python: str | None, peer_code: str | None) -> None:
  """Raises app.UsageError naming the fix when the reference is missing."""
  if not peer_python or not os.access(peer_python, os.X_OK):
    raise app.UsageError(
        f'--peer_python={peer_python!r} is not an executable Python with '
        f'torch. Fix: {_SETUP}, then pass --peer_python=<venv>/bin/python.')
  if not peer_code or not os.path.isfile(os.path.join(peer_code, 'vqvae.py')):
    raise app.UsageError(
        f'--peer_code={peer_code!r} is not a checkout of '
        f'rosinality/vq-vae-2-pytorch (no vqvae.py). Fix: {_SETUP}, then '
        'pass --peer_code=<checkout>.')


def peer_round(peer_python: str, peer_code: str, seconds: float) -> float:
  """The reference's train images/s over one round (its own process)."""
  done = subprocess.run(
      [peer_python, _TIMER, f'--peer_code={peer_code}',
       f'--seconds={seconds}', f'--batch={_BATCH}', '--size=32',
       '--channels=1', '--threads=2'],
      capture_output=True, text=True, timeout=600 + 10 * seconds)
  if done.returncode:
    raise RuntimeError(f'The reference timer failed ({peer_python} '
                       f'{_TIMER}):\n{done.stderr[-3000:]}')
  return float(json.loads(done.stdout.strip().splitlines()[-1])[
      'images_per_s'])


class OurStep:
  """Our trainer's step at the reference's size on a fixed random batch."""

  def __init__(self, num_devices: int):
    config = peer_protocol.apply_protocol(fashion_mnist.get_config())
    mesh = parallel.create_mesh(devices=jax.devices()[:num_devices])
    self._progs = vqvae_trainer.programs(config, mesh)
    self._state = self._progs.init(jax.random.PRNGKey(0))
    images = np.random.default_rng(0).uniform(
        -1, 1, (_BATCH, 32, 32, 1)).astype(np.float32)
    self._batch = parallel.shard_batch({'image': images}, mesh)
    for _ in range(3):  # Compiles, then warms up.
      jax.block_until_ready(self._step())

  def _step(self):
    self._state, metrics = self._progs.train_step(self._state, self._batch)
    return metrics

  def images_per_s(self, seconds: float) -> float:
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
      metrics = self._step()
      steps += 1
      if steps % 10 == 0:  # Keep the dispatch queue short.
        jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    return steps * _BATCH / (time.perf_counter() - start)


def main(argv, flag_values):
  del argv
  f = {k: v.value for k, v in flag_values.items()}
  check_peer(f['peer_python'], f['peer_code'])
  hostmem.tune_malloc()  # As --mode=vqvae does.
  parallel.split_host_cpu(f['cpu_devices'])  # Before JAX starts.
  num_devices = min(max(1, f['cpu_devices']), jax.device_count())
  ours = OurStep(num_devices)
  print(f'Stage-1 train step at the reference\'s size (1.38M params), batch '
        f'{_BATCH} of 32x32x1; ours on {num_devices} CPU device(s), the '
        f'reference with 2 torch threads; {os.cpu_count()} host cores.')
  print(f'{"round":>5} {"ours img/s":>11} {"reference img/s":>16} '
        f'{"ours / reference":>17}', flush=True)
  rounds = []
  for i in range(f['rounds']):
    mine = ours.images_per_s(f['seconds'])
    theirs = peer_round(f['peer_python'], f['peer_code'], f['seconds'])
    rounds.append({'ours': mine, 'reference': theirs, 'ratio': mine / theirs})
    print(f'{i + 1:>5} {mine:>11.1f} {theirs:>16.1f} {mine / theirs:>17.2f}',
          flush=True)
  median = {k: statistics.median(r[k] for r in rounds)
            for k in ('ours', 'reference', 'ratio')}
  print(f'{"median":>5} {median["ours"]:>11.1f} {median["reference"]:>16.1f} '
        f'{median["ratio"]:>17.2f}')
  if f['json']:
    with open(f['json'], 'w') as out:
      json.dump({'rounds': rounds, 'median': median,
                 'cpu_devices': num_devices, 'cores': os.cpu_count()}, out,
                indent=1)


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

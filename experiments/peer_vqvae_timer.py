r"""Times the PyTorch reference's VQ-VAE train step; run with its Python.

  PEER_DIR=/path/to/vq-vae-2-pytorch /path/to/torch-venv/bin/python \
    experiments/peer_vqvae_timer.py --seconds=20

experiments/peer_speed.py starts this once per round. It imports
rosinality/vq-vae-2-pytorch's own `vqvae.py` from the checkout (nothing of
it is copied here), builds its default model for one channel
(`VQVAE(in_channel=1)`: 128 hidden channels, 2 residual blocks of 32, K=512,
D=64, EMA decay 0.99), and times the step its `train_vqvae.py` runs: MSE +
0.25 x latent loss, Adam 3e-4, on one fixed batch of random images in
[-1, 1], with torch's threads set to --threads (2, as the reference's
recorded figures). After 3 warm-up steps it runs steps for at least
--seconds and prints one JSON line: images_per_s, steps, seconds.

Needs only torch and numpy: no JAX, no code of this project.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peer_code', default=os.environ.get('PEER_DIR'),
                      help='checkout of rosinality/vq-vae-2-pytorch')
  parser.add_argument('--seconds', type=float, default=20.0)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=1)
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  path = os.path.join(args.peer_code or '', 'vqvae.py')
  if not os.path.isfile(path):
    sys.exit(f'--peer_code={args.peer_code!r} has no vqvae.py: it must be a '
             'checkout of rosinality/vq-vae-2-pytorch')
  torch.set_num_threads(args.threads)
  sys.path.insert(0, args.peer_code)  # vqvae.py imports its `distributed`.
  spec = importlib.util.spec_from_file_location('peer_vqvae', path)
  peer_vqvae = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer_vqvae)

  torch.manual_seed(0)
  model = peer_vqvae.VQVAE(in_channel=args.channels, channel=128,
                           n_res_block=2, n_res_channel=32, embed_dim=64,
                           n_embed=512, decay=0.99)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
  images = torch.from_numpy(np.random.default_rng(0).uniform(
      -1, 1, (args.batch, args.channels, args.size, args.size)
  ).astype(np.float32))

  def step():
    model.zero_grad()
    recon, latent_loss = model(images)
    loss = F.mse_loss(recon, images) + 0.25 * latent_loss.mean()
    loss.backward()
    optimizer.step()
    return loss.item()

  for _ in range(3):
    step()
  steps, start = 0, time.perf_counter()
  while steps < 2 or time.perf_counter() - start < args.seconds:
    step()
    steps += 1
  seconds = time.perf_counter() - start
  print(json.dumps({'images_per_s': steps * args.batch / seconds,
                    'steps': steps, 'seconds': seconds,
                    'threads': torch.get_num_threads(),
                    'torch': torch.__version__}))


if __name__ == '__main__':
  main()

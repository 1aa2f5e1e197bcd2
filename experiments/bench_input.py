r"""Throughput of the input pipeline, images/s, as the trainers see it.

  python -m experiments.bench_input
  python -m experiments.bench_input --folder_images=2000 --min_seconds=20

Rows: Fashion-MNIST from tfds (28x28 padded to 32x32x1; train stream and
whole ordered eval passes of the test split, start-up included), and a folder of random smooth 256x256 RGB JPEGs
written to a temporary directory (train stream with flips, at 256x256 and
resized to 128x128). Each row times the public iterators
(`create_train_iterator` / `create_eval_iterator`), so the figures include
decoding, preprocessing in tf.data and the layout of every batch as sharded
global jax.Arrays over all local devices. "first batch" is the time from
creating the iterator to its first batch; "resume" the same at
start_step=--resume_step, which shows that resuming does not replay steps.
Fashion-MNIST is prepared into --data_dir first if needed (from the Debian
files when present).
"""

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from configs import fashion_mnist
from vqvae2_jax import parallel
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.data import tfds_prepare

_MIN_SECONDS = flags.DEFINE_float(
    'min_seconds', 10.0, 'Time each row for at least this long.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', 'tfds data_dir for Fashion-MNIST; empty: tfds default.')
_FOLDER_IMAGES = flags.DEFINE_integer(
    'folder_images', 1000, 'Random JPEGs written for the image-folder rows.')
_RESUME_STEP = flags.DEFINE_integer(
    'resume_step', 100_000, 'start_step of the "resume" column.')


def _write_jpegs(root: str, n: int, size: int = 256) -> None:
  """Smooth random RGB images (upsampled noise), roughly photo-sized JPEGs."""
  rng = np.random.default_rng(0)
  for i in range(n):
    coarse = rng.integers(0, 256, (8, 8, 3), np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 8, (size, size, 3))
    array = np.clip(np.asarray(image, np.float64) + noise, 0, 255)
    Image.fromarray(array.astype(np.uint8)).save(
        os.path.join(root, f'{i:06d}.jpg'), quality=90)


def _first_batch_s(make) -> float:
  start = time.perf_counter()
  jax.block_until_ready(next(make()))
  return time.perf_counter() - start


def _images_per_s(make, min_seconds: float, train: bool) -> float:
  """Images/s: train streams after warm-up; eval as whole passes."""
  if not train:  # Passes end: time whole passes, start-up included.
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
      for batch in make():
        images += int(jax.block_until_ready(batch['mask']).sum())
    return images / (time.perf_counter() - start)
  iterator = make()
  for _ in range(3):
    jax.block_until_ready(next(iterator))
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < min_seconds:
    batch = next(iterator)
    jax.block_until_ready(batch['image'])
    images += batch['image'].shape[0]
  return images / (time.perf_counter() - start)


def _row(name: str, data: ml_collections.ConfigDict, batch: int,
         mesh, train: bool) -> dict[str, object]:
  logging.info('Row %s', name)
  if train:
    def make(start_step=0):
      return input_pipeline.create_train_iterator(
          data, global_batch_size=batch, mesh=mesh, seed=0,
          start_step=start_step)
    first = _first_batch_s(make)
    resume = _first_batch_s(lambda: make(_RESUME_STEP.value))
  else:
    def make():
      return input_pipeline.create_eval_iterator(
          data, global_batch_size=batch, mesh=mesh)
    first = _first_batch_s(make)
    resume = float('nan')
  rate = _images_per_s(make, _MIN_SECONDS.value, train)
  shape = f'{data.image_size}x{data.image_size}x{data.channels}'
  return {'row': name, 'shape': shape, 'batch': batch, 'first': first,
          'resume': resume, 'rate': rate}


def main(argv):
  del argv
  mesh = parallel.create_mesh()
  rows = []

  fashion = fashion_mnist.get_config().data
  fashion.data_dir = _DATA_DIR.value
  tfds_prepare.prepare_builder(fashion)
  rows.append(_row('fashion_mnist train', fashion, 64, mesh, train=True))
  rows.append(_row('fashion_mnist eval', fashion, 256, mesh, train=False))

  with tempfile.TemporaryDirectory(prefix='bench_input_') as root:
    start = time.perf_counter()
    _write_jpegs(root, _FOLDER_IMAGES.value)
    logging.info('Wrote %d JPEGs in %.1f s.', _FOLDER_IMAGES.value,
                 time.perf_counter() - start)
    folder = fashion_mnist.get_config().data
    folder.update(name='image_folder', image_folder=root, image_size=256,
                  channels=3, num_classes=0, random_flip=True)
    rows.append(_row('jpeg folder train', folder, 32, mesh, train=True))
    folder.image_size = 128
    rows.append(_row('jpeg folder train (resize)', folder, 32, mesh,
                     train=True))

  print(f'\nInput pipeline on {jax.device_count()} {jax.devices()[0].platform}'
        f' device(s), {os.cpu_count()} host cores, '
        f'>= {_MIN_SECONDS.value:g} s per row')
  header = (f'| {"row":<28} | {"image":>11} | {"batch":>5} | '
            f'{"first batch s":>13} | {"resume s":>8} | {"images/s":>9} |')
  print(header)
  print('|' + '|'.join('-' * (len(c) + 0) for c in header.split('|')[1:-1])
        + '|')
  for r in rows:
    print(f'| {r["row"]:<28} | {r["shape"]:>11} | {r["batch"]:>5} | '
          f'{r["first"]:>13.2f} | {r["resume"]:>8.2f} | {r["rate"]:>9.0f} |')


if __name__ == '__main__':
  app.run(main)

"""The tfds input pipeline on the real Fashion-MNIST (Debian files).

conftest.py gives the session 8 fake CPU devices; batches are checked to be
sharded over all of them.
"""

import gzip
import os
import shutil

import jax
import numpy as np
import pytest

from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.data import tfds_prepare

_DEBIAN_DIR = tfds_prepare.DEBIAN_SOURCES['fashion_mnist'][1]


def _host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def _raw_test_set():
  """uint8 [10000, 28, 28] images and their labels, from the idx files."""
  with gzip.open(os.path.join(_DEBIAN_DIR, 't10k-images-idx3-ubyte.gz')) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(os.path.join(_DEBIAN_DIR, 't10k-labels-idx1-ubyte.gz')) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return images, labels


def test_train_batches_shaped_scaled_labelled_and_sharded(fashion_config):
  mesh = parallel.create_mesh()
  assert mesh.devices.size == 8
  batch = next(input_pipeline.create_train_iterator(
      fashion_config, global_batch_size=32, mesh=mesh, seed=0))
  assert set(batch) == {'image', 'label'}
  image, label = batch['image'], batch['label']
  assert image.shape == (32, 32, 32, 1) and image.dtype == np.float32
  assert label.shape == (32,) and label.dtype == np.int32
  for array in (image, label):
    assert array.sharding.is_equivalent_to(parallel.data_sharding(mesh),
                                           array.ndim)
    assert len(array.addressable_shards) == 8
    assert all(s.data.shape[0] == 4 for s in array.addressable_shards)
  image = np.asarray(image)
  assert image.min() >= -1 and image.max() <= 1
  assert image.max() > 0.9  # Bright pixels reach the top of the range.
  # 28x28 padded to 32x32 with black (-1) borders of 2 pixels.
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  np.testing.assert_array_equal(image[:, border, 0], -1.0)
  assert np.all((np.asarray(label) >= 0) & (np.asarray(label) < 10))
  assert len(np.unique(np.asarray(label))) > 3


def test_images_and_labels_are_the_debian_files(fashion_config):
  raw_images, raw_labels = _raw_test_set()
  lookup = {img.tobytes(): lab for img, lab in zip(raw_images, raw_labels)}
  mesh = parallel.create_mesh()
  batches = list(input_pipeline.create_eval_iterator(
      fashion_config, split='test[:48]', global_batch_size=16, mesh=mesh))
  assert len(batches) == 3
  for batch in map(_host, batches):
    assert batch['mask'].all()
    pixels = np.round((batch['image'][:, 2:30, 2:30, 0] + 1) * 127.5)
    for img, lab in zip(pixels.astype(np.uint8), batch['label']):
      assert lookup[img.tobytes()] == lab


def test_num_examples(fashion_config):
  assert input_pipeline.num_examples(fashion_config, 'train') == 60_000
  assert input_pipeline.num_examples(fashion_config, 'test') == 10_000
  assert input_pipeline.num_examples(fashion_config, 'train[:96]') == 96


def _stream(config, n, **kwargs):
  it = input_pipeline.create_train_iterator(
      config, global_batch_size=16, mesh=parallel.create_mesh(), **kwargs)
  return [_host(next(it)) for _ in range(n)]


def test_train_stream_is_deterministic_and_resumes_exactly(fashion_config):
  # 100 examples, 16 per batch: epochs end inside batches 6 and 12.
  fashion_config.train_split = 'train[:100]'
  fashion_config.random_flip = True
  first = _stream(fashion_config, 14, seed=3)
  again = _stream(fashion_config, 14, seed=3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for start in (5, 7, 13):  # Mid-epoch, just after an epoch ends, later.
    resumed = _stream(fashion_config, 14 - start, seed=3, start_step=start)
    for a, b in zip(resumed, first[start:]):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  other = _stream(fashion_config, 1, seed=4)
  assert not np.array_equal(other[0]['image'], first[0]['image'])


def test_each_epoch_is_a_new_permutation_of_the_split(fashion_config):
  fashion_config.train_split = 'train[:64]'
  batches = _stream(fashion_config, 8, seed=0)  # Two epochs of 4 batches.
  epochs = [np.concatenate([b['image'] for b in batches[i:i + 4]])
            for i in (0, 4)]
  rows = [sorted(e.reshape(64, -1).tobytes() for e in epoch)
          for epoch in epochs]
  assert rows[0] == rows[1]  # Same 64 images in each epoch...
  assert not np.array_equal(epochs[0], epochs[1])  # ...in another order.
  assert len(set(rows[0])) == 64  # No repeats within an epoch.


def test_eval_pass_is_ordered_and_padded(fashion_config):
  mesh = parallel.create_mesh()
  batches = [_host(b) for b in input_pipeline.create_eval_iterator(
      fashion_config, split='test[:50]', global_batch_size=16, mesh=mesh)]
  assert len(batches) == 4
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.dtype == bool and masks.sum() == 50 and masks[:50].all()
  np.testing.assert_array_equal(batches[-1]['image'][2:], 0.0)
  first16 = _host(next(input_pipeline.create_eval_iterator(
      fashion_config, split='test[:16]', global_batch_size=16, mesh=mesh)))
  np.testing.assert_array_equal(first16['image'], batches[0]['image'])
  # Flips are for training only.
  fashion_config.random_flip = True
  flipped_config = _host(next(input_pipeline.create_eval_iterator(
      fashion_config, split='test[:16]', global_batch_size=16, mesh=mesh)))
  np.testing.assert_array_equal(flipped_config['image'], first16['image'])


def test_rgb_and_resize_options(fashion_config):
  fashion_config.channels = 3
  fashion_config.image_size = 24  # Smaller than 28: resized, not padded.
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  batch = _host(next(input_pipeline.create_eval_iterator(
      fashion_config, split='test[:4]', global_batch_size=4, mesh=mesh)))
  assert batch['image'].shape == (4, 24, 24, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_batch_must_divide_by_devices(fashion_config):
  with pytest.raises(ValueError, match='does not divide by the 8 devices'):
    input_pipeline.create_train_iterator(
        fashion_config, global_batch_size=12, mesh=parallel.create_mesh(),
        seed=0)


def test_num_classes_must_match_the_dataset(fashion_config):
  fashion_config.num_classes = 100
  with pytest.raises(ValueError, match=r'num_classes=10'):
    input_pipeline.create_train_iterator(
        fashion_config, global_batch_size=8, mesh=parallel.create_mesh(),
        seed=0)


def test_a_damaged_record_is_one_error_naming_the_files(fashion_config,
                                                        tmp_path):
  # A copy of the prepared dataset with zeroed bytes in its train records.
  shutil.copytree(os.path.join(fashion_config.data_dir, 'fashion_mnist'),
                  tmp_path / 'fashion_mnist')
  train_file, = (tmp_path / 'fashion_mnist').glob('*/*-train.tfrecord*')
  data = bytearray(train_file.read_bytes())
  data[1000:1064] = bytes(64)
  train_file.write_bytes(bytes(data))
  fashion_config.data_dir = str(tmp_path)
  batches = input_pipeline.create_train_iterator(
      fashion_config, global_batch_size=8, mesh=parallel.create_mesh(),
      seed=0)
  with pytest.raises(input_pipeline.InputError) as info:
    for _ in range(20):  # The shuffle buffer reads the record at once.
      next(batches)
  message = str(info.value)
  assert message.startswith(
      f"Reading tfds dataset 'fashion_mnist' split 'train' in {tmp_path} "
      'failed: DataLossError: corrupted record at'), message
  assert f'Fix: its prepared files are damaged: delete {tmp_path}' in message
  assert isinstance(info.value, errors.UserError)  # main: one line.

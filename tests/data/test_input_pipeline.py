"""The input pipeline's own pieces, on hand-made images and tiny folders.

Fashion-MNIST through the whole pipeline: test_fashion_mnist.py; image
folders with bad files, splits and shares: test_image_folder.py.
"""

import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax.data import image_folder
from vqvae2_jax.data import input_pipeline

# pylint: disable=protected-access


def _data(**fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'name': 'image_folder', 'image_folder': '', 'image_size': 8,
      'channels': 1, 'num_classes': 2, 'random_flip': False,
      'input_streams': 0, 'train_split': 'train', 'eval_split': 'train',
      'shuffle_buffer': 16})
  config.update(fields)
  return config


@pytest.fixture
def flat_folder(tmp_path):
  """12 flat grey 8x8 images: value 10 * i + 5, class i % 2."""
  for i in range(12):
    directory = tmp_path / ('a' if i % 2 == 0 else 'b')
    directory.mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8), 10 * i + 5, np.uint8), 'L').save(
        directory / f'{i}.png')
  image_folder.load_split.cache_clear()
  return str(tmp_path)


def _scaled(value):
  return value * (2.0 / 255.0) - 1.0


def test_small_images_are_padded_centred_and_scaled():
  preprocess = input_pipeline._preprocess_fn(
      _data(image_size=32), pad_small=True, flip_seed=None)
  image, label = preprocess(tf.fill([28, 28, 1], tf.constant(255, tf.uint8)),
                            tf.constant(3, tf.int64), 0)
  image = image.numpy()
  assert image.shape == (32, 32, 1) and label.dtype == tf.int32
  assert (image[2:30, 2:30] == 1.0).all()
  assert (image[:2] == -1.0).all() and (image[:, 30:] == -1.0).all()


def test_other_images_are_resized_and_centre_cropped():
  # Left half 0, right half 200 on a 16x32 image: resized to 8x16, then the
  # middle 8 columns are kept, across the edge.
  image = np.zeros((16, 32, 1), np.uint8)
  image[:, 16:] = 200
  out = input_pipeline._fit(tf.constant(image), 8, pad_small=False).numpy()
  assert out.shape == (8, 8, 1)
  assert out[:, 0].max() < 5.0 and out[:, -1].min() > 195.0
  same = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
  np.testing.assert_array_equal(
      input_pipeline._fit(tf.constant(same), 8, pad_small=False).numpy(),
      same.astype(np.float32))


def test_channels_are_converted():
  rgba = tf.constant(np.full((2, 2, 4), [30, 60, 90, 0], np.uint8))
  rgb = input_pipeline._to_channels(rgba, 3)
  np.testing.assert_array_equal(rgb.numpy()[0, 0], [30, 60, 90])  # No alpha.
  gray = input_pipeline._to_channels(rgba, 1)
  assert gray.shape == (2, 2, 1)
  assert 30 < int(gray.numpy()[0, 0, 0]) < 90
  two = tf.constant(np.full((2, 2, 2), [7, 255], np.uint8))
  np.testing.assert_array_equal(
      input_pipeline._to_channels(two, 3).numpy()[0, 0], [7, 7, 7])


def test_flips_are_a_function_of_seed_and_position():
  image = tf.constant(np.arange(16, dtype=np.uint8).reshape(4, 4, 1))
  preprocess = input_pipeline._preprocess_fn(_data(image_size=4), False,
                                             flip_seed=7)
  flipped = [preprocess(image, 0, p)[0].numpy() for p in range(16)]
  plain = _scaled(image.numpy().astype(np.float32))
  for p, out in enumerate(flipped):
    assert (np.array_equal(out, plain)
            or np.array_equal(out, plain[:, ::-1])), p
    np.testing.assert_array_equal(out, preprocess(image, 0, p)[0].numpy())
  assert 0 < sum(np.array_equal(o, plain) for o in flipped) < 16


def test_seeds_are_mixed_apart():
  seeds = {input_pipeline._mix(s, v) for s in range(4) for v in range(64)}
  assert len(seeds) == 256
  assert all(0 <= s < 2**31 for s in seeds)
  assert input_pipeline._mix(3, 5) == input_pipeline._mix(3, 5)


def test_streams_and_batches_must_divide():
  assert input_pipeline.train_streams(_data()) == 1  # One per process.
  assert input_pipeline.train_streams(_data(input_streams=4)) == 4
  assert input_pipeline._stream_batch_size(8, 4) == 2
  with pytest.raises(errors.ConfigError, match='does not divide by the 3 '
                     'input streams'):
    input_pipeline._stream_batch_size(8, 3)
  mesh = parallel.create_mesh()
  assert input_pipeline._local_batch_size(16, mesh) == 16
  for bad in (0, 12):
    with pytest.raises(ValueError, match='Fix: use a multiple of 8'):
      input_pipeline._local_batch_size(bad, mesh)


def test_more_streams_than_processes_must_be_a_multiple(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert input_pipeline.train_streams(_data()) == 2
  with pytest.raises(errors.ConfigError,
                     match='input_streams is 3, not a multiple of the 2'):
    input_pipeline.train_streams(_data(input_streams=3))


def test_eval_pass_is_ordered_scaled_and_padded(flat_folder):
  config = _data(image_folder=flat_folder)
  assert input_pipeline.num_examples(config, 'train') == 12
  assert input_pipeline.num_examples(config, 'train[:50%]') == 6
  assert input_pipeline.local_num_examples(config, 'train', train=False) == 12
  batches = [{k: np.asarray(v) for k, v in b.items()}
             for b in input_pipeline.create_eval_iterator(
                 config, global_batch_size=8, mesh=parallel.create_mesh())]
  assert len(batches) == 2
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert batch['image'].shape == (16, 8, 8, 1)
  np.testing.assert_array_equal(batch['mask'], np.arange(16) < 12)
  # The folder's order (a hash of each path), its files read whole.
  folder = image_folder.load_split(flat_folder, 'train', 2)
  ids = [int(os.path.basename(p)[:-len('.png')]) for p in folder.paths]
  assert sorted(ids) == list(range(12))
  np.testing.assert_allclose(batch['image'][:12],
                             np.broadcast_to(
                                 np.array([_scaled(10 * i + 5) for i in ids]
                                          )[:, None, None, None],
                                 (12, 8, 8, 1)), rtol=1e-6)
  assert (batch['image'][12:] == 0).all()
  np.testing.assert_array_equal(batch['label'][:12], [i % 2 for i in ids])


def test_train_batches_are_an_epoch_then_the_next(flat_folder):
  config = _data(image_folder=flat_folder)
  mesh = parallel.create_mesh()
  it = input_pipeline.create_train_iterator(config, global_batch_size=8,
                                            mesh=mesh, seed=0)
  firsts = [np.asarray(next(it)['image'])[:, 0, 0, 0] for _ in range(3)]
  stream = np.round((np.concatenate(firsts) + 1.0) * 255.0 / 2.0)
  ids = ((stream - 5) / 10).astype(int)
  # 24 examples: two epochs of the 12 images, each in its own order.
  assert sorted(ids[:12]) == sorted(ids[12:]) == list(range(12))
  assert list(ids[:12]) != list(ids[12:])
  resumed = input_pipeline.create_train_iterator(
      config, global_batch_size=8, mesh=mesh, seed=0, start_step=2)
  np.testing.assert_array_equal(np.asarray(next(resumed)['image'])[:, 0, 0, 0],
                                firsts[2])
  with pytest.raises(ValueError, match='has 12 examples per input stream, '
                     'fewer than the per-stream batch 16'):
    input_pipeline.create_train_iterator(config, global_batch_size=16,
                                         mesh=mesh, seed=0)

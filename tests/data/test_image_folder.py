"""Image folders: scanning, corrupt files, colour modes, splits, batches."""

import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist
from vqvae2_jax import parallel
from vqvae2_jax.data import image_folder
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.data import layout
from vqvae2_jax.data import tfds_prepare

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _rgb(rng, h, w):
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8), 'RGB')


def _make_folder(root):
  """Two classes of small images in every colour mode, plus bad files.

  cats/: 6 RGB JPEGs (various sizes), a grayscale PNG, an RGBA PNG, a
  palette PNG with transparency, a 16-bit grayscale PNG.
  dogs/: 6 RGB PNGs, a corrupt .jpg (random bytes), a truncated PNG
  (readable header, missing pixel data), a text file (not an image).
  """
  rng = np.random.default_rng(0)
  cats, dogs = os.path.join(root, 'cats'), os.path.join(root, 'dogs')
  os.makedirs(cats)
  os.makedirs(dogs)
  for i, (h, w) in enumerate([(20, 20), (24, 40), (40, 24), (16, 16),
                              (33, 17), (64, 48)]):
    _rgb(rng, h, w).save(os.path.join(cats, f'rgb{i}.jpg'), quality=90)
    _rgb(rng, 20, 20).save(os.path.join(dogs, f'rgb{i}.png'))
  Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8), 'L').save(
      os.path.join(cats, 'gray.png'))
  rgba = np.zeros((20, 20, 4), np.uint8)
  rgba[..., 0] = 255  # Red...
  rgba[:, :10, 3] = 255  # ...opaque on the left, transparent on the right.
  Image.fromarray(rgba, 'RGBA').save(os.path.join(cats, 'rgba.png'))
  palette = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20) % 4,
                            'P')
  palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
  palette.info['transparency'] = 0
  palette.save(os.path.join(cats, 'palette.png'), transparency=0)
  Image.fromarray((np.arange(400).reshape(20, 20) * 163).astype(np.uint16)
                  ).save(os.path.join(cats, 'deep16.png'))
  with open(os.path.join(dogs, 'corrupt.jpg'), 'wb') as f:
    f.write(rng.integers(0, 256, 500, np.uint8).tobytes())
  with open(os.path.join(dogs, 'rgb0.png'), 'rb') as f:
    data = f.read()
  with open(os.path.join(dogs, 'truncated.png'), 'wb') as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(dogs, 'notes.txt'), 'w') as f:
    f.write('not an image')
  return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return _make_folder(str(tmp_path_factory.mktemp('images')))


def _config(root, **overrides) -> ml_collections.ConfigDict:
  config = fashion_mnist.get_config().data
  config.name = 'image_folder'
  config.image_folder = root
  config.image_size = 16
  config.channels = 3
  config.num_classes = 2
  config.update(overrides)
  return config


def _host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_scan_skips_and_counts_corrupt_files(folder, caplog):
  image_folder.load_split.cache_clear()
  with caplog.at_level(logging.WARNING):
    split = image_folder.load_split(folder, 'train', 2)
  names = sorted(os.path.basename(p) for p in split.paths)
  assert 'corrupt.jpg' not in names and 'notes.txt' not in names
  assert 'truncated.png' in names  # Its header is fine; see the reader test.
  assert len(split) == 17 and split.num_skipped == 1
  assert 'skipped 1 unreadable file(s)' in caplog.text
  assert 'corrupt.jpg' in caplog.text
  assert split.class_names == ('cats', 'dogs')
  for path, label in zip(split.paths, split.labels):
    assert label == (0 if os.sep + 'cats' + os.sep in path else 1)


def test_reader_replaces_undecodable_file_by_the_next(folder, caplog):
  split = image_folder.load_split(folder, 'train', 2)
  bad = [i for i, p in enumerate(split.paths) if p.endswith('truncated.png')]
  reader = image_folder.SafeReader(split.paths, channels=3)
  with caplog.at_level(logging.WARNING):
    image = reader(bad[0])
  nxt = image_folder.read_image(split.paths[(bad[0] + 1) % len(split)], 3)
  np.testing.assert_array_equal(image, nxt)
  assert reader.num_failures == 1
  assert reader.failed_paths == {split.paths[bad[0]]}
  assert 'Skipping unreadable image' in caplog.text


@pytest.mark.parametrize('channels', [1, 3])
def test_colour_modes_are_converted(folder, channels):
  cats = os.path.join(folder, 'cats')
  for name in ('gray.png', 'rgba.png', 'palette.png', 'deep16.png',
               'rgb0.jpg'):
    array = image_folder.read_image(os.path.join(cats, name), channels)
    assert array.dtype == np.uint8 and array.ndim == 3
    assert array.shape[-1] == channels, name
  rgba = image_folder.read_image(os.path.join(cats, 'rgba.png'), 3)
  assert (rgba[:, :10] == [255, 0, 0]).all()  # Opaque red.
  assert (rgba[:, 10:] == 255).all()  # Transparent: white.
  gray = image_folder.read_image(os.path.join(cats, 'gray.png'), 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  deep = image_folder.read_image(os.path.join(cats, 'deep16.png'), 1)
  assert deep.max() > 200  # 16-bit rescaled, not clipped at 255.
  assert len(np.unique(deep)) > 100


@pytest.mark.parametrize('channels', [1, 3])
def test_batches_from_a_folder_with_bad_files(folder, channels):
  config = _config(folder, channels=channels)
  mesh = parallel.create_mesh()
  it = input_pipeline.create_train_iterator(config, global_batch_size=8,
                                            mesh=mesh, seed=0)
  for _ in range(5):  # More than two epochs of 17: every file is read.
    batch = _host(next(it))
    assert batch['image'].shape == (8, 16, 16, channels)
    assert batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    assert set(batch['label']) <= {0, 1}
  evals = [_host(b) for b in input_pipeline.create_eval_iterator(
      config, split='train', global_batch_size=8, mesh=mesh)]
  assert [b['mask'].sum() for b in evals] == [8, 8, 1]
  labels = np.concatenate([b['label'][b['mask']] for b in evals])
  assert sorted(labels) == [0] * 10 + [1] * 7


def test_folder_stream_is_deterministic_and_resumes_exactly(folder):
  config = _config(folder, random_flip=True)
  mesh = parallel.create_mesh()

  def stream(n, **kwargs):
    it = input_pipeline.create_train_iterator(
        config, global_batch_size=8, mesh=mesh, seed=1, **kwargs)
    return [_host(next(it)) for _ in range(n)]

  first, again = stream(7), stream(7)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  resumed = stream(4, start_step=3)  # Starts mid-epoch (17 examples).
  for a, b in zip(resumed, first[3:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_split_subdirectories_and_slices(tmp_path):
  rng = np.random.default_rng(1)
  for split, n in (('train', 12), ('test', 5)):
    os.makedirs(tmp_path / split)
    for i in range(n):
      _rgb(rng, 8, 8).save(tmp_path / split / f'{i}.png')
  root = str(tmp_path)
  assert len(image_folder.load_split(root, 'train', 0)) == 12
  test = image_folder.load_split(root, 'test', 0)
  assert len(test) == 5 and set(test.labels) == {0}
  head = image_folder.load_split(root, 'train[:75%]', 0)
  tail = image_folder.load_split(root, 'train[75%:]', 0)
  assert len(head) == 9 and len(tail) == 3
  assert not set(head.paths) & set(tail.paths)
  assert len(image_folder.load_split(root, 'test[-2:]', 0)) == 2
  # No 'validation' subdirectory: the split means the whole folder.
  assert len(image_folder.load_split(root, 'validation', 0)) == 17
  config = _config(root, num_classes=0, image_size=8)
  assert input_pipeline.num_examples(config, 'train[:75%]') == 9
  with pytest.raises(ValueError, match='not of the form'):
    image_folder.parse_split('train+test')


def test_class_count_must_match(folder):
  with pytest.raises(ValueError, match=r'has 2 class subdirectories.*'
                     r'num_classes=2'):
    image_folder.load_split(folder, 'train', 5)


def test_missing_folder_says_how_to_fix(tmp_path):
  config = _config(str(tmp_path / 'nowhere'))
  with pytest.raises(tfds_prepare.DataNotFoundError,
                     match=r'does not exist.*--config\.data\.image_folder='):
    input_pipeline.create_train_iterator(
        config, global_batch_size=8, mesh=parallel.create_mesh(), seed=0)


def test_large_images_resized_and_centre_cropped(tmp_path):
  # Left half black, right half white, 40 x 80: the centre crop of the
  # 16 x 32 resize keeps columns 8..24, half black and half white.
  array = np.zeros((40, 80, 3), np.uint8)
  array[:, 40:] = 255
  os.makedirs(tmp_path / 'x')
  Image.fromarray(array).save(tmp_path / 'x' / 'a.png')
  config = _config(str(tmp_path), num_classes=0)
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  batch = _host(next(input_pipeline.create_eval_iterator(
      config, split='train', global_batch_size=1, mesh=mesh)))
  image = batch['image'][0]
  assert image.shape == (16, 16, 3)
  np.testing.assert_allclose(image[:, :7], -1.0, atol=1e-6)
  np.testing.assert_allclose(image[:, 9:], 1.0, atol=1e-6)


@pytest.mark.parametrize('train', [True, False])
def test_process_shares_are_disjoint(folder, monkeypatch, train):
  """3 processes over 17 files: train shares 5 each, eval shares 6, 6, 5."""
  config = _config(folder)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  shares = []
  for index in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    assert input_pipeline.num_examples(config, 'train') == 17
    shares.append(layout.process_range(17, drop_remainder=train))
    assert input_pipeline.local_num_examples(
        config, 'train', train=train) == shares[-1][1] - shares[-1][0]
  sizes = [stop - start for start, stop in shares]
  assert sizes == ([5, 5, 5] if train else [6, 6, 5])
  covered = np.concatenate([np.arange(a, b) for a, b in shares])
  assert len(set(covered)) == len(covered) == sum(sizes)


def test_symlinks_never_multiply_files_or_leak_across_slices(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / 'images'
  os.makedirs(root / 'sub')
  for i in range(6):
    _rgb(rng, 8, 8).save(root / f'{i}.png')
  for i in range(4):
    _rgb(rng, 8, 8).save(root / 'sub' / f'{i}.png')
  os.symlink(root, root / 'loop')  # A loop back to the top.
  os.symlink(root / 'sub', root / 'sub_again')  # A second way in.
  os.symlink(root / '0.png', root / 'copy_of_0.png')  # A linked file.
  whole = image_folder.load_split(str(root), 'train', 0)
  assert len(whole) == 10
  assert len({os.path.realpath(p) for p in whole.paths}) == 10
  head = image_folder.load_split(str(root), 'train[:-3]', 0)
  tail = image_folder.load_split(str(root), 'train[-3:]', 0)
  assert len(head) == 7 and len(tail) == 3
  real = lambda split: {os.path.realpath(p) for p in split.paths}  # pylint: disable=unnecessary-lambda-assignment
  assert not real(head) & real(tail)


def test_a_split_of_undecodable_files_ends_the_run_with_its_message(
    tmp_path):
  # Headers read (the scan keeps them), pixel data is cut short: every
  # decode fails inside tf.data's worker threads, which used to hang.
  folder = tmp_path / 'truncated'
  os.makedirs(folder)
  _rgb(np.random.default_rng(3), 160, 160).save(tmp_path / 'full.jpg',
                                                quality=95)
  data = (tmp_path / 'full.jpg').read_bytes()
  for i in range(10):
    (folder / f'{i}.jpg').write_bytes(data[:len(data) // 3])
  result = subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.main',
       '--config=configs/fashion_mnist.py:tiny',
       '--config.data.name=image_folder',
       f'--config.data.image_folder={folder}', '--config.data.num_classes=0',
       f'--workdir={tmp_path / "w"}', '--mode=vqvae'],
      cwd=_ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: No image of the split could be decoded')
  assert 'Fix:' in last


_FAILING_READER_MAIN = """
import time
from absl import app
from vqvae2_jax import main
from vqvae2_jax.data import image_folder

def failing_read(self, index):
  time.sleep(0.2)  # Other reads are still running when the first fails.
  raise OSError(f'device went away while reading image {int(index)}')

image_folder.SafeReader.__call__ = failing_read
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_any_error_inside_the_input_pipeline_ends_the_run(tmp_path):
  # An error the reader does not catch, raised in tf.data's threads while
  # other reads are in flight: the iterator destroyed at interpreter exit
  # used to wait for them forever.
  folder = tmp_path / 'images'
  os.makedirs(folder)
  for i in range(8):
    _rgb(np.random.default_rng(i), 16, 16).save(folder / f'{i}.png')
  (tmp_path / 'run_main.py').write_text(_FAILING_READER_MAIN)
  result = subprocess.run(
      [sys.executable, str(tmp_path / 'run_main.py'),
       '--config=configs/fashion_mnist.py:tiny',
       '--config.data.name=image_folder',
       f'--config.data.image_folder={folder}', '--config.data.num_classes=0',
       f'--workdir={tmp_path / "w"}', '--mode=vqvae'],
      cwd=_ROOT, capture_output=True, text=True, timeout=240,
      env={**os.environ, 'PYTHONPATH': _ROOT})
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f"Error: Reading image folder '{folder}' split 'train' failed: "
      'UnknownError: OSError: device went away while reading image'), last
  assert 'Fix:' in last


def test_extreme_aspect_ratios_cost_bounded_memory(tmp_path):
  strip = np.random.default_rng(4).integers(0, 256, (1, 150_000, 3), np.uint8)
  Image.fromarray(strip, 'RGB').save(tmp_path / 'strip.png')
  image = image_folder.read_image(str(tmp_path / 'strip.png'), 3)
  # The centre, 4 times as long as it is high: resizing it to 32 pixels
  # high makes 32 x 128, not 32 x 4.8 million.
  assert image.shape == (1, 4, 3)
  np.testing.assert_array_equal(image, strip[:, 74_998:75_002])
  tall = np.zeros((50, 10, 1), np.uint8)
  assert image_folder.bound_aspect(tall).shape == (40, 10, 1)
  square = np.zeros((30, 20, 3), np.uint8)
  assert image_folder.bound_aspect(square) is square
  # Through the pipeline: a batch of the right shape.
  os.makedirs(tmp_path / 'folder')
  os.rename(tmp_path / 'strip.png', tmp_path / 'folder' / 'strip.png')
  _rgb(np.random.default_rng(5), 16, 16).save(tmp_path / 'folder' / 'ok.png')
  config = _config(str(tmp_path / 'folder'), num_classes=0, image_size=32)
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  batch = next(input_pipeline.create_eval_iterator(
      config, split='train', global_batch_size=2, mesh=mesh))
  assert _host(batch)['image'].shape == (2, 32, 32, 3)


def test_scan_counts_other_files_and_notes_animated_images(tmp_path, caplog):
  folder = tmp_path / 'mixed'
  os.makedirs(folder)
  rng = np.random.default_rng(6)
  for i in range(3):
    _rgb(rng, 8, 8).save(folder / f'{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  (folder / 'labels.csv').write_text('a,b')
  frames = [_rgb(rng, 8, 8) for _ in range(3)]
  frames[0].save(folder / 'anim.gif', save_all=True, append_images=frames[1:])
  with caplog.at_level(logging.INFO):
    split = image_folder.load_split(str(folder), 'train', 0)
    assert len(split) == 4
    image = image_folder.read_image(str(folder / 'anim.gif'), 3)
  assert image.shape == (8, 8, 3)
  text = caplog.text
  assert 'ignored 2 file(s) without an image extension' in text
  assert 'read as their first frame' in text

"""MNIST-family idx files: parsing, checksums, the input pipeline's layout."""

import gzip
import hashlib

import numpy as np
import pytest

from vqvae2_jax import errors
from vqvae2_jax.data import idx_files


def _idx(array: np.ndarray) -> bytes:
  """`array` (uint8) as a gzipped idx file: magic, dims, big-endian sizes."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def split_dir(tmp_path, monkeypatch):
  """A 'test' split of 3 images (28x28) whose checksums are recorded."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28), np.uint8)
  images[0] = 255  # One white image: its pixels map to exactly 1.
  labels = np.array([7, 0, 9], np.uint8)
  sums = {}
  for name, array in (('t10k-images-idx3-ubyte.gz', images),
                      ('t10k-labels-idx1-ubyte.gz', labels)):
    raw = _idx(array)
    (tmp_path / name).write_bytes(raw)
    sums[name] = hashlib.sha256(raw).hexdigest()
  monkeypatch.setattr(idx_files, '_checksums', lambda name: sums)
  return tmp_path, images, labels


def test_split_is_padded_centred_and_scaled(split_dir):
  directory, images, labels = split_dir
  got, got_labels = idx_files.read_split('fashion_mnist', 'test',
                                         str(directory), image_size=32)
  assert got.shape == (3, 32, 32, 1) and got.dtype == np.float32
  np.testing.assert_array_equal(got_labels, labels.astype(np.int32))
  assert got_labels.dtype == np.int32
  # The 28x28 image sits at rows and columns 2..29; the border is black.
  np.testing.assert_allclose(got[:, 2:30, 2:30, 0],
                             images * (2.0 / 255.0) - 1.0, atol=1e-6)
  assert (got[:, :2] == -1.0).all() and (got[:, 30:] == -1.0).all()
  assert (got[:, :, :2] == -1.0).all() and (got[:, :, 30:] == -1.0).all()
  assert got[0, 2:30, 2:30].min() == 1.0
  # An odd margin puts the extra row and column after the image.
  odd, _ = idx_files.read_split('fashion_mnist', 'test', str(directory),
                                image_size=31)
  assert odd.shape == (3, 31, 31, 1)
  np.testing.assert_array_equal(odd[:, 1:29, 1:29], got[:, 2:30, 2:30])


def test_a_changed_file_is_refused_naming_both_digests(split_dir):
  directory, _, _ = split_dir
  path = directory / 't10k-labels-idx1-ubyte.gz'
  path.write_bytes(_idx(np.array([1, 2, 3], np.uint8)))
  with pytest.raises(errors.DataNotFoundError,
                     match=r'has sha256 [0-9a-f]{64}, not [0-9a-f]{64}\. '
                     'Fix: reinstall'):
    idx_files.read_split('fashion_mnist', 'test', str(directory))


def test_a_missing_file_says_which_package_holds_it(tmp_path):
  with pytest.raises(errors.DataNotFoundError) as info:
    idx_files.read_split('fashion_mnist', 'train', str(tmp_path))
  assert 'train-images-idx3-ubyte.gz is missing' in str(info.value)
  assert 'Fix: install the Debian package dataset-fashion-mnist' in str(
      info.value)


def test_the_shipped_checksums_name_the_four_files():
  # pylint: disable-next=protected-access
  sums = idx_files._checksums('fashion_mnist')
  assert sorted(sums) == sorted(
      f'{p}-{kind}-idx{d}-ubyte.gz' for p in ('train', 't10k')
      for kind, d in (('images', 3), ('labels', 1)))
  assert all(len(v) == 64 for v in sums.values())

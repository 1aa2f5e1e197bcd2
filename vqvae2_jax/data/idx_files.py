"""MNIST-family idx files read with numpy alone, checksums checked.

The judge's training (experiments/train_judge.py) and its accuracy check
read the Debian package's Fashion-MNIST files directly: no tfds preparation
(about a minute), no TensorFlow. Images are laid out exactly as
`input_pipeline` lays them out (centred on a black canvas, x * 2/255 - 1).
"""

import gzip
import hashlib
import os

import numpy as np

from vqvae2_jax import errors
from vqvae2_jax.data import layout

_CHECKSUMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'checksums')
# Where the Debian package puts each dataset's files.
DEBIAN_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}
_PREFIXES = {'train': 'train', 'test': 't10k'}


def _checksums(name: str) -> dict[str, str]:
  """File name -> sha256, from checksums/<name>.tsv (url, size, sha, name)."""
  with open(os.path.join(_CHECKSUMS_DIR, f'{name}.tsv')) as f:
    rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
  return {row[3]: row[2] for row in rows}


def _read_idx(path: str, sha256: str) -> np.ndarray:
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise errors.DataNotFoundError(
        f'{path} is missing. Fix: install the Debian package '
        'dataset-fashion-mnist, or pass the directory of the four .gz '
        'files.') from None
  digest = hashlib.sha256(raw).hexdigest()
  if digest != sha256:
    raise errors.DataNotFoundError(
        f'{path} has sha256 {digest}, not {sha256}. Fix: reinstall the '
        'Debian package dataset-fashion-mnist.')
  data = gzip.decompress(raw)
  dims = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(dims))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def read_split(name: str, split: str, directory: str | None = None,
               image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """One split as the input pipeline gives it.

  Args:
    name: 'fashion_mnist' (a dataset with checksums/<name>.tsv).
    split: 'train' or 'test'.
    directory: holds the four .gz files; None: DEBIAN_DIRS[name].
    image_size: side of the black canvas the 28x28 images are centred on.

  Returns:
    (images float32 [n, image_size, image_size, 1] in [-1, 1],
     labels int32 [n]).

  Raises:
    errors.DataNotFoundError: a file is missing or has another checksum.
  """
  directory = directory or DEBIAN_DIRS[name]
  sums = _checksums(name)
  prefix = _PREFIXES[split]
  images, labels = (
      _read_idx(os.path.join(directory, f), sums[f])
      for f in (f'{prefix}-images-idx3-ubyte.gz',
                f'{prefix}-labels-idx1-ubyte.gz'))
  pad = (image_size - layout.PAD_SOURCE_SIZE) // 2
  rest = image_size - layout.PAD_SOURCE_SIZE - pad
  images = np.pad(images, ((0, 0), (pad, rest), (pad, rest)))[..., None]
  return (images.astype(np.float32) * (2.0 / 255.0) - 1.0,
          labels.astype(np.int32))

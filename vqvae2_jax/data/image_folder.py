"""Folders of the user's own images (FFHQ and the like).

Layout rules (`data.name = 'image_folder'`, root `data.image_folder`):

* Splits: if `<root>/<split>` is a directory (e.g. `train/`, `test/`), the
  split reads it; otherwise every split name means the whole folder. Splits
  take tfds-style slices, `train[:98%]` or `train[-500:]`, so a folder
  without split subdirectories still gets a held-out set:
  `--config.data.train_split='train[:98%]' --config.data.eval_split=
  'train[98%:]'`.
* Order: files are ordered by a hash of their path relative to the split
  directory, so slices are random-like subsets (not the last class folder),
  and the order is the same on every machine and file system.
* Labels: with `data.num_classes > 0`, the class of a file is the sorted
  index of its top-level subdirectory (`<split dir>/<class>/.../x.png`), and
  the folder must have exactly that many class subdirectories. With
  `num_classes == 0` the folder is read recursively and every label is 0.
* Unreadable files: files whose header cannot be read (not an image,
  truncated header, no permission) are skipped when the folder is scanned,
  counted and logged. So are images over PIL's decompression-bomb limit
  (about 179M pixels unless `data.max_image_pixels` changes it), with a
  warning of their own that says how to raise it. A file that passes the
  scan but fails to decode later (truncated pixel data) is replaced by the
  next file of the split, logged and counted, so batches keep their size
  and a resumed run stays exact.
* Colours: grayscale, palette, 16-bit, CMYK and alpha images are converted
  to `channels` (1: 'L', 3: 'RGB'); transparency is composited onto white.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import re
import threading

from absl import logging
import numpy as np
from PIL import Image

from vqvae2_jax import errors

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm')
_SPLIT_RE = re.compile(
    r'^\s*(?P<name>[\w\-.]+)\s*'
    r'(\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<stop>-?\d+%?)?\s*\])?\s*$')
_MAX_LOGGED = 10  # Unreadable files named in the log, per scan.


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The readable images of one split of an image folder.

  Attributes:
    directory: the directory the split reads.
    paths: absolute file paths, in the split's (hash) order.
    labels: int32 [len(paths)], class indices (0 when unlabelled).
    class_names: names of the class subdirectories, () when unlabelled.
    num_skipped: files skipped by the scan as unreadable.
  """
  directory: str
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  num_skipped: int

  def __len__(self) -> int:
    return len(self.paths)


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """Splits 'train[10%:-5]' into ('train', '10%', '-5')."""
  match = _SPLIT_RE.match(split)
  if not match:
    raise ValueError(
        f'Image folder split {split!r} is not of the form name or '
        "name[start:stop] (e.g. 'train', 'train[:98%]', 'test[-100:]'); "
        "combinations with '+' are not supported for image folders.")
  return match['name'], match['start'], match['stop']


def _bound(spec: str | None, n: int, default: int) -> int:
  if spec is None:
    return default
  if spec.endswith('%'):
    value = int(round(int(spec[:-1]) * n / 100))
  else:
    value = int(spec)
  if value < 0:
    value += n
  return min(max(value, 0), n)


_PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's default.


def set_max_image_pixels(max_pixels: int) -> None:
  """PIL's decompression-bomb guard for every image this process opens.

  Args:
    max_pixels: `data.max_image_pixels`: PIL refuses images of more than
      twice this many pixels (and warns over it); 0 restores PIL's default.
  """
  Image.MAX_IMAGE_PIXELS = (int(max_pixels) if max_pixels > 0 else
                            _PIL_MAX_IMAGE_PIXELS)


@functools.lru_cache(maxsize=16)
def load_split(root: str, split: str, num_classes: int,
               max_pixels: int = 0) -> FolderSplit:
  """Scans `root` for the images of `split` (cached per process).

  Args:
    root: the image folder (`data.image_folder`).
    split: split name with an optional slice, see the module docstring.
    num_classes: `data.num_classes`; 0 for unlabelled.
    max_pixels: `data.max_image_pixels` (`set_max_image_pixels`), applied
      to this and later reads.

  Returns:
    The split's readable images and labels.

  Raises:
    DataNotFoundError: when `root` is missing or holds no readable image.
    errors.ConfigError: when the class subdirectories do not match
      `num_classes`.
  """
  set_max_image_pixels(max_pixels)
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise errors.DataNotFoundError(
        f'Image folder {root!r} does not exist (config.data.image_folder). '
        'Fix: pass --config.data.image_folder=/path/to/images, a directory '
        'of image files (optionally in train/ and test/ subdirectories, and '
        'in one subdirectory per class when config.data.num_classes > 0).')
  name, start, stop = parse_split(split)
  directory = os.path.join(root, name)
  if not os.path.isdir(directory):
    directory = root
  files = _list_images(directory)

  class_names, files = _class_names(directory, files, num_classes)
  readable, too_large = _readable(directory, files)
  skipped = sorted(set(files) - set(readable))
  unreadable = sorted(set(skipped) - {f for f, _, _ in too_large})
  too_large_fix = _log_skipped(directory, len(files), unreadable, too_large)
  # Hash order: random-like slices, independent of the file system.
  readable.sort(key=lambda f: (hashlib.sha1(f.encode('utf-8')).hexdigest(), f))
  n = len(readable)
  readable = readable[_bound(start, n, 0):_bound(stop, n, n)]
  if not readable and too_large and not unreadable:
    raise errors.DataNotFoundError(
        f'Image folder split {split!r} in {directory} has no image PIL may '
        f'open: {too_large_fix}.')
  if not readable:
    raise errors.DataNotFoundError(
        f'Image folder split {split!r} in {directory} has no readable image '
        f'({len(files)} files with an image extension {IMAGE_EXTENSIONS}, '
        f'{len(unreadable)} unreadable, {len(too_large)} too large). Fix: '
        'check --config.data.image_folder and the split names '
        '--config.data.train_split/eval_split.')
  index = {c: i for i, c in enumerate(class_names)}
  labels = np.asarray([index[f.split(os.sep, 1)[0]] if class_names else 0
                       for f in readable], np.int32)
  logging.info('Image folder %s split %r: %d images, %d classes, %d skipped.',
               directory, split, len(readable), len(class_names), len(skipped))
  return FolderSplit(directory=directory,
                     paths=tuple(os.path.join(directory, f) for f in readable),
                     labels=labels, class_names=class_names,
                     num_skipped=len(skipped))


def _class_names(directory: str, files: list[str], num_classes: int
                 ) -> tuple[tuple[str, ...], list[str]]:
  """The class subdirectories' names, sorted (none when unlabelled), and the
  files in them (all of `files` when unlabelled).

  Raises:
    errors.ConfigError: the subdirectories do not number `num_classes`.
  """
  if num_classes <= 0:
    return (), files
  class_names = tuple(sorted({f.split(os.sep, 1)[0] for f in files
                              if os.sep in f}))
  if len(class_names) != num_classes:
    raise errors.ConfigError(
        f'config.data.num_classes is {num_classes} but {directory} has '
        f'{len(class_names)} class subdirectories '
        f'{list(class_names[:20])}. Fix: put each class in its own '
        'subdirectory, or set --config.data.num_classes='
        f'{len(class_names)} (0 for unlabelled data).')
  top_level = [f for f in files if os.sep not in f]
  if top_level:
    logging.warning('Image folder %s: ignoring %d files outside the class '
                    'subdirectories (e.g. %s).', directory, len(top_level),
                    top_level[0])
  return class_names, [f for f in files if os.sep in f]


def _log_skipped(directory: str, num_files: int, unreadable: list[str],
                 too_large: list[tuple[str, str, int]]) -> str:
  """Warns of the files skipped; returns the fix for the too-large ones
  ('' when none is)."""
  too_large_fix = ''
  if too_large:
    too_large_fix = (
        f'{len(too_large)} image(s) over PIL\'s decompression-bomb limit '
        f'(e.g. {too_large[0][0]}: {too_large[0][1]}). Fix: downscale them, '
        'or raise the limit with --config.data.max_image_pixels='
        f'{max(pixels for _, _, pixels in too_large)} (PIL refuses images '
        'over twice it) if you trust the files')
    logging.warning('Image folder %s: skipped %s.', directory, too_large_fix)
  for path in unreadable:  # Every one in the log; the warning counts them.
    logging.info('Image folder %s: unreadable, skipped: %s', directory, path)
  if unreadable:
    logging.warning(
        'Image folder %s: skipped %d unreadable file(s) of %d: %s%s',
        directory, len(unreadable), num_files,
        ', '.join(unreadable[:_MAX_LOGGED]),
        ' ...' if len(unreadable) > _MAX_LOGGED else '')
  return too_large_fix


def _list_images(directory: str) -> list[str]:
  """Relative paths of the files with image extensions, hidden ones left out.

  Symbolic links are followed (class directories are often links), but
  every real directory is walked once and every real file listed once: a
  link loop or a second link to the same files would otherwise multiply
  the data, and a sliced split (train[:-64] / train[-64:]) would share
  files with its complement. The first path in sorted walk order wins.
  """
  found, seen_dirs, seen_files, duplicates = [], set(), set(), 0
  other = []  # Visible files without an image extension.
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    real_dir = os.path.realpath(dirpath)
    if real_dir in seen_dirs:
      dirnames[:] = []
      continue
    seen_dirs.add(real_dir)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    rel = os.path.relpath(dirpath, directory)
    for f in sorted(filenames):
      if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS):
        real_file = os.path.realpath(os.path.join(dirpath, f))
        if real_file in seen_files:
          duplicates += 1
          continue
        seen_files.add(real_file)
        found.append(f if rel == '.' else os.path.join(rel, f))
      elif not f.startswith('.'):
        other.append(f if rel == '.' else os.path.join(rel, f))
  if other:
    logging.warning('Image folder %s: ignored %d file(s) without an image '
                    'extension %s (e.g. %s).', directory, len(other),
                    IMAGE_EXTENSIONS, other[0])
  if duplicates:
    logging.warning('Image folder %s: %d path(s) led to files already listed '
                    '(symbolic links); each file is used once.', directory,
                    duplicates)
  return found


def _header_problem(path: str) -> bool | tuple[str, int]:
  """False if the image header reads; else True, or (PIL's message, the
  image's pixels) for an image over PIL's decompression-bomb limit."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      return not (width > 0 and height > 0)
  except Image.DecompressionBombError as e:
    pixels = re.search(r'\((\d+) pixels\)', str(e))
    return str(e), int(pixels.group(1)) if pixels else 0
  except Exception:  # pylint: disable=broad-except
    # Any other failure (not an image, truncated, unreadable): skip it.
    return True


def _readable(directory: str, files: list[str]
              ) -> tuple[list[str], list[tuple[str, str, int]]]:
  """The files whose image header reads, and (file, PIL's message, pixels)
  of those over PIL's decompression-bomb limit; threads hide file-system
  latency."""
  paths = [os.path.join(directory, f) for f in files]
  with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    problems = list(pool.map(_header_problem, paths, chunksize=64))
  return ([f for f, p in zip(files, problems) if p is False],
          [(f, *p) for f, p in zip(files, problems) if isinstance(p, tuple)])


def to_array(image: Image.Image, channels: int) -> np.ndarray:
  """A PIL image as uint8 [h, w, channels] (1: grayscale, 3: RGB)."""
  if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
    # 16-bit and float images: rescale to 8 bits rather than clip.
    values = np.asarray(image, np.float64)
    top = 65535.0 if image.mode != 'F' and values.max() > 255 else 255.0
    if image.mode == 'F':
      top = max(float(values.max()), 1e-12)
    image = Image.fromarray(
        np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8),
        'L')
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image)
  image = image.convert('L' if channels == 1 else 'RGB')
  array = np.asarray(image, np.uint8)
  if array.ndim == 2:
    array = array[:, :, None]
  return array


def read_image(path: str, channels: int, min_size: int = 0) -> np.ndarray:
  """Decodes `path` to uint8 [h, w, channels].

  Args:
    path: image file.
    channels: 1 or 3.
    min_size: JPEGs may be decoded at a reduced scale (much faster) as long
      as both sides stay >= min_size; 0 decodes at full size.

  Returns:
    uint8 [h, w, channels].
  """
  with Image.open(path) as image:
    if min_size and image.format == 'JPEG':
      image.draft('L' if channels == 1 else 'RGB', (min_size, min_size))
    if getattr(image, 'is_animated', False) and not _WARNED_ANIMATED:
      _WARNED_ANIMATED.append(path)
      logging.warning('Animated images (the first: %s) are read as their '
                      'first frame.', path)
    image.load()
    return bound_aspect(to_array(image, channels))


_WARNED_ANIMATED: list[str] = []  # Said once per process.


# Images are resized so that their shorter side is the image size, then
# centre-cropped: a 1 x 150,000 strip would become 32 x 4.8M pixels first.
MAX_ASPECT = 4


def bound_aspect(image: np.ndarray, max_aspect: int = MAX_ASPECT
                 ) -> np.ndarray:
  """The centre of `image` [h, w, c], its longer side cut to max_aspect
  times the shorter (a view; images within the ratio are returned as they
  are). The centre crop that follows keeps a square anyway, so only the
  part no crop could reach is dropped; memory stays bounded by the ratio."""
  h, w = image.shape[:2]
  short = max(min(h, w), 1)
  if h > max_aspect * short:
    top = (h - max_aspect * short) // 2
    return image[top:top + max_aspect * short]
  if w > max_aspect * short:
    left = (w - max_aspect * short) // 2
    return image[:, left:left + max_aspect * short]
  return image


class SafeReader:
  """Reads images of a split by index; a failing file is replaced by the next.

  Thread-safe: tf.data calls it from several threads.
  """

  def __init__(self, paths: tuple[str, ...], channels: int,
               min_size: int = 0):
    self._paths = paths
    self._channels = channels
    self._min_size = min_size
    self._lock = threading.Lock()
    self._failed: set[str] = set()
    self.num_failures = 0  # Decode failures seen (with repeats).

  @property
  def failed_paths(self) -> frozenset[str]:
    with self._lock:
      return frozenset(self._failed)

  def __call__(self, index) -> np.ndarray:
    n = len(self._paths)
    index = int(index)
    for k in range(n):
      path = self._paths[(index + k) % n]
      try:
        return read_image(path, self._channels, self._min_size)
      except Exception as e:  # pylint: disable=broad-except
        # A corrupt file must not end a long run: log it, count it and use
        # the next file so that batch contents stay a function of the index.
        with self._lock:
          self.num_failures += 1
          first_time = path not in self._failed
          self._failed.add(path)
          with _UNREADABLE_LOCK:
            _FAILED_FILES.add(path)
          count = len(self._failed)
        if first_time:
          logging.warning('Skipping unreadable image %s (%s: %s); %d such '
                          'file(s) so far.', path, type(e).__name__, e, count)
    # Raised here, inside a tf.data worker thread, the error would reach the
    # user wrapped in TF's UnknownError (and used to hang the process, see
    # input_pipeline._ClosableIterator); record it for `raise_if_unreadable`
    # (called by the batch loop on the main thread) and hand tf.data a
    # placeholder.
    error = errors.DataNotFoundError(
        f'No image of the split could be decoded: all {n} files of '
        f'{os.path.dirname(self._paths[0]) if n else "the split"} fail to '
        f'decode (e.g. {self._paths[index % n] if n else "-"}). Fix: check '
        'the files (truncated or corrupt?) or point '
        '--config.data.image_folder at readable images.')
    with _UNREADABLE_LOCK:
      _UNREADABLE.append(error)
    return np.zeros((1, 1, self._channels), np.uint8)


_FAILED_FILES: set[str] = set()  # Every reader's, for run totals.


def undecodable_files() -> frozenset[str]:
  """Every file a reader of this process has failed to decode so far."""
  with _UNREADABLE_LOCK:
    return frozenset(_FAILED_FILES)


_UNREADABLE: list[Exception] = []
_UNREADABLE_LOCK = threading.Lock()


def raise_if_unreadable() -> None:
  """Raises the first split-wide decode failure any reader recorded."""
  with _UNREADABLE_LOCK:
    if _UNREADABLE:
      error = _UNREADABLE[0]
      _UNREADABLE.clear()
      raise error

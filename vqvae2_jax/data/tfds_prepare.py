"""Finding and preparing tfds datasets, offline where possible.

`prepare_builder(data_config)` returns a prepared `tfds` builder. When the
dataset is not in `data_config.data_dir` yet it is prepared from, in order:

1. Files the user downloaded by hand (`data_config.manual_dir`), or for
   Fashion-MNIST the files of the Debian package `dataset-fashion-mnist`
   (`/usr/share/datasets/fashion-mnist`, found without configuration).
2. A tfds download, when the dataset's servers can be reached.

The Debian files hold the same images as the official release, but they are
compressed again, so their checksums differ from those tfds registered for
`fashion_mnist`. tfds takes a manually placed file only if it matches the
checksum registered for its URL, and it reads those checksums from the
builder class (`url_infos`, loaded from `_checksums_path`), not from the
global `tfds.download.add_checksums_dir` registry (which only reads `*.txt`
files and never overrides a checksum tfds ships). So the Debian files are
prepared with a subclass of tfds's own builder, unregistered and with the
same name, whose checksums come from `checksums/<name>.tsv` in this package.
It writes exactly what tfds's builder writes (`<data_dir>/fashion_mnist/
<version>/`), so plain `tfds.builder('fashion_mnist')` reads it afterwards.
Nothing is written into site-packages.

Without data anywhere, `DataNotFoundError` says how to get it.
"""

import contextlib
import fcntl
import functools
import os
import pathlib
import socket
import tempfile
from typing import Iterator
import urllib.parse

from absl import logging
from etils import epath
import jax
import ml_collections
import tensorflow_datasets as tfds

from vqvae2_jax import console
from vqvae2_jax import errors

_CHECKSUMS_DIR = pathlib.Path(__file__).resolve().parent / 'checksums'

# tfds datasets that a Debian package ships: tfds name -> (package, directory).
DEBIAN_SOURCES = {
    'fashion_mnist': ('dataset-fashion-mnist',
                      '/usr/share/datasets/fashion-mnist'),
}

# Seconds to wait for a dataset's download server before declaring it
# unreachable (tfds itself retries a failed download for minutes).
_PROBE_TIMEOUT_S = 5.0


# Defined in errors (tfds-free); kept under this name for its callers.
DataNotFoundError = errors.DataNotFoundError


def data_dir_or_default(data_config: ml_collections.ConfigDict) -> str:
  """`data_config.data_dir`, or the tfds default (~/tensorflow_datasets)."""
  return os.path.expanduser(data_config.data_dir or
                            tfds.core.constants.DATA_DIR)


def prepare_builder(data_config: ml_collections.ConfigDict
                    ) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of `data_config.name`, prepared on disk.

  Process 0 prepares first; other processes then find the data if
  `data_dir` is shared, or prepare their own copy if it is host-local.

  Args:
    data_config: the config's `data` section (name, data_dir, manual_dir).

  Returns:
    A builder whose `as_dataset` works.

  Raises:
    DataNotFoundError: with instructions, when the data cannot be obtained.
  """
  data_dir = data_dir_or_default(data_config)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      _prepare(data_config.name, data_dir, data_config.manual_dir)
    multihost_utils.sync_global_devices(f'prepared {data_config.name}')
  return _prepare(data_config.name, data_dir, data_config.manual_dir)


def _prepare(name: str, data_dir: str, manual_dir: str
             ) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  # Several processes on one machine (e.g. concurrent test runs) may try to
  # prepare the same dataset; the lock makes the others wait and reuse it.
  with _file_lock(os.path.join(data_dir, f'.{builder.name}.prepare.lock')):
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
    console.say('Preparing the dataset %s in %s (once)', name, data_dir)
    with console.captured(f'preparing {name}'):
      if console.is_quiet():
        tfds.disable_progress_bar()
      _download_and_prepare(builder, name, data_dir, manual_dir)
  return tfds.builder(name, data_dir=data_dir)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download_and_prepare(builder: tfds.core.DatasetBuilder, name: str,
                          data_dir: str, manual_dir: str) -> None:
  """Prepares `builder` from manual files, Debian files or a download."""
  base_name = builder.name
  expected = dict(type(builder).url_infos or {})
  manual = epath.Path(manual_dir).expanduser() if manual_dir else None

  if manual is None and base_name in DEBIAN_SOURCES:
    debian_dir = epath.Path(DEBIAN_SOURCES[base_name][1])
    if _has_files(debian_dir, expected):
      manual = debian_dir
  if manual is not None:
    if not manual.is_dir():
      raise DataNotFoundError(_missing_message(
          builder, data_dir, f'config.data.manual_dir={manual_dir!r} is not '
          'a directory'))
    if expected and _has_files(manual, expected):
      _prepare_from_files(builder, name, data_dir, manual, expected)
      return
    if not expected and any(manual.iterdir()):
      # Manual-download datasets (imagenet2012): tfds knows the file names.
      _run_tfds_prepare(builder, data_dir, manual)
      return
    raise DataNotFoundError(_missing_message(
        builder, data_dir, f'{manual} lacks the source files '
        f'{sorted(_filenames(expected)) or "(see the instructions)"}'))

  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    default_manual = epath.Path(data_dir) / 'downloads' / 'manual'
    if default_manual.is_dir() and any(default_manual.iterdir()):
      _run_tfds_prepare(builder, data_dir, None)
      return
    raise DataNotFoundError(_missing_message(
        builder, data_dir, 'this dataset must be downloaded by hand'))

  unreachable = _unreachable_host(expected)
  if unreachable:
    raise DataNotFoundError(_missing_message(
        builder, data_dir, f'its download server {unreachable} cannot be '
        'reached'))
  logging.info('Downloading and preparing %s into %s.', name, data_dir)
  try:
    _run_tfds_prepare(builder, data_dir, None)
  except OSError as e:  # requests' ConnectionError is an OSError.
    raise DataNotFoundError(_missing_message(
        builder, data_dir, f'the download failed ({e})')) from e


def _run_tfds_prepare(builder: tfds.core.DatasetBuilder, data_dir: str,
                      manual: epath.Path | None) -> None:
  logging.info('Preparing tfds %s in %s (manual files: %s).', builder.name,
               data_dir, manual)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual) if manual else None))


def _prepare_from_files(builder: tfds.core.DatasetBuilder, name: str,
                        data_dir: str, manual: epath.Path,
                        expected: dict[str, tfds.download.checksums.UrlInfo]
                        ) -> None:
  """Prepares from source files in `manual` (official or Debian copies)."""
  if files_match(manual, expected):
    _run_tfds_prepare(builder, data_dir, manual)
    return
  offline_cls = offline_builder_cls(builder.name)
  if offline_cls is None or not files_match(manual, offline_cls.url_infos):
    raise DataNotFoundError(_missing_message(
        builder, data_dir, f'the files in {manual} have neither the official '
        'checksums nor those of the Debian package (corrupt or another '
        'release?)'))
  # Extracted copies of the sources are only needed while preparing.
  with tempfile.TemporaryDirectory(prefix=f'{builder.name}_extract_') as tmp:
    offline = offline_cls(data_dir=data_dir,
                          config=builder.builder_config,
                          version=builder.version)
    logging.info('Preparing tfds %s from the Debian files in %s.', name,
                 manual)
    offline.download_and_prepare(
        download_dir=tmp,
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual), try_download_gcs=False))


@functools.cache
def offline_builder_cls(name: str) -> type[tfds.core.DatasetBuilder] | None:
  """tfds's builder class for `name` with this package's checksums.

  Args:
    name: a tfds dataset name, e.g. 'fashion_mnist'.

  Returns:
    A subclass of tfds's builder under the same name (so the data lands where
    `tfds.builder(name)` looks) whose `url_infos` are the checksums of the
    Debian copies in vqvae2_jax/data/checksums/; None when that directory
    has none for `name`.
  """
  checksums = _CHECKSUMS_DIR / f'{name}.tsv'
  if not checksums.exists():
    return None
  base = tfds.builder_cls(name)

  class OfflineBuilder(base, skip_registration=True):
    """Same dataset and files on disk; checksums of the local copies."""

  # Same name, so the data lands where tfds.builder(name) looks for it.
  OfflineBuilder.name = name
  # `url_infos` (what the download manager validates against) is loaded from
  # this path.
  OfflineBuilder._checksums_path = epath.Path(checksums)  # pylint: disable=protected-access
  OfflineBuilder.__name__ = OfflineBuilder.__qualname__ = (
      f'Offline{base.__name__}')
  return OfflineBuilder


def _filenames(url_infos) -> set[str]:
  return {info.filename or os.path.basename(urllib.parse.urlparse(url).path)
          for url, info in url_infos.items()}


def _has_files(directory: epath.Path, url_infos) -> bool:
  return bool(url_infos) and directory.is_dir() and all(
      (directory / f).exists() for f in _filenames(url_infos))


def files_match(directory: epath.Path, url_infos) -> bool:
  """Whether every file in `directory` has its registered size and sha256.

  Args:
    directory: where the source files are (e.g. a manual_dir).
    url_infos: url -> `UrlInfo` (size, sha256, filename), as a builder
      class's `url_infos`.

  Returns:
    True when every registered file is there with that size and checksum.
  """
  for url, info in url_infos.items():
    path = directory / (info.filename or
                        os.path.basename(urllib.parse.urlparse(url).path))
    if not path.exists() or path.stat().length != info.size:
      return False
    if tfds.download.checksums.compute_url_info(path) != info:
      return False
  return True


def _unreachable_host(url_infos) -> str | None:
  """The first download host that does not accept a connection, or None."""
  hosts = set()
  for url in url_infos:
    parsed = urllib.parse.urlparse(url)
    default_port = 443 if parsed.scheme == 'https' else 80
    hosts.add((parsed.hostname, parsed.port or default_port))
  for host, port in sorted(hosts):
    try:
      with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
        pass
    except OSError:
      return host
  return None


def _missing_message(builder: tfds.core.DatasetBuilder, data_dir: str,
                     reason: str) -> str:
  """Explains how to obtain `builder`'s dataset."""
  name = builder.name
  lines = [f'Dataset {name!r} is not prepared in {data_dir} and cannot be '
           f'prepared: {reason}.', 'Get it in one of these ways:']
  if name in DEBIAN_SOURCES:
    package, directory = DEBIAN_SOURCES[name]
    lines.append(f'  * Debian/Ubuntu: `sudo apt-get install {package}` '
                 f'(files in {directory}, found automatically).')
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    lines.append('  * Download the source files by hand (tfds instructions: '
                 + ' '.join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
                 + ') and pass --config.data.manual_dir=/path/to/them.')
  else:
    lines.append(
        '  * On a machine with internet: python -c "import '
        'tensorflow_datasets as tfds; tfds.builder(\'' + name +
        f'\', data_dir=\'{data_dir}\').download_and_prepare()" '
        '(then copy that data_dir here if needed).')
    files = sorted(_filenames(builder.url_infos or {}))
    lines.append('  * Put the source files' +
                 (f' ({", ".join(files)})' if files else '') +
                 ' in a directory and pass --config.data.manual_dir=/path.')
  lines.append('  * Or point --config.data.data_dir at a directory where '
               f'tfds already prepared {name}.')
  return '\n'.join(lines)

"""Small files every stage writes: JSON and other atomic writes.

Every file is written to a temporary name, flushed to disk and renamed, so a
reader (or a rerun after a kill) sees the old file or the whole new one,
never half of it. JSON is normalised (tuples become lists, keys sorted, NaN
and infinities become null) so that the same data always gives the same,
valid bytes.
"""

from collections.abc import Callable, Mapping
import errno
import hashlib
import json
import math
import os
import tempfile
from typing import Any, BinaryIO

from vqvae2_jax import errors

_TMP_SUFFIX = '.tmp'


def ensure_writable(directory: str, what: str) -> None:
  """Creates `directory` if needed and checks that a file can be written.

  Stages call it before their work, so that a workdir they cannot write
  fails in a second, not after hours of sampling. Remote paths (gs://...)
  are left to the writes themselves.

  Args:
    directory: where the stage will write.
    what: what it writes there, for the message (e.g. 'samples').

  Raises:
    errors.WorkdirError: naming the path, the cause and the fix.
  """
  directory = os.fspath(directory)
  if '://' in directory:
    return
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_check_', dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(
        f'Cannot write {what} to {directory}: {e.strerror or e}. Fix: pass a '
        '--workdir you can write to (a finished stage only reads, so a '
        'read-only workdir can be copied or its finished stages reused), or '
        'fix its permissions or free space.') from e


# Disk-full errors as the OS and tensorstore (orbax's array writer) word
# them: tensorstore raises ValueError('RESOURCE_EXHAUSTED: ... No space left
# on device [os_error_code='28']'), not OSError.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = tuple(os.strerror(e) for e in _DISK_FULL_ERRNOS) + tuple(
    f"os_error_code='{e}'" for e in _DISK_FULL_ERRNOS)


def mentions_disk_full(text: str) -> bool:
  """Whether `text` reports a full disk or quota (as OSError or tensorstore)."""
  return any(t in text for t in _DISK_FULL_TEXTS)


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an exception it came from, is a full disk (or quota).

  Orbax saves in background threads and re-raises their failures wrapped
  (or as tensorstore's ValueError), so the chain and the text are checked,
  not only `OSError.errno`.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return True
    if mentions_disk_full(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def size_text(num_bytes: int) -> str:
  """A byte count as people read it: '1.5 MB (1500000 bytes)'."""
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.1f} {unit} ({num_bytes} bytes)'
  return f'{num_bytes} bytes'


def disk_full_error(directory: str, error: BaseException, intact: str,
                    needed: int | None = None) -> errors.WorkdirError:
  """The one message of a full disk: where, the cause, and what is intact.

  Args:
    directory: where the stage was writing.
    error: the disk-full error (`is_disk_full(error)`).
    intact: what survived and how a rerun goes on, e.g. 'the newest intact
      checkpoint is step 4 and a rerun resumes from it'.
    needed: about how many bytes the write that failed needs (the files
      still to write), when the caller knows; the message says it.

  Returns:
    The error to raise (from `error`).
  """
  filename = getattr(error, 'filename', None)
  where = f' at {filename}' if filename else ''
  space = ('' if needed is None else
           f'; about {size_text(int(needed))} still to write')
  return errors.WorkdirError(
      f'The disk is full writing to {os.fspath(directory)}{where} (No space '
      f'left on device{space}); {intact}. Fix: free space on that disk (or '
      'copy the workdir to a disk with room and pass that --workdir), then '
      'run the same command again.')


def atomic_write(path: str, write_fn: Callable[[BinaryIO], Any]) -> None:
  """Calls `write_fn(f)` on a temporary file, then renames it to `path`.

  A failed write (a full disk) removes its temporary file and leaves any
  earlier `path` as it was.

  Args:
    path: the file to (re)place; its directory is created if missing.
    write_fn: writes the contents to the binary file object it is given.
  """
  path = os.fspath(path)
  tmp = path + _TMP_SUFFIX
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    with open(tmp, 'wb') as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    # The space a half-written file holds is given back to the disk.
    try:
      os.remove(tmp)
    except OSError:
      pass  # Never created, or not removable: the first error matters.
    raise
  os.replace(tmp, path)  # Atomic: readers see the old state or the whole file.


class HashingWriter:
  """A binary file object that hashes (SHA-256) what goes through it.

  `atomic_write(path, lambda f: save(HashingWriter(f, digest), ...))` records
  the digest of the bytes as they are written, so a later reader can tell a
  damaged file from the one written.
  """

  def __init__(self, file: BinaryIO, digest: Any):
    self._file = file
    self._digest = digest

  def write(self, data: bytes) -> int:
    self._digest.update(data)
    return self._file.write(data)

  def flush(self) -> None:
    self._file.flush()


def sha256_file(path: str, chunk_bytes: int = 1 << 22) -> str:
  """The SHA-256 of the file at `path` (hex), read in chunks.

  Raises:
    OSError: the file cannot be read (FileNotFoundError when missing).
  """
  digest = hashlib.sha256()
  with open(os.fspath(path), 'rb') as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def _finite_or_none(value: Any) -> Any:
  """JSON has no NaN or infinity: they become null, recursively."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
    return _finite_or_none(value.item())  # numpy / jax scalars
  if hasattr(value, 'tolist'):
    return _finite_or_none(value.tolist())  # numpy arrays
  return value


def normalise_json(data: Mapping[str, Any]) -> dict[str, Any]:
  """`data` as it comes back from a JSON file (lists, str keys, null)."""
  return json.loads(json.dumps(_finite_or_none(dict(data)), sort_keys=True,
                               allow_nan=False))


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Writes `data` as JSON atomically; the same data gives the same bytes.

  Callers in a multi-process run decide which process writes (usually
  process 0 only); this function writes whenever it is called.
  """
  text = json.dumps(normalise_json(data), indent=2, sort_keys=True,
                    allow_nan=False) + '\n'
  atomic_write(path, lambda f: f.write(text.encode()))


def write_json_once(path: str, data: Mapping[str, Any]) -> None:
  """`write_json` on process 0 only (every process computes the same `data`)."""
  import jax  # pylint: disable=g-import-not-at-top  # Not needed elsewhere.
  if jax.process_index() == 0:
    write_json(path, data)


def read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None if the file does not exist."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

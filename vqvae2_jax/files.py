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
import struct
import tempfile
from typing import Any, BinaryIO, Optional

import msgpack
import numpy as np

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


# Reading a flax msgpack file (`flax.serialization.msgpack_serialize`) as
# numpy views of one buffer. flax's `msgpack_restore` copies every array
# twice (msgpack's ext data, then the inner bytes); this reads the file once
# and copies nothing (but arrays of over 1 GiB, which flax writes in chunks),
# and tells where each value's bytes lie, so that their
# digests are taken over the file itself, not over a serialisation made
# again. The types are msgpack's (https://msgpack.org/): what flax writes.

_MSGPACK_FIXED = {  # First byte -> (struct format, size) of a fixed value.
    0xca: ('>f', 4), 0xcb: ('>d', 8), 0xcc: ('>B', 1), 0xcd: ('>H', 2),
    0xce: ('>I', 4), 0xcf: ('>Q', 8), 0xd0: ('>b', 1), 0xd1: ('>h', 2),
    0xd2: ('>i', 4), 0xd3: ('>q', 8)}
_MSGPACK_LENGTH = {  # First byte -> (kind, length format, its size).
    0xc4: ('bin', '>B', 1), 0xc5: ('bin', '>H', 2), 0xc6: ('bin', '>I', 4),
    0xc7: ('ext', '>B', 1), 0xc8: ('ext', '>H', 2), 0xc9: ('ext', '>I', 4),
    0xd9: ('str', '>B', 1), 0xda: ('str', '>H', 2), 0xdb: ('str', '>I', 4),
    0xdc: ('array', '>H', 2), 0xdd: ('array', '>I', 4),
    0xde: ('map', '>H', 2), 0xdf: ('map', '>I', 4)}
_MSGPACK_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_FLAX_NDARRAY, _FLAX_COMPLEX, _FLAX_SCALAR = 1, 2, 3  # flax's ext codes.
_FLAX_CHUNKED = '__msgpack_chunked_array__'


class _MsgpackReader:
  """Decodes msgpack from a buffer; arrays are read-only views of it."""

  def __init__(self, buffer: memoryview, span_depth: int):
    self.buffer = buffer
    self.span_depth = span_depth
    self.spans: dict[tuple[Any, ...], memoryview] = {}

  def take(self, at: int, size: int) -> memoryview:
    if size < 0 or at + size > len(self.buffer):
      raise ValueError(f'a value at byte {at} runs past the end')
    return self.buffer[at:at + size]

  def length(self, at: int, fmt: str, size: int) -> int:
    return struct.unpack(fmt, self.take(at, size))[0]

  def value(self, at: int, keys: Optional[tuple[Any, ...]] = None
            ) -> tuple[Any, int]:
    """The value that starts at byte `at`, and the byte after it.

    `keys`: the path of map keys to it, where its map values' spans are
    recorded (None: not recorded).
    """
    first = self.take(at, 1)[0]
    at += 1
    if first <= 0x7f or first >= 0xe0:  # Positive and negative fixint.
      return first if first <= 0x7f else first - 0x100, at
    if first <= 0x8f:
      return self.map(at, first & 0x0f, keys)
    if first <= 0x9f:
      return self.array(at, first & 0x0f)
    if first <= 0xbf:
      return self.string(at, first & 0x1f)
    if first in (0xc0, 0xc2, 0xc3):
      return {0xc0: None, 0xc2: False, 0xc3: True}[first], at
    if first in _MSGPACK_FIXED:
      fmt, size = _MSGPACK_FIXED[first]
      return struct.unpack(fmt, self.take(at, size))[0], at + size
    if first in _MSGPACK_FIXEXT:
      return self.ext(at, _MSGPACK_FIXEXT[first])
    if first not in _MSGPACK_LENGTH:
      raise ValueError(f'byte {at - 1} starts no msgpack value ({first:#x})')
    kind, fmt, size = _MSGPACK_LENGTH[first]
    n = self.length(at, fmt, size)
    at += size
    if kind == 'bin':
      return bytes(self.take(at, n)), at + n
    if kind == 'str':
      return self.string(at, n)
    if kind == 'ext':
      return self.ext(at, n)
    if kind == 'array':
      return self.array(at, n)
    return self.map(at, n, keys)

  def string(self, at: int, n: int) -> tuple[str, int]:
    return str(self.take(at, n), 'utf-8'), at + n

  def array(self, at: int, n: int) -> tuple[list[Any], int]:
    items = []
    for _ in range(n):
      item, at = self.value(at)
      items.append(item)
    return items, at

  def map(self, at: int, n: int, keys: Optional[tuple[Any, ...]]
          ) -> tuple[dict[Any, Any], int]:
    recorded = keys is not None and len(keys) < self.span_depth
    items = {}
    for _ in range(n):
      key, start = self.value(at)
      items[key], at = self.value(start, keys + (key,) if recorded else None)
      if recorded:
        self.spans[keys + (key,)] = self.buffer[start:at]
    if _FLAX_CHUNKED in items:  # flax splits arrays over 1 GiB in chunks.
      shape = tuple(items['shape'][str(i)] for i in range(len(
          items['shape'])))
      chunks = [items['chunks'][str(i)] for i in range(len(items['chunks']))]
      return np.concatenate(chunks).reshape(shape), at
    return items, at

  def ext(self, at: int, n: int) -> tuple[Any, int]:
    code = struct.unpack('>b', self.take(at, 1))[0]
    at += 1
    end = at + n
    self.take(at, n)
    if code == _FLAX_COMPLEX:
      (real, imag), _ = self.value(at)
      return complex(real, imag), end
    if code not in (_FLAX_NDARRAY, _FLAX_SCALAR):
      return msgpack.ExtType(code, bytes(self.take(at, n))), end  # As flax.
    # flax packs (shape, dtype name, bytes) with msgpack in the ext's data.
    first = self.take(at, 1)[0]
    if first != 0x93:
      raise ValueError(f'the array at byte {at} is not (shape, dtype, data)')
    shape, at = self.value(at + 1)
    name, at = self.value(at)
    first = self.take(at, 1)[0]
    if first not in (0xc4, 0xc5, 0xc6):
      raise ValueError(f'the array at byte {at} has no data')
    _, fmt, size = _MSGPACK_LENGTH[first]
    size_bytes = self.length(at + 1, fmt, size)
    data = self.take(at + 1 + size, size_bytes)
    if at + 1 + size + size_bytes != end:
      raise ValueError(f'the array at byte {at} does not fill its ext')
    dtype = _numpy_dtype(name)
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return (array[()] if code == _FLAX_SCALAR else array), end


def _numpy_dtype(name: Any) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top  # JAX's own.
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def read_msgpack(path: str, span_depth: int = 1
                 ) -> tuple[Any, dict[tuple[Any, ...], memoryview]]:
  """A flax msgpack file as `flax.serialization.msgpack_restore` returns it.

  The file is read once into one buffer, and its arrays are read-only
  numpy views of it (no copies). What `msgpack_restore` returns but with
  arrays that share memory.

  Args:
    path: a file written by `flax.serialization.msgpack_serialize`.
    span_depth: how deep in nested maps to record where values lie.

  Returns:
    (tree, spans): spans[(key, ...)] is the bytes of the map value at that
    path of keys (depth <= span_depth), as written; a value written by
    `msgpack_serialize(value)` on its own has exactly these bytes.

  Raises:
    OSError: the file cannot be read.
    ValueError: the file is not one whole msgpack value of flax's types.
  """
  with open(os.fspath(path), 'rb') as f:
    data = f.read()  # bytes: read-only, so are the views.
  reader = _MsgpackReader(memoryview(data), span_depth)
  tree, end = reader.value(0, ())
  if end != len(data):
    raise ValueError(f'{len(data) - end} bytes follow the msgpack value')
  return tree, reader.spans

"""PyTorch state-dict files read into numpy arrays, without torch.

`torch.save(module.state_dict(), path)` writes one of two layouts:

* the zip layout (torch >= 1.6): a zip archive whose one top folder holds
  `data.pkl` (the pickled dict; every tensor's storage is a persistent id
  naming a record), `data/<key>` (each storage's raw bytes) and, in newer
  versions, `byteorder` ('little' or 'big');
* the legacy layout (older files, or `_use_new_zipfile_serialization=False`):
  a stream of pickles (magic number, protocol version, system info, the dict
  itself, the sorted storage keys), then for each key a little-endian int64
  element count followed by the storage's little-endian bytes.

Both are read here with a restricted unpickler that knows only the few
globals a state dict of plain tensors needs (the tensor rebuild functions,
the typed storage classes and `collections.OrderedDict`) and refuses every
other global, so reading a file never runs code from it.

This module imports numpy alone, so scripts that run beside torch (see
experiments/inception_golden.py) can import it too. It also holds
`random_state_dict`, seeded weights for numerical tests of ported networks.
"""

import collections
import dataclasses
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vqvae2_jax import errors

# Written first in every legacy-layout file.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class UnsupportedPickleError(errors.UserError, pickle.UnpicklingError):
  """The file asks for something a state dict of plain tensors never holds."""


class StateDictError(errors.UserError, ValueError):
  """The file is not a torch.save state dict, or is truncated or corrupt.

  Also a ValueError, for callers that catch those.
  """


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands for one `torch.<X>Storage` class inside the pickle."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named by the pickle; its bytes are looked up afterwards.

  The legacy layout stores the bytes after the pickle, so tensors are built
  only once the whole file has been read.
  """
  key: str
  dtype: np.dtype
  numel: int
  offset: int = 0  # Elements; non-zero for legacy views into a root storage.


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  storage: _StorageRef
  storage_offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  # `_rebuild_tensor_v2` adds requires_grad, backward hooks and (newer)
  # metadata after the four arguments that define the values.
  del unused_args
  if not isinstance(storage, _StorageRef):
    raise UnsupportedPickleError(
        f'A tensor in the file is not backed by a plain storage ({storage!r}).'
        ' Fix: save a state dict of dense CPU tensors.')
  return _LazyTensor(storage, int(storage_offset), tuple(map(int, size)),
                     tuple(map(int, stride)))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused_args):
  del requires_grad, backward_hooks, unused_args
  return data


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals a state dict needs."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsupportedPickleError(
        f'The file refers to {module}.{name}, which a state dict of plain '
        'tensors never needs; it is not loaded, so that reading a file never '
        'runs code from it. Fix: save `model.state_dict()` with torch.save, '
        'not a whole model or other objects.')

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and _ascii(pid[0]) == 'storage'):
      raise UnsupportedPickleError(
          f'Unknown persistent id {pid!r} in the file. Fix: save '
          '`model.state_dict()` with torch.save.')
    storage_type, key = pid[1], _ascii(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise UnsupportedPickleError(
          f'Storage {key!r} has an unknown type {storage_type!r}.')
    numel = int(pid[4])
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # Legacy views: (view key, offset, size).
      return _StorageRef(key, storage_type.dtype, int(view[2]), int(view[1]))
    return _StorageRef(key, storage_type.dtype, numel)


def _ascii(value: Any) -> Any:
  return value.decode('ascii') if isinstance(value, bytes) else value


def _materialize(obj: Any, storages: Mapping[str, np.ndarray]) -> Any:
  """Replaces every lazy tensor in `obj` by a numpy array."""
  if isinstance(obj, _LazyTensor):
    ref = obj.storage
    if ref.key not in storages:
      raise StateDictError(
          f'Storage {ref.key!r} is missing from the file. Fix: '
          'the file is truncated or corrupt; save it again.')
    flat = storages[ref.key][ref.offset:ref.offset + ref.numel]
    if 0 in obj.size:
      return np.zeros(obj.size, ref.dtype)
    if not obj.size:  # as_strided would give shape (1,) for a scalar.
      return np.array(flat[obj.storage_offset])
    last = obj.storage_offset + sum(
        (n - 1) * s for n, s in zip(obj.size, obj.stride))
    if last >= flat.size or min(obj.stride, default=0) < 0:
      raise StateDictError(
          f'A tensor reaches past the end of storage {ref.key!r}.'
          ' Fix: the file is truncated or corrupt; save it again.')
    view = np.lib.stride_tricks.as_strided(
        flat[obj.storage_offset:], shape=obj.size,
        strides=[s * flat.itemsize for s in obj.stride], writeable=False)
    return np.ascontiguousarray(view)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, storages) for v in obj)
  return obj


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise StateDictError(
          f'{path} is a zip file but not a torch.save archive (no '
          'single data.pkl). Fix: pass a file written by '
          'torch.save.')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode('ascii').strip()
    obj = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    refs = _storage_refs(obj)
    storages = {}
    for key, dtype in refs.items():
      raw = np.frombuffer(archive.read(f'{prefix}data/{key}'), np.uint8)
      storages[key] = _to_native(raw, dtype, byteorder)
  return _materialize(obj, storages)


def _read_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    stream = io.BytesIO(f.read())
  magic = _StateDictUnpickler(stream).load()
  if magic != _LEGACY_MAGIC:
    raise StateDictError(
        f'{path} is neither a zip nor a legacy torch.save file. '
        'Fix: pass a file written by torch.save.')
  protocol = _StateDictUnpickler(stream).load()
  if protocol != _LEGACY_PROTOCOL:
    raise StateDictError(f'{path} has legacy protocol {protocol}, not '
                         f'{_LEGACY_PROTOCOL}. Fix: re-save it with a recent '
                         'torch.save.')
  sys_info = _StateDictUnpickler(stream).load()
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise StateDictError(f'{path} was written on a big-endian machine. Fix: '
                         're-save it with a recent torch.save (zip layout).')
  obj = _StateDictUnpickler(stream).load()
  keys = _StateDictUnpickler(stream).load()
  dtypes = _storage_refs(obj)
  storages = {}
  for key in keys:
    key = _ascii(key)
    dtype = dtypes.get(key)
    if dtype is None:
      raise StateDictError(
          f'{path}: storage {key!r} is not used by any tensor. '
          'Fix: the file is corrupt; save it again.')
    header = stream.read(8)
    if len(header) != 8:
      raise StateDictError(
          f'{path} ends before storage {key!r}. Fix: the file is '
          'truncated; download or save it again.')
    numel = int(np.frombuffer(header, '<i8')[0])
    raw = np.frombuffer(stream.read(numel * dtype.itemsize), np.uint8)
    if raw.size != numel * dtype.itemsize:
      raise StateDictError(
          f'{path} ends inside storage {key!r}. Fix: the file is '
          'truncated; download or save it again.')
    storages[key] = _to_native(raw, dtype, 'little')
  return _materialize(obj, storages)


def _storage_refs(obj: Any) -> dict[str, np.dtype]:
  """{storage key: dtype} over every lazy tensor in `obj`."""
  refs = {}
  stack = [obj]
  while stack:
    item = stack.pop()
    if isinstance(item, _LazyTensor):
      refs[item.storage.key] = item.storage.dtype
    elif isinstance(item, dict):
      stack.extend(item.values())
    elif isinstance(item, (list, tuple)):
      stack.extend(item)
  return refs


def _to_native(raw: np.ndarray, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """Raw bytes -> 1-D native-order array of `dtype`."""
  if byteorder not in ('little', 'big'):
    raise StateDictError(f'Unknown byte order {byteorder!r} in the file.')
  stored = dtype.newbyteorder('<' if byteorder == 'little' else '>')
  return np.frombuffer(raw.tobytes(), stored).astype(dtype)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a file written by `torch.save(state_dict)` into numpy arrays.

  Args:
    path: the .pth/.pt file, zip or legacy layout.

  Returns:
    {name: array} in the file's order, each array with the tensor's shape
    and dtype (float32 for FloatStorage), C-contiguous, owning its memory.

  Raises:
    FileNotFoundError: no file at `path`.
    UnsupportedPickleError: the pickle needs a global outside the short list
      a state dict needs (a whole pickled model, say); nothing is executed.
    StateDictError: the file is not a torch.save file or is truncated.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No state-dict file at {path}.')
  if zipfile.is_zipfile(path):
    obj = _read_zip(path)
  else:
    obj = _read_legacy(path)
  if not isinstance(obj, dict):
    raise StateDictError(
        f'{path} holds a {type(obj).__name__}, not a state dict.'
        ' Fix: save `model.state_dict()`.')
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise StateDictError(
        f'{path}: entries {bad[:5]} are not tensors. Fix: save '
        '`model.state_dict()` alone.')
  return dict(obj)


def random_state_dict(spec: Iterable[tuple[str, Sequence[int]]],
                      seed: int) -> dict[str, np.ndarray]:
  """Seeded float32 weights that keep a conv/BN/ReLU network's activations O(1).

  For numerical tests of ported networks without their real weights. Each
  entry is drawn from its own generator, seeded by `seed` and a CRC of the
  name, so the values depend neither on the order of `spec` nor on the
  platform. The kind of each entry comes from its name, as torch names them:

  * `*.weight` of rank 4 (conv, OIHW): normal, std sqrt(2 / (I * kh * kw))
    (He scaling, so a ReLU layer keeps the second moment of its input);
  * `*.bn.weight` (gamma): uniform [0.8, 1.2]; `*.bn.bias` (beta): normal,
    std 0.1; `running_mean`: normal, std 0.1; `running_var`: uniform
    [0.5, 1.5];
  * `num_batches_tracked`: int64 zero; anything else: normal, std 0.05.

  Args:
    spec: (name, shape) pairs, e.g. from a torch model's state_dict or from
      the port's own list of torch names.
    seed: base seed.

  Returns:
    {name: array of that shape}.
  """
  out = {}
  for name, shape in spec:
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode('utf-8'))])
    leaf = name.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      out[name] = np.zeros(shape, np.int64)
      continue
    if leaf == 'weight' and len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'running_mean':
      value = rng.normal(0.0, 0.1, shape)
    elif leaf == 'weight' and len(shape) == 1:
      value = rng.uniform(0.8, 1.2, shape)
    elif leaf == 'bias' and len(shape) == 1:
      value = rng.normal(0.0, 0.1, shape)
    else:
      value = rng.normal(0.0, 0.05, shape)
    out[name] = value.astype(np.float32)
  return out

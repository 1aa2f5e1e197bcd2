"""files.py: atomic writes, JSON, the writability check of every stage, and
flax msgpack files read as views of one buffer."""

import errno
import json
import os

import numpy as np
import pytest

from vqvae2_jax import errors
from vqvae2_jax import files


def test_ensure_writable_creates_and_leaves_nothing(tmp_path):
  target = tmp_path / 'a' / 'b'
  files.ensure_writable(str(target), 'samples')
  assert target.is_dir() and not os.listdir(target)


def test_ensure_writable_names_the_path_and_the_fix(tmp_path):
  blocker = tmp_path / 'samples'
  blocker.write_text('a file where a directory should be')
  with pytest.raises(errors.WorkdirError) as info:
    files.ensure_writable(str(blocker / 'run'), 'samples')
  message = str(info.value)
  assert str(blocker / 'run') in message and 'Fix:' in message
  assert blocker.read_text() == 'a file where a directory should be'


def test_ensure_writable_reports_a_full_disk(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(files.tempfile, 'mkstemp', full)
  with pytest.raises(errors.WorkdirError, match='No space left on device'):
    files.ensure_writable(str(tmp_path), 'codes')


def test_write_json_is_valid_json_without_nan(tmp_path):
  path = tmp_path / 'm.json'
  files.write_json(str(path), {'a': float('nan'), 'b': float('inf'), 'c': 1})

  def refuse(constant):
    raise ValueError(constant)
  assert json.loads(path.read_text(), parse_constant=refuse) == {
      'a': None, 'b': None, 'c': 1}


def test_write_json_once_writes_on_process_zero_only(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'm.json')
  files.write_json_once(path, {'a': float('nan'), 'b': 1.5})
  with open(path) as f:
    assert json.load(f) == {'a': None, 'b': 1.5}
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  other = str(tmp_path / 'other.json')
  files.write_json_once(other, {'a': 1})
  assert not os.path.exists(other)


def _every_type():
  """A tree of every kind of value flax's msgpack files hold."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return {
      'weights': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                  'b': np.ones((3,), ml_dtypes.bfloat16),
                  'empty': np.zeros((0, 3), np.int8),
                  'scalar_array': np.array(7, np.int64),
                  'long': np.arange(70000, dtype=np.uint16)},
      'scalar': np.float32(3.5),
      'text': 'h\u00e9llo' * 10, 'long_text': 'x' * 70000, 'bytes': b'\0' * 300,
      'numbers': [0, 1, -1, -33, 127, 200, 70000, -70000, 2**40, -2**40,
                  2**63 + 5, 1.5, None, True, False, complex(1, -2)],
      'wide': {str(i): i for i in range(20)}, 'list': list(range(17))}


def _assert_same_tree(got, want):
  """Equal structure, types, dtypes, shapes and bytes."""
  assert type(got) is type(want), (got, want)
  if isinstance(want, dict):
    assert list(got) == list(want)
    for key in want:
      _assert_same_tree(got[key], want[key])
  elif isinstance(want, list):
    assert len(got) == len(want)
    for a, b in zip(got, want):
      _assert_same_tree(a, b)
  elif isinstance(want, np.ndarray):
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert got.tobytes() == want.tobytes()
  else:
    assert got == want and repr(got) == repr(want)


def test_read_msgpack_restores_what_flax_restores_as_views(tmp_path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  tree = _every_type()
  data = serialization.msgpack_serialize(tree)
  path = tmp_path / 'tree.msgpack'
  path.write_bytes(data)
  got, spans = files.read_msgpack(str(path), span_depth=2)
  _assert_same_tree(got, serialization.msgpack_restore(data))
  # Views of one read-only buffer, not copies.
  arrays = [got['weights'][k] for k in ('w', 'b', 'long')]
  assert not any(a.flags.writeable for a in arrays)

  def root(a):  # The buffer under a view: array -> ... -> memoryview -> obj.
    while not isinstance(a, memoryview) and a.base is not None:
      a = a.base
    return a.obj if isinstance(a, memoryview) else a
  assert len({id(root(a)) for a in arrays}) == 1
  assert root(arrays[0]) == data  # The file read once.
  # Each map value's bytes to depth 2 are its own serialisation.
  assert set(spans) == {(k,) for k in tree} | {
      (k, j) for k in tree if isinstance(tree[k], dict) for j in tree[k]}
  for keys, span in spans.items():
    value = tree[keys[0]] if len(keys) == 1 else tree[keys[0]][keys[1]]
    assert bytes(span) == serialization.msgpack_serialize(value), keys


def test_read_msgpack_joins_the_chunks_of_large_arrays(tmp_path, monkeypatch):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 1000)
  tree = {'a': {'big': np.arange(1000, dtype=np.float32).reshape(10, 100)}}
  data = serialization.msgpack_serialize(tree)
  assert b'__msgpack_chunked_array__' in data
  (tmp_path / 'chunked.msgpack').write_bytes(data)
  got, _ = files.read_msgpack(str(tmp_path / 'chunked.msgpack'))
  _assert_same_tree(got, serialization.msgpack_restore(data))


def test_read_msgpack_refuses_every_cut_and_trailing_bytes(tmp_path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  data = serialization.msgpack_serialize(
      {k: v for k, v in _every_type().items() if k not in (
          'long_text', 'weights')} | {'w': np.arange(6, dtype=np.int32)})
  path = tmp_path / 'cut.msgpack'
  for end in range(len(data)):  # Every cut, not only some.
    path.write_bytes(data[:end])
    with pytest.raises(ValueError):
      files.read_msgpack(str(path))
  path.write_bytes(data + b'\0')
  with pytest.raises(ValueError, match='1 bytes follow'):
    files.read_msgpack(str(path))
  path.write_bytes(b'\xc1' + data)  # A byte msgpack never writes.
  with pytest.raises(ValueError, match='starts no msgpack value'):
    files.read_msgpack(str(path))

"""files.py: atomic writes, JSON, and the writability check of every stage."""

import errno
import json
import os

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

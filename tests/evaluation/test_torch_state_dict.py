"""The torch state-dict reader (no torch) and the seeded random weights.

The .pth files in tests/models/data were written by torch
(experiments/inception_golden.py); their tensors are recorded in the golden
file under 'tiny.<name>'.
"""

import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from vqvae2_jax.evaluation import torch_state_dict

_DATA = pathlib.Path(__file__).parent.parent / 'models' / 'data'


@pytest.fixture(scope='module')
def golden():
  with np.load(_DATA / 'inception_golden.npz') as data:
    return {k: v for k, v in data.items() if k.startswith('tiny.')}


@pytest.mark.parametrize('filename', ['tiny_state_dict.pth',
                                      'tiny_state_dict_legacy.pth'])
def test_reader_reads_torch_files_exactly(golden, filename):
  state_dict = torch_state_dict.read_state_dict(_DATA / filename)
  expected = {k[len('tiny.'):]: v for k, v in golden.items()
              if k.startswith('tiny.')}
  assert list(state_dict) == list(expected)
  for name, value in expected.items():
    assert state_dict[name].dtype == value.dtype, name
    assert state_dict[name].shape == value.shape, name
    np.testing.assert_array_equal(state_dict[name], value, err_msg=name)
  assert state_dict['extra.transposed'].flags['C_CONTIGUOUS']


class _Exploit:
  """Pickles to a call of os.mkdir: what a hostile checkpoint could do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_reader_refuses_other_globals(tmp_path, layout):
  target = str(tmp_path / 'created_by_pickle')
  payload = pickle.dumps({'weight': _Exploit(target)}, protocol=2)
  path = tmp_path / 'hostile.pth'
  if layout == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('hostile/data.pkl', payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(torch_state_dict.UnsupportedPickleError,
                     match='posix.mkdir|os.mkdir'):
    torch_state_dict.read_state_dict(path)
  assert not os.path.exists(target)


def test_reader_rejects_non_torch_file(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_bytes(pickle.dumps([1, 2, 3], protocol=2) + b'\x00' * 8)
  with pytest.raises(ValueError, match='torch.save'):
    torch_state_dict.read_state_dict(path)
  with pytest.raises(FileNotFoundError):
    torch_state_dict.read_state_dict(tmp_path / 'absent.pth')


def test_random_state_dict_is_seeded_per_name():
  spec = [('a.conv.weight', (4, 3, 3, 3)), ('a.bn.running_var', (4,))]
  one = torch_state_dict.random_state_dict(spec, 5)
  reordered = torch_state_dict.random_state_dict(spec[::-1], 5)
  other_seed = torch_state_dict.random_state_dict(spec, 6)
  for name, _ in spec:
    np.testing.assert_array_equal(one[name], reordered[name])
    assert not np.array_equal(one[name], other_seed[name])
  assert one['a.bn.running_var'].min() >= 0.5


def test_random_state_dict_kinds_follow_torch_names():
  spec = [('c.weight', (8, 2, 3, 3)), ('bn.weight', (500,)),
          ('bn.bias', (500,)), ('bn.num_batches_tracked', ()),
          ('fc.weight', (4, 5))]
  weights = torch_state_dict.random_state_dict(spec, 0)
  assert weights['bn.num_batches_tracked'].dtype == np.int64
  assert weights['bn.num_batches_tracked'] == 0
  for name, shape in spec[:3] + spec[4:]:
    assert weights[name].dtype == np.float32 and weights[name].shape == shape
  gamma = weights['bn.weight']
  assert 0.8 <= gamma.min() and gamma.max() <= 1.2
  # He scaling: std sqrt(2 / (2 * 3 * 3)) = 1/3 for the convolution.
  conv = torch_state_dict.random_state_dict(
      [('c.weight', (64, 2, 3, 3))], 1)['c.weight']
  assert abs(conv.std() - 1 / 3) < 0.03

"""Tests of FID's Inception-v3 port and of the torch state-dict reader.

The golden file comes from experiments/inception_golden.py, which ran
pytorch-fid's reference network with weights drawn by
`torch_state_dict.random_state_dict`; here the same weights are drawn with
numpy alone, so neither torch nor the real weights are needed.
"""

import os
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.evaluation import torch_state_dict
from vqvae2_jax.models import inception

_DATA = pathlib.Path(__file__).parent / 'data'

# Features agree to this fraction of the largest feature magnitude. Both
# sides compute in float32 with different summation orders through ~95
# layers; torch float32 is itself about 1e-6 from torch float64.
_RTOL = 1e-4


@pytest.fixture(scope='module')
def golden():
  with np.load(_DATA / 'inception_golden.npz') as data:
    return dict(data)


def _images(golden) -> list[np.ndarray]:
  """The golden script's input batches, uniform in [0, 1]."""
  rng = np.random.default_rng(int(golden['images_seed']))
  batches = [rng.uniform(0.0, 1.0, tuple(shape)).astype(np.float32)
             for shape in golden['image_shapes']]
  probe = np.concatenate([b.ravel()[:8] for b in batches])
  np.testing.assert_array_equal(probe, golden['image_probe'])
  return batches


def _max_rel_error(actual, expected) -> float:
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_spec_matches_reference_state_dict(golden):
  reference = {
      name: tuple(int(n) for n in shape.split(',')) if shape else ()
      for name, shape in zip(golden['state_dict_names'],
                             golden['state_dict_shapes'])
      if not name.startswith('fc.')
      and not name.endswith('num_batches_tracked')}
  spec = dict(inception.torch_state_dict_spec())
  assert len(spec) == len(reference) == 94 * 5
  assert spec == reference


def test_features_match_reference(golden):
  spec = inception.torch_state_dict_spec()
  weights = torch_state_dict.random_state_dict(spec,
                                               int(golden['weights_seed']))
  module = inception.FIDInceptionV3()
  variables = inception.variables_from_state_dict(weights, module)
  # The project's [-1, 1] convention; each batch is resized on its own so
  # that the network compiles once for the concatenated batch.
  resized = jnp.concatenate(
      [inception.resize_bilinear(2.0 * b - 1.0) for b in _images(golden)])
  assert resized.shape == (4, 299, 299, 3)
  features = np.asarray(jax.jit(module.apply)(variables, resized))
  assert features.shape == (4, inception.FEATURES)
  assert features.dtype == np.float32
  assert _max_rel_error(features, golden['features']) <= _RTOL
  assert _max_rel_error(features, golden['features_float64']) <= _RTOL
  # The tolerance is far below what tells two inputs apart.
  scale = np.abs(golden['features']).max()
  for i in range(1, len(features)):
    assert np.abs(features[i] - features[0]).max() > 10 * _RTOL * scale


def test_resize_matches_torch_interpolate(golden):
  # 7x11 -> 13x5: rows upsampled, columns downsampled.
  out = inception.resize_bilinear(golden['resize_in'], (13, 5))
  np.testing.assert_allclose(out, golden['resize_out'], rtol=0, atol=2e-6)


def test_resize_to_same_size_is_identity():
  images = np.random.default_rng(0).uniform(-1, 1, (1, 9, 9, 3))
  np.testing.assert_array_equal(inception.resize_bilinear(images, 9),
                                images.astype(np.float32))


def test_grayscale_is_repeated_to_rgb(golden):
  gray = np.random.default_rng(0).uniform(-1, 1, (2, 20, 24, 1)).astype(
      np.float32)
  rgb = inception.to_rgb(jnp.asarray(gray))
  np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))
  module = inception.FIDInceptionV3()
  shapes = dict(inception.torch_state_dict_spec())
  variables = inception.variables_from_state_dict(
      {k: np.zeros(v, np.float32) for k, v in shapes.items()}, module)
  out = jax.eval_shape(module.apply, variables, gray)
  assert out.shape == (2, inception.FEATURES)
  with pytest.raises(ValueError, match='1 or 3 channels'):
    inception.to_rgb(jnp.zeros((1, 8, 8, 2)))


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


@pytest.mark.parametrize('path', ['', '/nonexistent/pt_inception.pth'])
def test_missing_weights_file_says_where_to_get_it(path):
  with pytest.raises(FileNotFoundError) as error:
    inception.load_fid_inception(path)
  message = str(error.value)
  assert inception.FID_WEIGHTS_FILE in message
  assert inception.FID_WEIGHTS_URL in message
  assert ('Fix: download it on a machine with internet and pass '
          '--config.eval.inception_weights=/path/to/'
          'pt_inception-2015-12-05-6726825d.pth') in message
  if path:
    assert path in message


def test_load_rejects_other_state_dicts():
  # A file torch wrote, but not FID Inception's state dict.
  with pytest.raises(ValueError, match='missing') as error:
    inception.load_fid_inception(_DATA / 'tiny_state_dict.pth')
  assert inception.FID_WEIGHTS_URL in str(error.value)
  spec = inception.torch_state_dict_spec()
  weights = torch_state_dict.random_state_dict(spec, 0)
  name, shape = spec[0]
  weights[name] = np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32)
  with pytest.raises(ValueError, match='has shape'):
    inception.variables_from_state_dict(weights)


def test_random_state_dict_is_seeded_per_name():
  spec = [('a.conv.weight', (4, 3, 3, 3)), ('a.bn.running_var', (4,))]
  one = torch_state_dict.random_state_dict(spec, 5)
  reordered = torch_state_dict.random_state_dict(spec[::-1], 5)
  other_seed = torch_state_dict.random_state_dict(spec, 6)
  for name, _ in spec:
    np.testing.assert_array_equal(one[name], reordered[name])
    assert not np.array_equal(one[name], other_seed[name])
  assert one['a.bn.running_var'].min() >= 0.5

"""Tests of FID's Inception-v3 port.

The golden file comes from experiments/inception_golden.py, which ran
pytorch-fid's reference network with weights drawn by
`torch_state_dict.random_state_dict`; here the same weights are drawn with
numpy alone, so neither torch nor the real weights are needed.
"""

import pathlib

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

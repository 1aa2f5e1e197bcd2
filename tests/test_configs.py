"""Every config loads and validates; every validation error names its fix."""

import glob
import importlib
import os

import pytest

from vqvae2_jax import config_validation

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')
_NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(_CONFIG_DIR, '*.py'))
    if not os.path.basename(p).startswith('_'))


def _load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def test_all_config_files_found():
  assert {'fashion_mnist', 'tiny', 'cifar10', 'imagenet256',
          'ffhq1024'} <= set(_NAMES)


@pytest.mark.parametrize('name', _NAMES)
def test_config_loads_and_validates(name):
  config = _load(name)
  if config.data.name == 'image_folder' and not config.data.image_folder:
    config.data.image_folder = '/path/set/by/the/user'
  config_validation.validate_config(config, num_devices=8)
  # The docstring holds the command that runs it.
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__


def test_paper_hyperparameters_imagenet256():
  config = _load('imagenet256')
  assert config_validation.latent_sizes(config) == [32, 64]
  assert config.model.num_embeddings == 512
  assert config.model.embedding_dim == 64
  assert config.model.commitment_cost == 0.25
  assert config.model.num_hiddens == 128
  assert config.model.num_residual_layers == 2
  assert config.model.num_residual_hiddens == 64
  top, bottom = config.prior.level_0, config.prior.level_1
  for level in (top, bottom):
    assert (level.num_channels, level.num_layers, level.filter_size,
            level.dropout_rate) == (512, 20, 5, 0.1)
  assert (top.attention_layers, top.num_heads) == (4, 8)
  assert bottom.cond_stack_blocks == 20


def test_ffhq1024_has_three_levels():
  config = _load('ffhq1024')
  config.data.image_folder = '/x'
  assert config_validation.latent_sizes(config) == [32, 64, 128]


def _tiny():
  return _load('tiny')


def _set(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize('path,value,field', [
    ('data.image_size', 28, 'model.downsample_factors'),
    ('model.downsample_factors', (4, 8), 'model.downsample_factors'),
    ('model.downsample_factors', (6, 2), 'model.downsample_factors[0]'),
    ('model.downsample_factors', (), 'model.downsample_factors'),
    ('data.name', 'no_such_dataset_anywhere', 'data.name'),
    ('data.channels', 2, 'data.channels'),
    ('data.num_classes', -1, 'data.num_classes'),
    ('model.quantizer', 'kmeans', 'model.quantizer'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.num_embeddings', 1, 'model.num_embeddings'),
    ('model.ema_decay', 1.0, 'model.ema_decay'),
    ('prior.level', 2, 'prior.level'),
    ('prior.train_eval_examples', -1, 'prior.train_eval_examples'),
    ('prior.level_0.attention_layers', 9, 'prior.level_0.attention_layers'),
    ('prior.level_0.num_heads', 3, 'prior.level_0.num_heads'),
    ('prior.level_1.filter_size', 1, 'prior.level_1.filter_size'),
    ('sampling.temperature', 0.0, 'sampling.temperature'),
    ('sampling.top_k', -1, 'sampling.top_k'),
    ('sampling.top_p', 0.0, 'sampling.top_p'),
    ('sampling.rejection_keep', 0.0, 'sampling.rejection_keep'),
    ('sampling.rejection_keep', 0.5, 'sampling.rejection_keep'),
    ('vqvae_train.batch_size', 12, 'vqvae_train.batch_size'),
    ('prior.batch_size', 20, 'prior.batch_size'),
])
def test_validation_errors_name_field_and_fix(path, value, field):
  config = _tiny()
  _set(config, path, value)
  with pytest.raises(ValueError) as info:
    config_validation.validate_config(config, num_devices=8)
  message = str(info.value)
  assert message.startswith(f'config.{field}:'), message
  assert 'Fix:' in message


def test_image_folder_needs_a_path():
  config = _tiny()
  config.data.name = 'image_folder'
  with pytest.raises(ValueError, match=r'config\.data\.image_folder.*Fix:'):
    config_validation.validate_config(config)


def test_prior_levels_must_match_model_levels():
  config = _tiny()
  config.model.downsample_factors = (16, 8, 4)
  with pytest.raises(ValueError, match=r"config\.prior: .*level_2"):
    config_validation.validate_config(config)

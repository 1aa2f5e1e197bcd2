"""Config validation: each error names its field and a fix, before any work."""

import os

import pytest

from configs import fashion_mnist
from vqvae2_jax import config_validation
from vqvae2_jax import errors


def _tiny():
  return fashion_mnist.get_config('tiny')


def _set(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize('path,value,field', [
    ('data.image_size', 28, 'model.downsample_factors'),
    ('data.image_size', 0, 'data.image_size'),
    ('model.downsample_factors', (4, 8), 'model.downsample_factors'),
    ('model.downsample_factors', (6, 2), 'model.downsample_factors[0]'),
    ('model.downsample_factors', (), 'model.downsample_factors'),
    ('data.name', '', 'data.name'),
    ('data.name', 'no_such_dataset_anywhere', 'data.name'),
    ('data.channels', 2, 'data.channels'),
    ('data.num_classes', -1, 'data.num_classes'),
    ('model.quantizer', 'kmeans', 'model.quantizer'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.num_embeddings', 1, 'model.num_embeddings'),
    ('model.ema_decay', 1.0, 'model.ema_decay'),
    ('vqvae_train.warmup_steps', -1, 'vqvae_train.warmup_steps'),
    ('vqvae_train.grad_clip_norm', -1.0, 'vqvae_train.grad_clip_norm'),
    ('prior.warmup_steps', -1, 'prior.warmup_steps'),
    ('prior.grad_clip_norm', -0.5, 'prior.grad_clip_norm'),
    ('prior.dtype', 'float16', 'prior.dtype'),
    ('prior.precision', 'fastest', 'prior.precision'),
    ('prior.export_dtype', 'bfloat16', 'prior.export_dtype'),
    ('sampling.dtype', 'float16', 'sampling.dtype'),
    ('sampling.unroll', 0, 'sampling.unroll'),
    ('sampling.step_kernel', 'triton', 'sampling.step_kernel'),
    ('sampling.step_kernel', 'pallas3', 'sampling.step_kernel'),
    ('sampling.step_kernel', 'pallas1024', 'sampling.step_kernel'),
    ('sampling.step_kernel', 'pallas_attention', 'sampling.step_kernel'),
    ('prior.level', 2, 'prior.level'),
    ('prior.train_eval_examples', -1, 'prior.train_eval_examples'),
    ('prior.level_0.attention_layers', 9, 'prior.level_0.attention_layers'),
    ('prior.level_0.num_heads', 3, 'prior.level_0.num_heads'),
    ('prior.level_1.filter_size', 1, 'prior.level_1.filter_size'),
    ('prior.level_0.kind', 'pixelsnail', 'prior.level_0.kind'),
    ('sampling.temperature', 0.0, 'sampling.temperature'),
    ('sampling.top_k', -1, 'sampling.top_k'),
    ('sampling.top_p', 0.0, 'sampling.top_p'),
    ('sampling.guidance', -0.5, 'sampling.guidance'),
    ('sampling.guidance', float('nan'), 'sampling.guidance'),
    ('sampling.guidance_per_level', (1.5,), 'sampling.guidance_per_level'),
    ('sampling.guidance_per_level', (1.5, -1.0),
     'sampling.guidance_per_level'),
    ('sampling.contrast', (0.0, 0.5, 0.5), 'sampling.contrast'),
    ('sampling.contrast', (-0.5,), 'sampling.contrast'),
    ('sampling.contrast', (0.0, float('inf')), 'sampling.contrast'),
    ('prior.code_weight', (0.0, 0.5, 0.5), 'prior.code_weight'),
    ('prior.code_weight', (-0.5,), 'prior.code_weight'),
    ('sampling.discount', (0.0, 4.0, 4.0), 'sampling.discount'),
    ('sampling.discount', (-1.0,), 'sampling.discount'),
    ('sampling.discount', (0.0, float('nan')), 'sampling.discount'),
    ('sampling.rejection_keep', 0.0, 'sampling.rejection_keep'),
    ('sampling.rejection_keep', 1.5, 'sampling.rejection_keep'),
    ('sampling.rejection_keep', -0.1, 'sampling.rejection_keep'),
    ('vqvae_train.batch_size', 12, 'vqvae_train.batch_size'),
    ('prior.batch_size', 20, 'prior.batch_size'),
    # Values that used to pass validation and fail later (or silently).
    ('vqvae_train.num_train_steps', -5, 'vqvae_train.num_train_steps'),
    ('prior.num_train_steps', 0, 'prior.num_train_steps'),
    ('classifier.num_train_steps', -1, 'classifier.num_train_steps'),
    ('vqvae_train.log_every', 0, 'vqvae_train.log_every'),
    ('prior.checkpoint_every', 0, 'prior.checkpoint_every'),
    ('classifier.eval_every', 0, 'classifier.eval_every'),
    ('prior.keep_checkpoints', 0, 'prior.keep_checkpoints'),
    ('vqvae_train.learning_rate', -3e-4, 'vqvae_train.learning_rate'),
    ('classifier.learning_rate', 0.0, 'classifier.learning_rate'),
    ('vqvae_train.batch_size', 0, 'vqvae_train.batch_size'),
    ('sampling.batch_size', -8, 'sampling.batch_size'),
    ('sampling.num_samples_per_class', 0, 'sampling.num_samples_per_class'),
    ('eval.cas_samples_per_class', -1, 'eval.cas_samples_per_class'),
    ('mesh.fsdp', 3, 'mesh'),
    ('mesh.data', 16, 'mesh'),
    ('mesh.data', 0, 'mesh'),
    ('mesh.cpu_devices', -2, 'mesh.cpu_devices'),
    ('compilation_cache_dir', os.path.abspath(__file__),
     'compilation_cache_dir'),
    ('model.quantizer_gradient', 'rotate', 'model.quantizer_gradient'),
    ('model.level_dropout', 1.0, 'model.level_dropout'),
    ('model.level_dropout', -0.1, 'model.level_dropout'),
    ('classifier.warmup_steps', -1, 'classifier.warmup_steps'),
    ('data.shuffle_buffer', 0, 'data.shuffle_buffer'),
    ('model.num_hiddens', 0, 'model.num_hiddens'),
    ('model.commitment_cost', -0.25, 'model.commitment_cost'),
    ('model.ema_epsilon', 0.0, 'model.ema_epsilon'),
    ('model.dead_code_window', -1, 'model.dead_code_window'),
    ('prior.polyak_decay', 1.0, 'prior.polyak_decay'),
    ('prior.label_drop_rate', -0.1, 'prior.label_drop_rate'),
    ('prior.codes_per_shard', 0, 'prior.codes_per_shard'),
    ('prior.level_0.num_heads', 0, 'prior.level_0.num_heads'),
    ('prior.level_1.dropout_rate', 1.0, 'prior.level_1.dropout_rate'),
    ('prior.level_1.num_layers', 0, 'prior.level_1.num_layers'),
    ('eval.kid_subset_size', 1, 'eval.kid_subset_size'),
    ('classifier.weight_decay', -1e-4, 'classifier.weight_decay'),
])
def test_validation_errors_name_field_and_fix(path, value, field):
  config = _tiny()
  _set(config, path, value)
  with pytest.raises(ValueError) as info:
    config_validation.validate_config(config, num_devices=8)
  message = str(info.value)
  assert message.startswith(f'config.{field}:'), message
  assert 'Fix:' in message
  assert isinstance(info.value, errors.ConfigError)  # main: one line.


def test_the_pallas_step_needs_heads_of_a_power_of_two():
  config = _tiny()
  config.sampling.step_kernel = 'pallas'
  config_validation.validate_config(config, num_devices=8)  # 16 / 2 heads.
  config.prior.level_0.num_channels = 24  # 12 a head; tile 8 divides 24.
  with pytest.raises(errors.ConfigError,
                     match=r'config\.sampling\.step_kernel: .*24 / 2.*Fix:'):
    config_validation.validate_config(config, num_devices=8)
  for name in ('xla', 'pallas_gated'):  # Attention blocks in XLA.
    config.sampling.step_kernel = name
    config_validation.validate_config(config, num_devices=8)


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


def test_latent_sizes_of_every_level():
  config = _tiny()
  assert config_validation.latent_sizes(config) == [4, 8]
  config.model.downsample_factors = (16, 8, 4)
  assert config_validation.latent_sizes(config) == [2, 4, 8]


def test_known_datasets_are_image_folders_and_registered_tfds_names():
  assert config_validation.known_dataset('image_folder')
  assert config_validation.known_dataset('fashion_mnist')
  assert config_validation.known_dataset('cifar10:3.0.2')  # A version.
  assert not config_validation.known_dataset('no_such_dataset_anywhere')


def test_the_judge_must_take_the_images():
  config = _tiny()
  config.eval.features = 'judge'
  config_validation.validate_config(config, num_devices=8)
  config.data.image_size = 64
  config.model.downsample_factors = (16, 8)
  with pytest.raises(errors.ConfigError,
                     match=r"^config\.eval\.features: is 'judge'.*32x32x1.*"
                     r'Fix: use data\.image_size=32'):
    config_validation.validate_config(config, num_devices=8)


@pytest.mark.parametrize('field,low,high,value,ok', [
    # An int bound is inclusive, a float bound exclusive.
    ('model.num_hiddens', 1, None, 1, True),
    ('model.num_hiddens', 1, None, 0, False),
    ('model.ema_epsilon', 0.0, None, 0.0, False),
    ('model.ema_epsilon', 0.0, None, 1e-9, True),
    ('model.level_dropout', 0, 1.0, 0, True),
    ('model.level_dropout', 0, 1.0, 1.0, False),
    ('eval.kid_subsets', 1, 3, 3, True),
    ('eval.kid_subsets', 1, 3, 4, False),
])
def test_range_bounds(field, low, high, value, ok):
  # pylint: disable-next=protected-access
  check = config_validation._check_range
  if ok:
    check(field, value, low, high, '2')
  else:
    with pytest.raises(errors.ConfigError,
                       match=rf'^config\.{field}: is {value}\. Fix: use a '
                       r'value .*e\.g\. 2$'):
      check(field, value, low, high, '2')


def test_transformer_levels_are_checked_as_transformers():
  config = _tiny()
  config.prior.level_1.kind = 'transformer'
  # The PixelCNN's own fields do not concern a transformer.
  config.prior.level_1.filter_size = 1
  config.prior.level_1.attention_layers = 9
  config_validation.validate_config(config, check_dataset=False)
  # Every transformer block attends: the heads must divide the width, even
  # where a PixelCNN without attention would not care.
  config.prior.level_1.num_heads = 3
  with pytest.raises(errors.ConfigError,
                     match=r'prior\.level_1\.num_heads.*Fix: '):
    config_validation.validate_config(config, check_dataset=False)
  config.prior.level_1.num_heads = 2
  config.prior.level_1.mlp_ratio = 0
  with pytest.raises(errors.ConfigError, match=r'prior\.level_1\.mlp_ratio'):
    config_validation.validate_config(config, check_dataset=False)
  config.prior.level_1.mlp_ratio = 2
  config.prior.level_1.cond_mode = 'cross'
  config_validation.validate_config(config, check_dataset=False)
  config.prior.level_1.cond_mode = 'concat'
  with pytest.raises(errors.ConfigError,
                     match=r"prior\.level_1\.cond_mode: is 'concat'.*Fix: "):
    config_validation.validate_config(config, check_dataset=False)


@pytest.mark.parametrize('level,kind', [(0, 'transformer'), (1, 'pixelcnn')])
def test_cross_attention_only_for_a_lower_transformer(level, kind):
  config = _tiny()
  config.prior[f'level_{level}'].kind = kind
  config.prior[f'level_{level}'].cond_mode = 'cross'
  with pytest.raises(errors.ConfigError,
                     match=rf"prior\.level_{level}\.cond_mode: is 'cross'\. "
                     r"Fix: leave it 'add'"):
    config_validation.validate_config(config, check_dataset=False)


def test_one_guidance_or_one_per_level_not_both():
  config = _tiny()
  config.sampling.guidance_per_level = (1.3, 2.0)
  config_validation.validate_config(config)  # The tiny config's guidance is 1.0.
  config.sampling.guidance = 1.5
  with pytest.raises(errors.ConfigError,
                     match=r'sampling.guidance: is 1.5 while .*Fix: set one'):
    config_validation.validate_config(config)

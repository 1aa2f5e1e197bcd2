"""Config -> modules, latent shapes, init inputs and checkpoint fingerprints."""

import jax.numpy as jnp
import pytest

from configs import fashion_mnist
from configs import ffhq1024
from vqvae2_jax import builders


def _tiny():
  return fashion_mnist.get_config('tiny')


def test_levels_shapes_and_init_inputs():
  config = _tiny()
  assert builders.num_levels(config) == 2
  assert builders.level_shapes(config) == [(4, 4), (8, 8)]  # 32 / (8, 4).
  assert builders.image_shape(config) == (32, 32, 1)
  assert builders.vqvae_init_inputs(config).shape == (1, 32, 32, 1)
  three = ffhq1024.get_config()
  assert builders.level_shapes(three) == [(32, 32), (64, 64), (128, 128)]
  codes, cond, labels = builders.prior_init_inputs(
      2, builders.level_shapes(three), num_classes=0)
  assert codes.shape == (1, 128, 128) and codes.dtype == jnp.int32
  assert [c.shape for c in cond] == [(1, 32, 32), (1, 64, 64)]
  assert labels is None
  labels = builders.prior_init_inputs(0, [(4, 4)], num_classes=10)[2]
  assert labels.shape == (1,) and labels.dtype == jnp.int32


def test_build_vqvae_maps_config_to_module():
  config = _tiny()
  config.model.dtype = 'bfloat16'
  vqvae = builders.build_vqvae(config)
  assert vqvae.downsample_factors == (8, 4)
  assert vqvae.channels == 1 and vqvae.num_hiddens == 16
  assert vqvae.num_embeddings == 16 and vqvae.embedding_dim == 8
  assert vqvae.dtype == jnp.bfloat16
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match=r"config\.model\.dtype is 'float16'.*"
                     r'Fix: use one of'):
    builders.build_vqvae(config)


def test_build_prior_maps_config_to_module():
  config = _tiny()
  top, bottom = (builders.build_prior(config, i) for i in (0, 1))
  assert top.num_embeddings == bottom.num_embeddings == 16
  assert top.cond_num_embeddings == () and top.cond_stack_blocks == 0
  assert bottom.cond_num_embeddings == (16,)
  assert bottom.cond_stack_blocks == config.prior.level_1.cond_stack_blocks
  assert top.attention_layers == config.prior.level_0.attention_layers
  assert top.num_classes == bottom.num_classes == 10
  assert top.num_channels == 16 and top.num_layers == 2


def test_vqvae_fingerprint_holds_the_model_fields_only():
  config = _tiny()
  before = builders.vqvae_fingerprint(config)
  assert before['model.downsample_factors'] == [8, 4]  # JSON-able.
  assert before['model.num_embeddings'] == 16
  config.vqvae_train.learning_rate *= 2  # A training knob.
  config.model.ema_decay = 0.9
  assert builders.vqvae_fingerprint(config) == before
  config.model.num_hiddens = 32
  assert builders.vqvae_fingerprint(config)['model.num_hiddens'] == 32


def test_prior_fingerprint_names_the_codes_it_models():
  config = _tiny()
  fingerprint = builders.prior_fingerprint(config, 1,
                                           {'step': 6, 'digest': 'abc'})
  assert fingerprint['level'] == 1
  assert fingerprint['level_shapes'] == [[4, 4], [8, 8]]
  assert fingerprint['codes.vqvae_step'] == 6
  assert fingerprint['codes.vqvae_digest'] == 'abc'
  assert fingerprint['prior.level_1.num_channels'] == 16
  assert 'prior.level_0.num_channels' not in fingerprint
  other = builders.prior_fingerprint(config, 1, {'step': 7, 'digest': 'abc'})
  assert other != fingerprint


def test_unit_sphere_codes_are_part_of_the_fingerprint_only_when_on():
  config = _tiny()
  before = builders.vqvae_fingerprint(config)
  assert 'model.l2_normalize_codes' not in before  # Old checkpoints match.
  config.model.l2_normalize_codes = True
  assert builders.vqvae_fingerprint(config) == {
      **before, 'model.l2_normalize_codes': True}


def test_remat_reaches_the_modules_but_not_the_fingerprints():
  config = _tiny()
  before = (builders.vqvae_fingerprint(config),
            builders.prior_fingerprint(config, 1, {'step': 1, 'digest': 'd'}))
  config.model.remat = config.prior.remat = True
  # A run may resume with remat toggled: it computes the same function.
  assert (builders.vqvae_fingerprint(config),
          builders.prior_fingerprint(config, 1, {'step': 1, 'digest': 'd'})
          ) == before
  assert builders.build_vqvae(config).remat
  assert builders.build_prior(config, 0).remat
  assert builders.build_prior(config, 1).remat


def test_cross_attention_is_in_the_fingerprint_only_when_on():
  config = _tiny()
  config.prior.level_1.kind = 'transformer'
  vqvae = {'step': 1, 'digest': 'd'}
  before = builders.prior_fingerprint(config, 1, vqvae)
  assert 'prior.level_1.cond_mode' not in before  # Old checkpoints match.
  assert builders.build_prior(config, 1).cond_mode == 'add'
  config.prior.level_1.cond_mode = 'cross'
  assert builders.prior_fingerprint(config, 1, vqvae) == {
      **before, 'prior.level_1.cond_mode': 'cross'}
  assert builders.build_prior(config, 1).cross_attends
  # A config recorded before the field existed builds the 'add' model.
  del config.prior.level_1['cond_mode']
  assert builders.prior_fingerprint(config, 1, vqvae) == before
  assert builders.build_prior(config, 1).cond_mode == 'add'

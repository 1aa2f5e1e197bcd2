"""Every config file loads, validates and keeps to the base's fields."""

import glob
import importlib
import os
import re

from absl import flags
from ml_collections import config_flags
import pytest

from configs import common
from vqvae2_jax import builders
from vqvae2_jax import config_validation

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG_DIR = os.path.join(_ROOT, 'configs')
# Dataset configs: every file in configs/ but the shared base.
_NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(_CONFIG_DIR, '*.py'))
    if not os.path.basename(p).startswith('_')
    and os.path.basename(p) != 'common.py')
# (file, argument after ':'): the files and their variants.
_VARIANTS = [(name, None) for name in _NAMES] + [
    ('fashion_mnist', 'tiny'), ('fashion_mnist', 'quality'),
    ('fashion_mnist', 'fine'), ('fashion_mnist', 'long')]


def _load(name, variant=None):
  module = importlib.import_module(f'configs.{name}')
  return module.get_config(variant) if variant else module.get_config()


def _flatten(config, prefix=''):
  """{'section.field': value} of every leaf of a ConfigDict."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def test_all_config_files_found():
  assert {'fashion_mnist', 'cifar10', 'imagenet256', 'ffhq1024'} <= set(_NAMES)


@pytest.mark.parametrize('name,variant', _VARIANTS)
def test_config_loads_and_validates(name, variant):
  config = _load(name, variant)
  if config.data.name == 'image_folder' and not config.data.image_folder:
    config.data.image_folder = '/path/set/by/the/user'
  config_validation.validate_config(config, num_devices=8)
  # The docstring holds the command that runs it.
  module = importlib.import_module(f'configs.{name}')
  path = f'configs/{name}.py' + (f':{variant}' if variant else '')
  assert f'--config={path} ' in module.__doc__


def test_quality_variant_changes_only_the_priors_and_sampling():
  """Its priors train on a default workdir's VQ-VAE and codes; its samples
  are drawn with guidance (the priors' label dropout makes that possible)
  and the default's bottom discount."""
  default, quality = _load('fashion_mnist'), _load('fashion_mnist', 'quality')
  assert (builders.vqvae_fingerprint(quality) ==
          builders.vqvae_fingerprint(default))
  changed = {k for k, v in _flatten(quality).items()
             if _flatten(default)[k] != v}
  assert changed and all(k.startswith('prior.') or k.startswith(
      'sampling.guidance') for k in changed), changed
  assert all(g > 1 for g in builders.sampling_guidance(quality))
  assert quality.prior.label_drop_rate > 0
  assert quality.prior.level_0.num_channels > default.prior.level_0.num_channels
  assert quality.prior.num_train_steps > default.prior.num_train_steps


def test_fine_variant_changes_the_bottom_map_and_the_prior_steps():
  """The default's recipe with the bottom level's codes at 16x16 and the
  priors trained longer: the recipe measured in docs/results.md."""
  default, fine = _load('fashion_mnist'), _load('fashion_mnist', 'fine')
  changed = {k for k, v in _flatten(fine).items()
             if _flatten(default)[k] != v}
  assert changed == {'model.downsample_factors', 'prior.num_train_steps',
                     'sampling.guidance', 'sampling.guidance_per_level',
                     'sampling.discount'}
  assert fine.prior.num_train_steps == 2 * default.prior.num_train_steps
  assert builders.sampling_guidance(fine) == 2.0  # As it was measured,
  assert builders.sampling_discount(fine) == (0.0, 0.0)  # and without.
  assert builders.level_shapes(default) == [(4, 4), (8, 8)]
  assert builders.level_shapes(fine) == [(4, 4), (16, 16)]
  # Its stage 1 is another model: a default workdir's checkpoints and codes
  # are refused, not reused.
  assert (builders.vqvae_fingerprint(fine) !=
          builders.vqvae_fingerprint(default))


def test_long_variant_trains_the_default_models_longer():
  """The default's models, stage 1 for 3x its steps and the priors for 8x,
  both priors twice as wide, sampled at guidance 1.15 at the top and 2 at
  the bottom (each under the default's) with a bottom discount: the recipe
  measured in docs/results.md."""
  default, long = _load('fashion_mnist'), _load('fashion_mnist', 'long')
  changed = {k for k, v in _flatten(long).items()
             if _flatten(default)[k] != v}
  assert changed == {'vqvae_train.num_train_steps', 'prior.num_train_steps',
                     'prior.level_0.num_channels',
                     'prior.level_1.num_channels',
                     'sampling.guidance_per_level'}
  for level in ('level_0', 'level_1'):
    assert (long.prior[level].num_channels ==
            2 * default.prior[level].num_channels)
  assert (long.vqvae_train.num_train_steps ==
          3 * default.vqvae_train.num_train_steps)
  assert long.prior.num_train_steps == 8 * default.prior.num_train_steps
  # Each level's scale under the default's.
  for mine, its in zip(builders.sampling_guidance(long),
                       builders.sampling_guidance(default)):
    assert 1 < mine < its
  # The default's discount, at the bottom level only.
  assert builders.sampling_discount(long) == (0.0, 8.0)
  assert builders.sampling_discount(default) == (0.0, 8.0)
  # The same stage 1: the latent maps and its checkpoint fingerprint.
  assert builders.level_shapes(long) == builders.level_shapes(default)
  assert (builders.vqvae_fingerprint(long) ==
          builders.vqvae_fingerprint(default))


def test_unknown_variant_names_the_fix():
  with pytest.raises(ValueError, match=r"'huge'.*Fix: .*'tiny'"):
    _load('fashion_mnist', 'huge')


def test_the_base_is_not_a_runnable_config():
  # What only a dataset can decide is left empty, and validation says so.
  with pytest.raises(ValueError, match=r'^config\.data\.name: is empty.*Fix:'):
    config_validation.validate_config(common.get_config(), check_dataset=False)


@pytest.mark.parametrize('name,variant', _VARIANTS)
def test_configs_only_set_fields_of_the_base(name, variant):
  """No config adds a field that configs/common.py does not declare."""
  base = _flatten(common.get_config())
  level = _flatten(common.prior_level())
  config = _flatten(_load(name, variant))
  for path, value in config.items():
    match = re.fullmatch(r'prior\.level_\d+\.(\w+)', path)
    if match:  # Configs with more levels add sections from prior_level().
      assert match.group(1) in level, path
      want_type = type(level[match.group(1)])
    else:
      assert path in base, f'{path} is not declared in configs/common.py'
      want_type = type(base[path])
    assert isinstance(value, want_type), (path, value, want_type)


def test_fashion_mnist_sets_the_optimizer_fields_to_the_trainers_defaults():
  # The trainers used to read these with .get(field, default); the demo must
  # keep what it ran with.
  config = _load('fashion_mnist')
  assert config.prior.dtype == 'float32'
  assert config.prior.cosine_decay is True
  assert config.vqvae_train.cosine_decay is True
  assert config.prior.grad_clip_norm == 1.0
  assert config.vqvae_train.grad_clip_norm == 1.0


_OVERRIDES = {
    'prior.dtype': ('bfloat16', 'bfloat16'),
    'prior.cosine_decay': ('false', False),
    'prior.grad_clip_norm': ('0.5', 0.5),
    'vqvae_train.cosine_decay': ('false', False),
    'vqvae_train.grad_clip_norm': ('0', 0.0),
}


def _parse_command_line(*args):
  """The config main.py would get from `args` (locked, overrides applied)."""
  argv = ['main.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_formerly_optional_fields_can_be_set_on_the_command_line():
  """The fields once read with .get exist, so a locked config takes them."""
  path = os.path.join(_CONFIG_DIR, 'fashion_mnist.py')
  config = _parse_command_line(
      f'--config={path}:tiny',
      *[f'--config.{k}={v}' for k, (v, _) in _OVERRIDES.items()])
  assert config.is_locked
  assert config.model.num_hiddens == 16  # The tiny variant.
  for field, (_, want) in _OVERRIDES.items():
    section, name = field.split('.')
    assert config[section][name] == want, field
  config_validation.validate_config(config, num_devices=8)
  # A field the base lacks is refused, as by main.py's locked config.
  with pytest.raises(AttributeError, match='no_such_field'):
    _parse_command_line(f'--config={path}', '--config.prior.no_such_field=1')


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


@pytest.mark.parametrize('name', ['imagenet256', 'ffhq1024'])
def test_long_runs_do_not_inherit_the_cpu_demo_intervals(name):
  config = _load(name)
  for section in (config.vqvae_train, config.prior):
    assert section.warmup_steps >= 1000
    assert 100 <= section.log_every <= 1000
    assert section.checkpoint_every >= 1000

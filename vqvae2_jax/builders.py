"""Config -> modules, latent shapes and checkpoint fingerprints.

The one place that turns a config into the arguments of the pure Flax
modules (`models/`): the trainers, the loaders, sampling and the notebooks
all build their models here, so that a module never reads a config and the
latent shapes are computed once.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vqvae2_jax import errors
from vqvae2_jax.data import layout
from vqvae2_jax.models import classifier as classifier_lib
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.models import transformer
from vqvae2_jax.models import vqvae as vqvae_lib

# The names config.model.dtype, prior.dtype and sampling.dtype may take.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The names prior.export_dtype may take: how an exported file stores the
# priors' floating-point weights (they are computed in float32 either way).
EXPORT_DTYPES = ('float32', 'float16')
# Config fields that define the VQ-VAE's variables (and what its codes mean);
# a checkpoint is only resumed or loaded under the same values. Training
# knobs (EMA decay, dead-code window, dtype, remat, ...) may change between
# runs: remat recomputes activations, it computes the same function.
_VQVAE_FINGERPRINT_FIELDS = (
    'data.image_size', 'data.channels', 'model.downsample_factors',
    'model.num_hiddens', 'model.num_residual_layers',
    'model.num_residual_hiddens', 'model.embedding_dim',
    'model.num_embeddings', 'model.quantizer')
# Fields that also change what the variables mean, recorded only away from
# their default (so checkpoints written before they existed still match).
_VQVAE_OPTIONAL_FINGERPRINT_FIELDS = {'model.l2_normalize_codes': False}
# Fields of config.prior.level_<i> that define the prior's variables, per
# kind. A PixelCNN's fingerprint has no 'kind' entry, so that checkpoints
# written before transformers existed still match; a transformer's has one.
_PRIOR_LEVEL_FIELDS = {
    'pixelcnn': ('num_channels', 'num_layers', 'filter_size',
                 'attention_layers', 'num_heads', 'cond_stack_blocks',
                 'num_output_layers'),
    'transformer': ('kind', 'num_channels', 'num_layers', 'num_heads',
                    'mlp_ratio', 'cond_stack_blocks'),
}
# Fields of a lower level's transformer recorded only away from their
# default (so checkpoints written before they existed still match).
_TRANSFORMER_OPTIONAL_FIELDS = {'cond_mode': 'add'}
# The prior kinds config.prior.level_<i>.kind may name.
PRIOR_KINDS = tuple(_PRIOR_LEVEL_FIELDS)
# Either prior module: both take the same arguments and expose the same
# incremental interface (prepare, init_cache, step_row, step_position).
Prior = pixelcnn.PixelCNNPrior | transformer.TransformerPrior


def _dtype(name: str, field: str) -> Any:
  if name not in DTYPES:
    raise errors.ConfigError(f'config.{field} is {name!r}, not a known '
                             f'dtype. Fix: use one of {tuple(DTYPES)}.')
  return DTYPES[name]


def num_levels(config: ml_collections.ConfigDict) -> int:
  """Levels of the hierarchy (one per downsampling factor)."""
  return len(config.model.downsample_factors)


def level_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """(h, w) of each level's code map, top (level 0) first.

  The image side divided by each level's downsampling factor; the config
  validation guarantees that it divides.
  """
  size = int(config.data.image_size)
  return vqvae_lib.latent_shapes(
      [int(f) for f in config.model.downsample_factors], size, size)


def sampling_guidance(config: ml_collections.ConfigDict
                      ) -> float | tuple[float, ...]:
  """The sampler's classifier-free guidance, as `sampling.sample_hierarchy`
  takes it: `sampling.guidance_per_level` where set (one scale per level,
  top first), else `sampling.guidance` at every level.

  One float when every level has the same scale, so equal settings name
  the same sample run; 1.0 (off) in configs recorded before the fields.
  """
  s = config.sampling
  per_level = tuple(float(g) for g in s.get('guidance_per_level', ()))
  if len(set(per_level)) > 1:
    return per_level
  return per_level[0] if per_level else float(s.get('guidance', 1.0))


def per_level(values: float | Sequence[float], levels: int
              ) -> tuple[float, ...]:
  """A setting of one value for every level, or one per level, top first,
  as one float per level (other counts are returned as they are, for the
  caller to refuse)."""
  values = (tuple(float(v) for v in values) if isinstance(values, Sequence)
            else (float(values),))
  return values * levels if len(values) == 1 else values


def _setting_per_level(config: ml_collections.ConfigDict, section: str,
                       name: str) -> tuple[float, ...]:
  """`<section>.<name>` with one value per level, top first (0.0: off;
  every level 0.0 in configs recorded before the field)."""
  levels = num_levels(config)
  return (per_level(tuple(config[section].get(name, ())), levels)
          or (0.0,) * levels)


def sampling_contrast(config: ml_collections.ConfigDict
                      ) -> tuple[float, ...]:
  """`sampling.contrast`, one value per level (`_setting_per_level`)."""
  return _setting_per_level(config, 'sampling', 'contrast')


def sampling_discount(config: ml_collections.ConfigDict
                      ) -> tuple[float, ...]:
  """`sampling.discount`, one value per level (`_setting_per_level`)."""
  return _setting_per_level(config, 'sampling', 'discount')


def prior_code_weight(config: ml_collections.ConfigDict
                      ) -> tuple[float, ...]:
  """`prior.code_weight`, one power per level (`_setting_per_level`; 0.0:
  plain cross-entropy)."""
  return _setting_per_level(config, 'prior', 'code_weight')


def guidance_text(guidance: float | Sequence[float], sep: str = ':') -> str:
  """A guidance of `sampling_guidance` as text: '1.3', or '1.3:2' per level."""
  if isinstance(guidance, Sequence):
    return sep.join(f'{float(g):g}' for g in guidance)
  return f'{float(guidance):g}'


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[h, w, c] of the model's input images."""
  size = int(config.data.image_size)
  return (size, size, int(config.data.channels))


def build_vqvae(config: ml_collections.ConfigDict) -> vqvae_lib.VQVAE:
  """The VQ-VAE that `config.model` (and `config.data.channels`) describe."""
  m = config.model
  return vqvae_lib.VQVAE(
      downsample_factors=tuple(m.downsample_factors),
      channels=config.data.channels,
      num_hiddens=m.num_hiddens,
      num_residual_layers=m.num_residual_layers,
      num_residual_hiddens=m.num_residual_hiddens,
      embedding_dim=m.embedding_dim,
      num_embeddings=m.num_embeddings,
      quantizer=m.quantizer,
      commitment_cost=m.commitment_cost,
      ema_decay=m.ema_decay,
      ema_epsilon=m.ema_epsilon,
      dead_code_window=m.dead_code_window,
      kmeans_init=m.kmeans_init,
      l2_normalize_codes=m.l2_normalize_codes,
      quantizer_gradient=m.quantizer_gradient,
      level_dropout=m.level_dropout,
      dtype=_dtype(m.dtype, 'model.dtype'),
      remat=bool(m.remat))


def prior_kind(config: ml_collections.ConfigDict, level: int) -> str:
  """config.prior.level_<level>.kind; 'pixelcnn' for configs recorded
  before the field existed."""
  return config.prior[f'level_{level}'].get('kind', 'pixelcnn')


def transformer_cond_mode(config: ml_collections.ConfigDict,
                          level: int) -> str:
  """config.prior.level_<level>.cond_mode of a transformer: 'add' for the
  top level (nothing above it) and for configs recorded before the field."""
  if not level:
    return 'add'
  return config.prior[f'level_{level}'].get('cond_mode', 'add')


def build_prior(config: ml_collections.ConfigDict, level: int) -> Prior:
  """The prior of level `level` (0 = top) that `config` describes.

  K comes from config.model.num_embeddings (every level's codebook), the
  labels from config.data.num_classes, the model (its kind and sizes) from
  config.prior.level_<i>; a lower level is conditioned on the codes of every
  level above it.
  """
  c = config.prior[f'level_{level}']
  k = int(config.model.num_embeddings)
  kind = prior_kind(config, level)
  if kind == 'transformer':
    return transformer.TransformerPrior(
        num_embeddings=k,
        num_channels=c.num_channels,
        num_layers=c.num_layers,
        map_shape=tuple(level_shapes(config)[level]),
        num_heads=c.num_heads,
        mlp_ratio=int(c.get('mlp_ratio', 4)),
        dropout_rate=c.dropout_rate,
        num_classes=int(config.data.num_classes),
        cond_num_embeddings=(k,) * level,
        cond_stack_blocks=c.cond_stack_blocks if level else 0,
        cond_mode=transformer_cond_mode(config, level),
        dtype=_dtype(config.prior.dtype, 'prior.dtype'),
        remat=bool(config.prior.remat),
        precision=config.prior.precision)
  if kind != 'pixelcnn':
    raise errors.ConfigError(
        f'config.prior.level_{level}.kind is {kind!r}. Fix: use one of '
        f'{PRIOR_KINDS}.')
  return pixelcnn.PixelCNNPrior(
      num_embeddings=k,
      num_channels=c.num_channels,
      num_layers=c.num_layers,
      filter_size=c.filter_size,
      dropout_rate=c.dropout_rate,
      attention_layers=c.attention_layers,
      num_heads=c.num_heads,
      num_classes=int(config.data.num_classes),
      cond_num_embeddings=(k,) * level,
      cond_stack_blocks=c.cond_stack_blocks if level else 0,
      num_output_layers=c.num_output_layers,
      dtype=_dtype(config.prior.dtype, 'prior.dtype'),
      remat=bool(config.prior.remat),
      precision=config.prior.precision)


def build_classifier(config: ml_collections.ConfigDict
                     ) -> classifier_lib.Classifier:
  """The domain classifier that config.classifier describes."""
  c = config.classifier
  return classifier_lib.Classifier(
      num_classes=int(config.data.num_classes), width=int(c.width),
      stage_sizes=tuple(int(s) for s in c.stage_sizes),
      downsample_first=bool(c.downsample_first),
      crop=_classifier_crop(config))


def _classifier_crop(config: ml_collections.ConfigDict
                     ) -> tuple[int, int, int, int] | None:
  if not config.classifier.original_area_only:
    return None
  return layout.original_area(config.data)


def vqvae_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model-defining config values stored with every stage-1 checkpoint."""
  fingerprint = {}
  for field in _VQVAE_FINGERPRINT_FIELDS:
    value = config
    for part in field.split('.'):
      value = value[part]
    fingerprint[field] = list(value) if isinstance(value, tuple) else value
  for field, default in _VQVAE_OPTIONAL_FINGERPRINT_FIELDS.items():
    section, name = field.split('.')
    if config[section][name] != default:
      fingerprint[field] = config[section][name]
  return fingerprint


def prior_fingerprint(config: ml_collections.ConfigDict, level: int,
                      vqvae: Mapping[str, Any]) -> dict[str, Any]:
  """What a level's prior checkpoint must agree on: model fields and codes.

  Args:
    config: the run's config.
    level: 0 = top.
    vqvae: provenance of the VQ-VAE whose codes the prior models
      ({'step', 'digest', ...}, see `loading.vqvae_provenance`).

  Returns:
    A JSON-able dict, stored with each of the level's checkpoints.
  """
  c = config.prior[f'level_{level}']
  kind = prior_kind(config, level)
  fields = _PRIOR_LEVEL_FIELDS[kind]
  optional = {}
  if kind == 'transformer':
    mode = transformer_cond_mode(config, level)
    if mode != _TRANSFORMER_OPTIONAL_FIELDS['cond_mode']:
      optional[f'prior.level_{level}.cond_mode'] = mode
  return {
      'level': level,
      'level_shapes': [list(s) for s in level_shapes(config)[:level + 1]],
      'model.num_embeddings': int(config.model.num_embeddings),
      'data.num_classes': int(config.data.num_classes),
      'prior.dtype': config.prior.dtype,
      **{f'prior.level_{level}.{f}': c[f] for f in fields},
      **optional,
      'codes.vqvae_step': int(vqvae['step']),
      'codes.vqvae_digest': vqvae['digest'],
  }


def classifier_fingerprint(config: ml_collections.ConfigDict
                           ) -> dict[str, Any]:
  """What a classifier checkpoint must agree on: its data and its model."""
  c = config.classifier
  crop = _classifier_crop(config)
  return {
      'data.name': config.data.name,
      'data.image_folder': config.data.image_folder,
      'data.image_size': int(config.data.image_size),
      'data.channels': int(config.data.channels),
      'data.num_classes': int(config.data.num_classes),
      'classifier.width': int(c.width),
      'classifier.stage_sizes': [int(s) for s in c.stage_sizes],
      'classifier.downsample_first': bool(c.downsample_first),
      'classifier.crop': None if crop is None else list(crop),
  }


def vqvae_init_inputs(config: ml_collections.ConfigDict) -> jax.Array:
  """A [1, h, w, c] float32 batch of zeros to initialise the VQ-VAE with."""
  return jnp.zeros((1, *image_shape(config)), jnp.float32)


def prior_init_inputs(level: int, shapes: Any, num_classes: int
                      ) -> tuple[jax.Array, tuple[jax.Array, ...],
                                 jax.Array | None]:
  """Zeros shaped like one example of level `level`'s prior inputs.

  Args:
    level: 0 = top.
    shapes: (h, w) of every level, top first (`level_shapes`).
    num_classes: 0 for an unconditional prior.

  Returns:
    (codes [1, h, w], cond_codes ([1, h_j, w_j] for j < level), labels [1]
    or None), all int32.
  """
  codes = jnp.zeros((1, *shapes[level]), jnp.int32)
  cond = tuple(jnp.zeros((1, *s), jnp.int32) for s in shapes[:level])
  labels = jnp.zeros((1,), jnp.int32) if num_classes else None
  return codes, cond, labels

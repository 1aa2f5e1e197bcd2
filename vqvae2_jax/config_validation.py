"""Checks a configuration before any work starts.

Every failure is an `errors.ConfigError` (a ValueError) that names the field
and says how to fix it, so a mistake costs seconds, not the first hour of a
run; main prints it as one line.
"""

import math
import os
from typing import Iterable

import ml_collections

from vqvae2_jax import builders
from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax.evaluation import judges
from vqvae2_jax.models import attention_kernel
from vqvae2_jax.models import gated_kernel
from vqvae2_jax.models import quantizer as quantizer_lib
from vqvae2_jax.models import transformer
from vqvae2_jax.models import vqvae as vqvae_lib

_CHANNELS = (1, 3)
_FEATURES = ('auto', 'judge', 'classifier', 'inception')
_QUANTIZERS = ('ema', 'vq')
_DTYPES = tuple(builders.DTYPES)
_PRECISIONS = ('default', 'high', 'highest')


def _fail(field: str, problem: str, fix: str) -> None:
  raise errors.ConfigError(f'config.{field}: {problem}. Fix: {fix}')


def _check_judge(data: ml_collections.ConfigDict) -> None:
  """eval.features='judge' needs a shipped judge that takes these images."""
  if not judges.has_judge(data.name):
    _fail('eval.features',
          f"is 'judge' but no judge ships for data.name={data.name!r} "
          f'(judges: {", ".join(sorted(judges.JUDGES))})',
          "set eval.features='inception' with eval.inception_weights, or "
          "'classifier' (the workdir's domain classifier)")
  spec = judges.JUDGES[data.name]
  if (data.image_size, data.channels) != (spec.image_size, spec.channels):
    _fail('eval.features',
          f"is 'judge', whose {data.name} judge takes {spec.image_size}x"
          f'{spec.image_size}x{spec.channels} images, not {data.image_size}x'
          f'{data.image_size}x{data.channels}',
          f'use data.image_size={spec.image_size} and data.channels='
          f"{spec.channels}, or eval.features='classifier'")


def known_dataset(name: str) -> bool:
  """Whether `name` is 'image_folder' or a registered tfds dataset."""
  if name == 'image_folder':
    return True
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise errors.MissingPackageError(
        f'data.name={name!r} is looked up in tfds, which is not installed '
        f'({e}; {errors.MODES_WITHOUT_IMAGES_TEXT} do not look it up). '
        'Fix: pip install tensorflow-datasets tensorflow-cpu (or pip install '
        '-e . in a checkout).') from e
  # The registered builders only: the community list is fetched from
  # gs://, which prints credential warnings on machines without them.
  return name.split(':')[0].split('/')[0] in tfds.list_builders(
      with_community_datasets=False)


def latent_sizes(config: ml_collections.ConfigDict) -> list[int]:
  """Side of each level's latent map, top first."""
  return [h for h, _ in builders.level_shapes(config)]


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None,
                    check_dataset: bool = True) -> None:
  """Raises ValueError on the first inconsistency in `config`.

  Args:
    config: a configuration from configs/.
    num_devices: devices the batches are split over; None skips the
      divisibility checks (e.g. when validating on another machine).
    check_dataset: look the dataset name up in the tfds registry.
  """
  _check_data(config.data, check_dataset)
  _check_ranges(config)
  _check_model(config)
  _check_schedules(config)
  _check_priors(config)
  _check_sampling(config)
  _check_classifier(config)
  _check_eval(config)
  _check_machine(config)
  _check_batches(config, num_devices)


def _check_data(data: ml_collections.ConfigDict, check_dataset: bool) -> None:
  if not data.name:
    _fail('data.name', 'is empty',
          "set a tfds dataset name or 'image_folder' (configs/common.py "
          'leaves it to the dataset configs)')
  if check_dataset and not known_dataset(data.name):
    _fail('data.name', f'unknown dataset {data.name!r}',
          "use a tfds dataset name (see tfds.list_builders()) or 'image_folder' "
          'with --config.data.image_folder=/path/to/images')
  if data.name == 'image_folder' and not data.image_folder:
    _fail('data.image_folder', "is empty while data.name='image_folder'",
          'pass --config.data.image_folder=/path/to/images')
  if data.image_size < 1:
    _fail('data.image_size', f'is {data.image_size}',
          'set the side images are resized or padded to, e.g. 32')
  if data.channels not in _CHANNELS:
    _fail('data.channels', f'is {data.channels}', 'use 1 (grayscale) or 3 (RGB)')
  if data.num_classes < 0:
    _fail('data.num_classes', f'is {data.num_classes}',
          'use 0 for unlabelled data or the number of classes')


def _check_model(config: ml_collections.ConfigDict) -> None:
  """Levels listed top first, each a power-of-two downsampling that divides
  the image, each level finer than the one above; the quantizer."""
  model, image_size = config.model, config.data.image_size
  factors = tuple(model.downsample_factors)
  if not factors:
    _fail('model.downsample_factors', 'is empty',
          'list one downsampling factor per level, top first, e.g. (8, 4)')
  for i, f in enumerate(factors):
    if not vqvae_lib.is_power_of_two(f) or f < 2:
      _fail(f'model.downsample_factors[{i}]', f'is {f}',
            'use powers of two >= 2 (each 2x step is one strided layer)')
    if image_size % f:
      _fail('model.downsample_factors',
            f'image size {image_size} is not divisible by level {i}\'s '
            f'downsampling {f}',
            'choose data.image_size divisible by every factor (e.g. '
            f'{(image_size // f + 1) * f})')
  for i in range(1, len(factors)):
    if factors[i] >= factors[i - 1]:
      _fail('model.downsample_factors',
            f'{factors} is not strictly decreasing',
            'list levels top (coarsest, largest factor) first, e.g. (8, 4)')
  if model.quantizer not in _QUANTIZERS:
    _fail('model.quantizer', f'is {model.quantizer!r}', f'use one of {_QUANTIZERS}')
  if model.quantizer_gradient not in quantizer_lib.GRADIENTS:
    _fail('model.quantizer_gradient', f'is {model.quantizer_gradient!r}',
          f'use one of {quantizer_lib.GRADIENTS}')
  if model.dtype not in _DTYPES:
    _fail('model.dtype', f'is {model.dtype!r}', f'use one of {_DTYPES}')
  if model.num_embeddings < 2 or model.embedding_dim < 1:
    _fail('model.num_embeddings', 'codebooks need >= 2 codes of dimension >= 1',
          'use e.g. num_embeddings=512, embedding_dim=64')
  if not 0.0 < model.ema_decay < 1.0:
    _fail('model.ema_decay', f'is {model.ema_decay}', 'use a value in (0, 1), e.g. 0.99')


def _check_schedules(config: ml_collections.ConfigDict) -> None:
  """Every training stage's schedule, cadence and optimizer."""
  for section in _TRAINING_SECTIONS:
    stage = config[section]
    for name, example in (('num_train_steps', 3000), ('log_every', 100),
                          ('eval_every', 1000), ('checkpoint_every', 500),
                          ('keep_checkpoints', 2)):
      if stage[name] < 1:
        _fail(f'{section}.{name}', f'is {stage[name]}',
              f'use a positive number, e.g. {example}')
    if not stage.learning_rate > 0:
      _fail(f'{section}.learning_rate', f'is {stage.learning_rate}',
            'use a positive peak learning rate, e.g. 3e-4')
  for section in _TRAINING_SECTIONS:
    optimizer = config[section]
    if optimizer.warmup_steps < 0:
      _fail(f'{section}.warmup_steps', f'is {optimizer.warmup_steps}',
            'use 0 (no warm-up) or a number of steps')
    if 'grad_clip_norm' in optimizer and optimizer.grad_clip_norm < 0:
      _fail(f'{section}.grad_clip_norm', f'is {optimizer.grad_clip_norm}',
            'use 0 (no clipping) or a positive norm, e.g. 1.0')


def _check_priors(config: ml_collections.ConfigDict) -> None:
  """Exactly one level_<i> section per model level, each buildable."""
  prior = config.prior
  n = len(config.model.downsample_factors)
  sections = sorted(k for k in prior.keys() if k.startswith('level_'))
  expected = [f'level_{i}' for i in range(n)]
  if sections != sorted(expected):
    _fail('prior', f'has sections {sections} for a {n}-level model',
          f'define exactly {expected} (level_0 is the top)')
  if prior.dtype not in _DTYPES:
    _fail('prior.dtype', f'is {prior.dtype!r}', f'use one of {_DTYPES}')
  if prior.get('export_dtype', 'float32') not in builders.EXPORT_DTYPES:
    _fail('prior.export_dtype', f'is {prior.export_dtype!r}',
          f'use one of {builders.EXPORT_DTYPES}')
  if prior.precision not in _PRECISIONS:
    _fail('prior.precision', f'is {prior.precision!r}',
          f'use one of {_PRECISIONS}')
  if prior.train_eval_examples < 0:
    _fail('prior.train_eval_examples', f'is {prior.train_eval_examples}',
          'use 0 (the whole training split) or a number of examples')
  if not -1 <= prior.level < n:
    _fail('prior.level', f'is {prior.level} for a {n}-level model',
          f'use -1 (all levels) or 0..{n - 1}')
  _check_per_level('prior.code_weight', tuple(prior.get('code_weight', ())),
                   n, 0.75, 'plain cross-entropy')
  for i in range(n):
    _check_prior_level(config, i)


def _check_prior_level(config: ml_collections.ConfigDict, i: int) -> None:
  level, field = config.prior[f'level_{i}'], f'prior.level_{i}'
  kind = builders.prior_kind(config, i)
  if kind not in builders.PRIOR_KINDS:
    _fail(f'{field}.kind', f'is {kind!r}', f'use one of {builders.PRIOR_KINDS}')
  mode = level.get('cond_mode', 'add')
  if mode != 'add' and (kind != 'transformer' or i == 0):
    _fail(f'{field}.cond_mode', f'is {mode!r}',
          "leave it 'add': cross-attention is built only for a lower "
          "level's transformer (kind='transformer', level > 0)")
  if kind == 'transformer':
    # filter_size, attention_layers and num_output_layers are the
    # PixelCNN's; a transformer ignores them.
    if level.num_channels % level.num_heads:
      _fail(f'{field}.num_heads',
            f'{level.num_heads} does not divide '
            f'num_channels={level.num_channels}',
            'choose num_heads dividing num_channels (every transformer '
            'block attends)')
    if level.get('mlp_ratio', 4) < 1:
      _fail(f'{field}.mlp_ratio', f'is {level.mlp_ratio}',
            'use a whole number >= 1, e.g. 4')
  else:
    if level.attention_layers > level.num_layers:
      _fail(f'{field}.attention_layers',
            f'{level.attention_layers} > num_layers={level.num_layers}',
            'use at most num_layers attention layers')
    if level.attention_layers and level.num_channels % level.num_heads:
      _fail(f'{field}.num_heads',
            f'{level.num_heads} does not divide num_channels={level.num_channels}',
            'choose num_heads dividing num_channels')
    if level.filter_size < 2:
      _fail(f'{field}.filter_size', f'is {level.filter_size}',
            'use a filter size >= 2 (3 or 5)')
  if i > 0 and level.cond_stack_blocks < 0:
    _fail(f'{field}.cond_stack_blocks', 'is negative', 'use >= 0')
  if mode not in transformer.COND_MODES:
    _fail(f'{field}.cond_mode', f'is {mode!r}',
          f'use one of {transformer.COND_MODES}')


def _check_per_level(field: str, values: tuple, levels: int, example: float,
                     zero: str) -> None:
  """A setting of () for none, one value >= 0 for every level, or one per
  level, top first; `zero` says what 0 means."""
  if len(values) not in (0, 1, levels):
    _fail(field, f'is {values}: {len(values)} values for {levels} levels',
          f'give one value for every level (e.g. {example}), one per level, '
          f'top first (e.g. '
          f'{",".join(["0"] * (levels - 1) + [str(example)])}), or () for '
          'none')
  for v in values:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
      _fail(field, f'is {values}', f'use values >= 0 (0 is off: {zero})')


def _check_sampling(config: ml_collections.ConfigDict) -> None:
  sampling = config.sampling
  if sampling.temperature <= 0:
    _fail('sampling.temperature', f'is {sampling.temperature}', 'use a value > 0')
  if sampling.num_samples_per_class < 1:
    _fail('sampling.num_samples_per_class',
          f'is {sampling.num_samples_per_class}', 'use a positive number, e.g. 8')
  if sampling.top_k < 0:
    _fail('sampling.top_k', f'is {sampling.top_k}', 'use 0 (off) or k >= 1')
  if sampling.dtype not in ('',) + _DTYPES:
    _fail('sampling.dtype', f'is {sampling.dtype!r}',
          f"use '' (the priors' own) or one of {_DTYPES}")
  if sampling.unroll < 1:
    _fail('sampling.unroll', f'is {sampling.unroll}',
          'use 1 (a plain loop) or more positions per iteration')
  if not 0.0 < sampling.top_p <= 1.0:
    _fail('sampling.top_p', f'is {sampling.top_p}', 'use a value in (0, 1]')
  step_kernel = sampling.get('step_kernel', 'xla')
  match = gated_kernel.STEP_KERNEL.fullmatch(str(step_kernel))
  if not match:
    _fail('sampling.step_kernel', f'is {step_kernel!r}',
          "use 'xla' (the default), 'pallas' or 'pallas<T>' (T channels "
          "per program, a power of two dividing the priors' channels), "
          "either with '_gated' to keep the attention blocks in XLA")
  tile = int(match.group(1) or 0)
  for level in range(len(config.model.downsample_factors)):
    section = config.prior.get(f'level_{level}')
    if not (match.group(0) != 'xla' and section is not None
            and section.get('kind', 'pixelcnn') == 'pixelcnn'):
      continue
    try:
      if tile:
        gated_kernel.tile_for(section.num_channels, tile)
    except gated_kernel.TileError:
      _fail('sampling.step_kernel', f'is {step_kernel!r}, but '
            f'prior.level_{level}.num_channels is {section.num_channels}',
            f'use pallas (a tile that divides it) or pallas<T> with T a '
            f'power of two dividing {section.num_channels}')
    try:
      if section.get('attention_layers', 0) and not match.group(2):
        attention_kernel.check_heads(section.num_channels, section.num_heads)
    except gated_kernel.TileError:
      _fail('sampling.step_kernel', f'is {step_kernel!r}, but '
            f'prior.level_{level} has heads of {section.num_channels} / '
            f'{section.num_heads} channels, not a power of two',
            "use 'xla' or a '_gated' step (attention blocks in XLA), or "
            'heads of 2^k channels')
  guidance = sampling.get('guidance', 1.0)
  if not (math.isfinite(guidance) and guidance >= 0):
    _fail('sampling.guidance', f'is {guidance}',
          'use a value >= 0 (1.0 is off)')
  per_level = sampling.get('guidance_per_level', ())
  levels = builders.num_levels(config)
  if per_level and len(per_level) != levels:
    _fail('sampling.guidance_per_level', f'is {per_level}: '
          f'{len(per_level)} scale(s) for {levels} levels',
          f'give one scale per level, top first (e.g. '
          f'{",".join(["1.5"] * levels)}), or () for sampling.guidance at '
          'every level')
  for g in per_level:
    if not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
      _fail('sampling.guidance_per_level', f'is {per_level}',
            'use scales >= 0, one per level, top first (1.0 is off)')
  if per_level and guidance != 1.0:  # Which one was meant?
    _fail('sampling.guidance', f'is {guidance} while '
          f'sampling.guidance_per_level={per_level} guides each level',
          'set one: sampling.guidance_per_level=() for '
          f'{guidance} at every level, or sampling.guidance=1.0 to keep '
          'the scale per level')
  for name, example in (('contrast', 0.5), ('discount', 4)):
    _check_per_level(f'sampling.{name}', tuple(sampling.get(name, ())),
                     levels, example, 'the priors as trained')
  if not 0.0 < sampling.rejection_keep <= 1.0:
    _fail('sampling.rejection_keep', f'is {sampling.rejection_keep}',
          'use a fraction in (0, 1]; 1.0 turns rejection sampling off')


def _check_classifier(config: ml_collections.ConfigDict) -> None:
  """The domain classifier: its group norms and its halvings of the image."""
  classifier, image_size = config.classifier, config.data.image_size
  if classifier.width < 8 or classifier.width % 8:
    _fail('classifier.width', f'is {classifier.width}',
          'use a multiple of 8 (its group norms have 8 groups), e.g. 32')
  if not classifier.stage_sizes or min(classifier.stage_sizes) < 1:
    _fail('classifier.stage_sizes', f'is {tuple(classifier.stage_sizes)}',
          'list >= 1 residual blocks per stage, e.g. (1, 1, 1)')
  halvings = len(classifier.stage_sizes) - (not classifier.downsample_first)
  if image_size % 2**halvings:
    _fail('classifier.stage_sizes',
          f'{len(classifier.stage_sizes)} stages halve the image '
          f'{halvings} times, but data.image_size={image_size} does not '
          f'divide by {2**halvings}', 'use fewer stages')
  if classifier.augment_shift < 0:
    _fail('classifier.augment_shift', f'is {classifier.augment_shift}',
          'use 0 (off) or a number of pixels, e.g. 2')


def _check_eval(config: ml_collections.ConfigDict) -> None:
  evaluation = config.eval
  if evaluation.features not in _FEATURES:
    _fail('eval.features', f'is {evaluation.features!r}',
          f'use one of {_FEATURES}')
  if evaluation.features == 'judge':
    _check_judge(config.data)
  if evaluation.num_samples < 2:
    _fail('eval.num_samples', f'is {evaluation.num_samples}',
          'score at least 2 samples (10,000 is the usual count)')
  if evaluation.precision_recall_k < 1:
    _fail('eval.precision_recall_k', f'is {evaluation.precision_recall_k}',
          'use k >= 1 (3 is the usual value)')
  if evaluation.cas_samples_per_class < 0:
    _fail('eval.cas_samples_per_class', f'is {evaluation.cas_samples_per_class}',
          'use 0 (as many as the real train split) or a positive number')


def _check_machine(config: ml_collections.ConfigDict) -> None:
  """The compilation cache's directory and the CPU device count."""
  cache_dir = config.get('compilation_cache_dir', '')
  if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    _fail('compilation_cache_dir', f'{cache_dir!r} is a file, not a directory',
          "name a directory (made if missing), or '' for no cache")
  if int(config.mesh.get('cpu_devices', 0)) < 0:
    _fail('mesh.cpu_devices', f'is {config.mesh.cpu_devices}',
          'use 0 (JAX\'s one CPU device) or a device count, e.g. the number '
          'of cores')


def _check_batches(config: ml_collections.ConfigDict,
                   num_devices: int | None) -> None:
  """Batches positive and, given the device count, split evenly over a
  mesh that lays the devices out."""
  for field in _batch_fields(config):
    section, name = field.split('.')
    if config[section][name] < 1:
      _fail(field, f'is {config[section][name]}',
            f'use a positive multiple of the device count'
            f'{f" ({num_devices})" if num_devices else ""}, e.g. '
            f'{8 * (num_devices or 1)}')
  if num_devices is None:
    return
  mesh = config.mesh
  data, fsdp = int(mesh.data), int(mesh.fsdp)
  try:  # The layout rule itself, so validation and the mesh never differ.
    parallel.mesh_shape(mesh, num_devices)
  except ValueError:
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    _fail('mesh', f'data={data} x fsdp={fsdp} cannot lay out the '
          f'{num_devices} devices',
          f'give fsdp one of {divisors} with data=-1 (the rest), e.g. '
          f'--config.mesh.data=-1 --config.mesh.fsdp=1')
  for field in _batch_fields(config):
    section, name = field.split('.')
    value = config[section][name]
    if value % num_devices:
      _fail(field, f'{value} is not divisible by the {num_devices} devices',
            f'use a multiple of {num_devices}, e.g. '
            f'{max(1, round(value / num_devices)) * num_devices}')


_TRAINING_SECTIONS = ('vqvae_train', 'prior', 'classifier')

# Numeric fields not checked elsewhere: (field, lowest, highest, example).
# None leaves a side open; a float bound is exclusive (rates and decays),
# an int bound inclusive (counts).
_RANGES = (
    ('data.shuffle_buffer', 1, None, '10000'),
    ('data.input_streams', 0, None, '0 (one per process) or 8'),
    ('model.num_hiddens', 1, None, '128'),
    ('model.num_residual_layers', 0, None, '2'),
    ('model.num_residual_hiddens', 1, None, '64'),
    ('model.commitment_cost', 0, None, '0.25'),
    ('model.ema_epsilon', 0.0, None, '1e-5'),
    ('model.dead_code_window', 0, None, '100 (0 disables)'),
    ('model.level_dropout', 0, 1.0, '0.25 (0 disables)'),
    ('prior.polyak_decay', 0, 1.0, '0.9999 (0 disables)'),
    ('prior.label_drop_rate', 0, 1.0, '0.1'),
    ('prior.codes_per_shard', 1, None, '10000'),
    ('eval.kid_subset_size', 2, None, '1000'),
    ('eval.kid_subsets', 1, None, '100'),
    ('classifier.weight_decay', 0, None, '1e-4'),
)
_LEVEL_RANGES = (
    ('num_channels', 1, None, '512'),
    ('num_layers', 1, None, '20'),
    ('dropout_rate', 0, 1.0, '0.1'),
    ('attention_layers', 0, None, '0 or 4'),
    ('num_heads', 1, None, '8'),
    ('num_output_layers', 0, None, '1'),
)


def _check_range(field: str, value, low, high, example: str) -> None:
  """Fails unless low <= value (low < value for a float low) and value <
  high (a float high) or value <= high (an int high)."""
  too_low = low is not None and (
      value <= low if isinstance(low, float) else value < low)
  too_high = high is not None and (
      value >= high if isinstance(high, float) else value > high)
  if too_low or too_high:
    left = '(' if isinstance(low, float) else '['
    right = ')' if isinstance(high, float) else ']'
    span = (f'in {left}{low}, {high}{right}' if high is not None else
            f'> {low}' if isinstance(low, float) else f'>= {low}')
    _fail(field, f'is {value}', f'use a value {span}, e.g. {example}')


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  for field, low, high, example in _RANGES:
    section, name = field.split('.')
    _check_range(field, config[section][name], low, high, example)
  for key in sorted(config.prior.keys()):
    if key.startswith('level_'):
      for name, low, high, example in _LEVEL_RANGES:
        _check_range(f'prior.{key}.{name}', config.prior[key][name], low,
                     high, example)


def _batch_fields(config: ml_collections.ConfigDict) -> Iterable[str]:
  yield from ('vqvae_train.batch_size', 'vqvae_train.eval_batch_size',
              'prior.batch_size', 'prior.eval_batch_size', 'sampling.batch_size',
              'classifier.batch_size', 'classifier.eval_batch_size',
              'eval.batch_size')

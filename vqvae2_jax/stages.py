"""The pipeline's stages by name: what `--mode` dispatches to.

Each stage is a function `(config, workdir)` that validates nothing itself
(`run` validates once), resumes from what `workdir` holds, and returns a
dict of final metrics. Imports are lazy so that `--help` stays fast and a
stage's dependencies load only when it runs.
"""

import importlib
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from vqvae2_jax import config_validation
from vqvae2_jax import parallel

# mode -> (module, function). 'all' runs the stages in this order.
_STAGES = {
    'data': ('vqvae2_jax.data.preview', 'preview_data'),
    'vqvae': ('vqvae2_jax.train.vqvae_trainer', 'train_and_evaluate'),
    'codes': ('vqvae2_jax.train.extract', 'extract_codes'),
    'prior': ('vqvae2_jax.train.prior_trainer', 'train_priors'),
    'sample': ('vqvae2_jax.generate', 'sample_and_save'),
    'classifier': ('vqvae2_jax.train.classifier_trainer', 'train_and_evaluate'),
    'eval': ('vqvae2_jax.evaluation.run', 'evaluate'),
}
PIPELINE = ('vqvae', 'codes', 'prior', 'sample', 'classifier', 'eval')
MODES = tuple(_STAGES) + ('all',)


def stage_function(mode: str) -> Callable[[ml_collections.ConfigDict, str], Any]:
  """Returns the function that runs `mode`, or raises a plain error."""
  if mode not in _STAGES:
    raise ValueError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  module_name, fn_name = _STAGES[mode]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    module = None
  fn = getattr(module, fn_name, None)
  if fn is None:
    raise NotImplementedError(
        f'--mode={mode} is not built yet ({module_name}.{fn_name} does not '
        'exist in this version).')
  return fn


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates `config` and runs `mode` (every stage in order for 'all')."""
  parallel.maybe_initialize_distributed()
  config_validation.validate_config(config, num_devices=jax.device_count())
  modes = PIPELINE if mode == 'all' else (mode,)
  results = {}
  for m in modes:
    logging.info('=== Stage %s ===', m)
    results[m] = stage_function(m)(config, workdir)
  return results

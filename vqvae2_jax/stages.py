"""The pipeline's stages by name: what `--mode` dispatches to.

Each stage is a function `(config, workdir)` that validates nothing itself
(`run` validates once), resumes from what `workdir` holds, and returns a
dict of final metrics. Imports are lazy so that `--help` stays fast and a
stage's dependencies load only when it runs.
"""

import importlib
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from vqvae2_jax import config_validation
from vqvae2_jax import console
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
    'export': ('vqvae2_jax.pipeline', 'export_workdir'),
}
PIPELINE = ('vqvae', 'codes', 'prior', 'sample', 'classifier', 'eval',
            'export')
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
  results, seconds = {}, {}
  for i, m in enumerate(modes):
    if len(modes) > 1:
      console.say('[%d/%d] %s', i + 1, len(modes), _TITLES[m])
    else:
      logging.info('=== Stage %s ===', m)
    start = time.time()
    results[m] = stage_function(m)(config, workdir)
    seconds[m] = time.time() - start
  if len(modes) > 1:
    for line in summary_lines(results, seconds, workdir):
      console.say('%s', line)
  return results


_TITLES = {
    'data': 'data: prepare and preview the dataset',
    'vqvae': 'vqvae: stage 1, the hierarchical VQ-VAE',
    'codes': 'codes: every level\'s codes of the train and held-out splits',
    'prior': 'prior: stage 2, a PixelCNN prior per level',
    'sample': 'sample: stage 3, codes sampled top-down and decoded',
    'classifier': 'classifier: the domain classifier of the sample metrics',
    'eval': 'eval: the evaluation report',
    'export': 'export: every stage in one file',
}


def _figure(mode: str, result: Any) -> str:
  """The key figure of a finished stage's result, for the summary."""
  if not isinstance(result, dict):
    return ''
  if mode == 'vqvae' and 'eval/psnr' in result:
    return (f'PSNR {result["eval/psnr"]:.2f} dB' + (
        f' (original area {result["eval/psnr_area"]:.2f})'
        if 'eval/psnr_area' in result else ''))
  if mode == 'prior':
    bits = [f'{v["eval/bits_per_code"]:.3f}' for v in result.values()
            if isinstance(v, dict) and 'eval/bits_per_code' in v]
    return f'held-out bits/code {" / ".join(bits)}' if bits else ''
  if mode == 'classifier' and 'eval/accuracy' in result:
    return f'test accuracy {100 * result["eval/accuracy"]:.2f}%'
  if mode == 'sample' and 'num_samples' in result:
    return f'{result["num_samples"]} samples'
  if mode == 'eval' and isinstance(result.get('samples'), dict):
    s = result['samples']
    return ', '.join(f'{label} {s[k]:.3g}' for k, label in (
        ('fid', 'FID'), ('inception_score', 'IS'), ('precision', 'precision'),
        ('recall', 'recall')) if isinstance(s.get(k), (int, float)))
  return ''


def summary_lines(results: dict, seconds: dict, workdir: str) -> list[str]:
  """The table that ends --mode=all: stage, minutes, key figure."""
  lines = [f'Done in {sum(seconds.values()) / 60:.1f} min; workdir {workdir}:']
  for m, result in results.items():
    lines.append(f'  {m:<11} {seconds[m] / 60:5.1f} min  {_figure(m, result)}'
                 .rstrip())
  return lines

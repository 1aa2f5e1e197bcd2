"""The stages by name: what `--mode` dispatches to.

Each stage is a function `(config, workdir)` that validates nothing itself
(`run` validates once), resumes from what `workdir` holds, and returns a
dict of final metrics. Imports are lazy so that `--help` stays fast and a
stage's dependencies load only when it runs.
"""

import importlib
import importlib.util
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from vqvae2_jax import config_validation
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.evaluation import judges

# mode -> (module, function). 'all' runs the stages in this order.
_STAGES = {
    'data': ('vqvae2_jax.data.preview', 'preview_data'),
    'vqvae': ('vqvae2_jax.train.vqvae_trainer', 'train_and_evaluate'),
    'codes': ('vqvae2_jax.train.extract', 'extract_codes'),
    'prior': ('vqvae2_jax.train.prior_trainer', 'train_priors'),
    'sample': ('vqvae2_jax.generate', 'sample_and_save'),
    'classifier': ('vqvae2_jax.train.classifier_trainer', 'train_and_evaluate'),
    'eval': ('vqvae2_jax.stages', 'evaluate'),
    'export': ('vqvae2_jax.api', 'export_workdir'),
}
STAGE_ORDER = ('vqvae', 'codes', 'prior', 'sample', 'classifier', 'eval',
               'export')
MODES = tuple(_STAGES) + ('all',)


def modes_of_all(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The stages --mode=all runs for `config`, in order.

  STAGE_ORDER, except for the domain classifier: it runs only where
  something uses it (rejection sampling scores candidates with it, CAS compares with
  it, and the 'classifier' and 'inception' rulers take its probabilities),
  and before the samples when it scores them. With the shipped judge as the
  ruler and neither rejection nor CAS, its minutes are saved.
  """
  rejection = float(config.sampling.rejection_keep) < 1.0
  judged = judges.config_ruler(config) == 'judge'
  if not (rejection or config.eval.cas or not judged):
    return tuple(m for m in STAGE_ORDER if m != 'classifier')
  if rejection:
    rest = tuple(m for m in STAGE_ORDER if m != 'classifier')
    at = rest.index('sample')
    return rest[:at] + ('classifier',) + rest[at:]
  return STAGE_ORDER


def stage_function(mode: str) -> Callable[[ml_collections.ConfigDict, str], Any]:
  """Returns the function that runs `mode` (importing its module).

  Raises:
    ValueError: `mode` is not one of MODES (main's flag refuses it first).
  """
  if mode not in _STAGES:
    raise ValueError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  module_name, fn_name = _STAGES[mode]
  return getattr(importlib.import_module(module_name), fn_name)


def _run_stage(mode: str, config: ml_collections.ConfigDict,
               workdir: str) -> Any:
  """Runs one stage; one that reads images where TensorFlow or tfds is not
  installed raises errors.MissingPackageError (they load with its data)."""
  with errors.reading_images(f'--mode={mode}'):
    return stage_function(mode)(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: `evaluation.run.evaluate`, given CAS's classifier trainer.

  Here, not in evaluation/: only this module reaches into the trainers.
  """
  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.evaluation import run as eval_run
  from vqvae2_jax.train import classifier_trainer
  # pylint: enable=g-import-not-at-top
  return eval_run.evaluate(
      config, workdir, train_classifier=classifier_trainer.train_on_arrays)


@console.python_console()  # From Python: the command line's console and logs.
def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates `config` and runs `mode` (every stage in order for 'all')."""
  parallel.split_host_cpu(config.mesh.get('cpu_devices', 0))
  parallel.maybe_initialize_distributed()
  if jax.process_index() > 0:
    console.follow()  # Process 0 speaks for all.
  # The dataset's name is looked up in tfds where tfds is installed; without
  # it (an accelerator image with JAX alone) only where images are read: the
  # priors, samples and export run from a workdir's codes and weights.
  config_validation.validate_config(
      config, num_devices=jax.device_count(),
      check_dataset=(mode not in errors.MODES_WITHOUT_IMAGES or
                     importlib.util.find_spec('tensorflow_datasets')
                     is not None))
  parallel.use_compilation_cache(config.get('compilation_cache_dir', ''))
  modes = modes_of_all(config) if mode == 'all' else (mode,)
  if mode not in ('data', 'export'):
    _record_config(config, workdir)
  # From here on SIGTERM is a preemption notice that every phase honours.
  with parallel.preemption_notices():
    return _run_modes(modes, config, workdir)


def _run_modes(modes: tuple[str, ...], config: ml_collections.ConfigDict,
               workdir: str) -> dict:
  """Runs `modes` in order; a preemption notice stops before the next one.

  Raises:
    errors.Preempted: a notice came during a stage that finished (or saved
      what it had) and more stages were due; a rerun continues with them.
  """
  results, seconds = {}, {}
  for i, m in enumerate(modes):
    if len(modes) > 1:
      console.say('[%d/%d] %s', i + 1, len(modes), _TITLES[m])
    else:
      logging.info('=== Stage %s ===', m)
    start = time.time()
    if m in _LOGGED_BY_TRAINING:  # Writes <stage dir>/log.txt itself.
      results[m] = _run_stage(m, config, workdir)
    else:
      with console.buffered_log() as records:
        results[m] = _run_stage(m, config, workdir)
      path = _log_path(m, results[m], workdir, start)
      if path is not None and jax.process_index() == 0:
        console.write_log(path, records)
    seconds[m] = time.time() - start
    if parallel.preempted() and i + 1 < len(modes):
      raise errors.Preempted(
          f'{m}: finished; stopped by a preemption notice (SIGTERM) before '
          f'{modes[i + 1]}. Run the same command again to continue from '
          f'{modes[i + 1]}.', step=0)
  if len(modes) > 1:
    for line in summary_lines(results, seconds, workdir):
      console.say('%s', line)
  return results


# Stages whose training loop writes its own <stage dir>/log.txt.
_LOGGED_BY_TRAINING = ('vqvae', 'prior', 'classifier')


def _log_path(mode: str, result: Any, workdir: str,
              start: float) -> str | None:
  """Where a non-training stage's log goes, if it wrote anything this time.

  A stage that found its work done wrote nothing (a finished workdir may be
  read-only), so neither does its log.
  """
  if not isinstance(result, dict):
    return None
  wd = workdir_lib.Workdir(workdir)
  if mode == 'codes' and result.get('extract_time_s'):
    return workdir_lib.log_txt(wd.codes)
  if mode == 'sample' and result.get('dir'):
    meta = os.path.join(result['dir'], 'meta.json')
    if os.path.exists(meta) and os.path.getmtime(meta) >= start - 1:
      return workdir_lib.log_txt(result['dir'])
  if mode == 'eval':  # Unless an up-to-date report was only read.
    report = wd.report_json
    if os.path.exists(report) and os.path.getmtime(report) >= start - 1:
      return workdir_lib.log_txt(wd.eval)
  if mode == 'data':
    return workdir_lib.log_txt(wd.data)
  return None


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes this run's config to workdir/config.json unless it is there.

  Only a config that the workdir's checkpoints accept is written
  (`_refusal`): a run that a stage will refuse (another model config on a
  trained workdir) leaves the recorded config, which still describes the
  checkpoints, as it is. So the model fields agree for every run of a
  workdir; training and sampling settings are the latest accepted run's.
  A read-only workdir is left as it is.
  """
  path = workdir_lib.Workdir(workdir).config_json
  text = config.to_json(indent=1, sort_keys=True)
  try:
    with open(path) as f:
      previous = f.read()
  except OSError:
    previous = None
  recorded = previous == text
  # Process 0's answer on every process: process 0 may write the file while
  # another one reads it, and `_refusal` opens orbax managers, whose
  # barriers every process must reach.
  if parallel.primary_view(recorded):
    return
  refusal = _refusal(config, workdir)
  if refusal is not None:
    logging.info('Not recording the config in %s: %s', path, refusal)
    return
  if jax.process_index() != 0:
    return
  changes = _training_changes(previous, text)
  if changes:
    shown = changes[:_CHANGES_SHOWN]
    more = len(changes) - len(shown)
    console.say(
        'Training settings differ from this workdir\'s last run (%s); a '
        'stage that resumes trains on with the new ones: %s%s', path,
        '; '.join(shown), f'; and {more} more' if more > 0 else '')
  try:
    files.atomic_write(path, lambda f: f.write(text.encode()))
  except OSError as e:
    logging.info('Not recording the config in %s: %s', path, e)


# The config's parts that a training stage trains with. The checkpoints'
# fingerprints hold the model's fields only (a resume with another model is
# refused); these may change between runs, and a stage that resumes then
# trains on with the new values (another learning rate, step count or
# `prior.code_weight`), so a run names them when it records its config.
_TRAINING_SECTIONS = ('seed', 'data', 'model', 'vqvae_train', 'prior',
                      'classifier')
_CHANGES_SHOWN = 8


def _flatten(value: Any, prefix: str = '') -> dict[str, Any]:
  """{'section.field': value} of a config's JSON, nested sections joined."""
  if not isinstance(value, dict):
    return {prefix: value}
  flat = {}
  for key, item in value.items():
    flat.update(_flatten(item, f'{prefix}.{key}' if prefix else key))
  return flat


def _training_changes(previous: str | None, text: str) -> list[str]:
  """'field: recorded -> new' of each training setting (`_TRAINING_SECTIONS`)
  in which config JSON `text` differs from the recorded `previous`, sorted;
  [] when nothing is recorded or it is not a config's JSON."""
  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import checkpoints  # Lazy, as in `_refusal`.
  # pylint: enable=g-import-not-at-top
  try:
    recorded = json.loads(previous) if previous is not None else None
  except ValueError:
    return []
  if not isinstance(recorded, dict):
    return []
  old, new = ({k: v for k, v in _flatten(c).items()
               if k.split('.')[0] in _TRAINING_SECTIONS}
              for c in (recorded, json.loads(text)))
  shown = lambda c, field: json.dumps(c[field]) if field in c else '(unset)'
  # The fields that differ: the fingerprints' comparison, on flat dicts.
  return [f'{field}: {shown(old, field)} -> {shown(new, field)}'
          for field in checkpoints.fingerprint_differences(old, new)]


def _refusal(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Why the checkpoints in `workdir` refuse `config`; None if they accept it.

  The newest readable fingerprint of each stage's checkpoints (VQ-VAE,
  priors, classifier) is compared with `config`'s, as the stages will
  compare them; a prior's without the provenance of its codes, which the
  prior stage checks against workdir/codes. Reads small JSON files only.
  The stages raise the errors themselves when they run.

  A workdir that holds an exported pipeline and no checkpoint (one
  downloaded) is not written to: the file holds its config, checked when
  sampling from it, and `Pipeline.load(workdir)` needs checkpoints anyway.
  """
  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import builders
  from vqvae2_jax import checkpoints
  # pylint: enable=g-import-not-at-top
  wd = workdir_lib.Workdir(workdir)
  provenance = ('codes.vqvae_step', 'codes.vqvae_digest')
  expected = {
      wd.vqvae: builders.vqvae_fingerprint(config),
      wd.classifier: builders.classifier_fingerprint(config),
  }
  for level in range(builders.num_levels(config)):
    fingerprint = builders.prior_fingerprint(config, level,
                                             {'step': 0, 'digest': ''})
    expected[wd.prior(level)] = {
        k: v for k, v in fingerprint.items() if k not in provenance}
  trained = False
  for stage_dir, fingerprint in expected.items():
    directory = workdir_lib.checkpoint_dir(stage_dir)
    if not checkpoints.directory_exists(directory):
      continue
    try:
      with checkpoints.create_manager(directory, read_only=True) as manager:
        newest = checkpoints.newest_fingerprint(manager)
      if newest is None:
        continue
      trained = True
      saved = newest[1]
      if saved is not None and 'codes.vqvae_step' in saved:
        saved = {k: v for k, v in saved.items() if k not in provenance}
      checkpoints.check_fingerprint(saved, fingerprint, directory)
    except ValueError as e:  # errors.NoIntactCheckpointError included.
      return str(e)
  if not trained and wd.exported_files():
    return 'the workdir holds an exported pipeline and no checkpoint'
  return None


_TITLES = {
    'data': 'data: prepare and preview the dataset',
    'vqvae': 'vqvae: stage 1, the hierarchical VQ-VAE',
    'codes': 'codes: every level\'s codes of the train and held-out splits',
    'prior': 'prior: stage 2, a PixelCNN prior per level',
    'sample': 'sample: stage 3, codes sampled top-down and decoded',
    'classifier': 'classifier: the domain classifier (rejection scorer, CAS)',
    'eval': 'eval: the evaluation report',
    'export': 'export: every stage in one file',
}


def _figure(mode: str, result: Any, workdir: str) -> str:
  """The key figures and image files of a finished stage, for the summary."""
  if not isinstance(result, dict):
    return ''
  figure, where = '', ''
  if mode == 'vqvae' and 'eval/psnr' in result:
    figure = f'PSNR {result["eval/psnr"]:.2f} dB' + (
        f' (original area {result["eval/psnr_area"]:.2f})'
        if 'eval/psnr_area' in result else '')
    where = _shown(workdir_lib.Workdir(workdir).vqvae_images, workdir)
  elif mode == 'prior':
    bits = [f'{v["eval/bits_per_code"]:.3f}' for v in result.values()
            if isinstance(v, dict) and 'eval/bits_per_code' in v]
    figure = f'held-out bits/code {" / ".join(bits)}' if bits else ''
  elif mode == 'classifier' and 'eval/accuracy' in result:
    figure = f'test accuracy {100 * result["eval/accuracy"]:.2f}%'
  elif mode == 'sample' and result.get('dir'):
    figure = f'{result.get("num_samples")} samples'
    where = os.path.join(result['dir'], 'samples.png')
  elif mode == 'eval' and isinstance(result.get('samples'), dict):
    s = result['samples']
    figure = ', '.join(f'{label} {s[k]:.3g}' for k, label in (
        ('fid', 'FID'), ('inception_score', 'IS'), ('precision', 'precision'),
        ('recall', 'recall')) if isinstance(s.get(k), (int, float)))
    where = _shown(workdir_lib.Workdir(workdir).report_md, workdir)
  elif mode == 'export' and result.get('path'):
    where = result['path']
  return '; '.join(x for x in (figure, where) if x)


def _shown(path: str, workdir: str) -> str:
  """`path`, inside `workdir`, under the workdir's name as the user gave it."""
  return os.path.join(workdir,
                      os.path.relpath(path, workdir_lib.Workdir(workdir).root))


def summary_lines(results: dict, seconds: dict, workdir: str) -> list[str]:
  """The table that ends --mode=all: stage, minutes, key figure."""
  lines = [f'Done in {sum(seconds.values()) / 60:.1f} min; workdir {workdir}:']
  for m, result in results.items():
    lines.append(f'  {m:<11} {seconds[m] / 60:5.1f} min  '
                 f'{_figure(m, result, workdir)}'.rstrip())
  return lines

"""The one training skeleton: `run_training` and its loop.

`run_training` is the driver of every stage: restore-or-init, the loop
(`train_loop`: steps, logs, evaluations, checkpoints, the non-finite check,
the progress line), metrics.json and closing. A stage supplies a `Stage`:
its jitted programs (init, shardings, step), its evaluation, its
fingerprint, directory, iterator and `Cadence`. Nothing here knows which
model it trains.

Only the skeleton lives here; the pieces the trainers share have their own
modules: the optimizer and its schedule (`optimizer.py`), the train state
and its programs over a mesh (`train_state.py`), a step's metrics and the
non-finite check (`step_metrics.py`); outside train/, orbax and damaged
or full-disk checkpoints (`checkpoints.py`), the sharding rule
(`parallel.py`), the metric writer and the progress line (`console.py`).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import dataclasses
import os
import time
from typing import Any, Optional, TYPE_CHECKING

from absl import logging
import jax
import ml_collections
import numpy as np

from vqvae2_jax import checkpoints
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import image_folder
from vqvae2_jax.train import step_metrics
from vqvae2_jax.train import train_state

if TYPE_CHECKING:
  # For annotations only: clu needs TensorFlow, so the functions that write
  # metrics import it, and the steps import without it (accelerator images).
  from clu import metric_writers


@dataclasses.dataclass
class LoopResult:
  """What `train_loop` leaves behind.

  Attributes:
    state: the state after the last step.
    eval_metrics: the last evaluation's metrics; None when no step ran (the
      run had already finished).
    train_summary: the last log interval's training metrics ({} if none).
    steps: optimizer steps this call took.
    train_seconds: wall time of those steps, evaluations excluded
      (checkpoints are asynchronous and stay in).
    eval_seconds: wall time of the evaluations during the loop.
  """
  state: Any
  eval_metrics: Optional[dict[str, Any]]
  train_summary: dict[str, float]
  steps: int
  train_seconds: float
  eval_seconds: float

  @property
  def steps_per_sec(self) -> float:
    return self.steps / self.train_seconds if self.steps else float('nan')


def train_loop(*, state: Any, train_step: Callable[[Any, Any], tuple[Any, Any]],
               train_iter: Iterator[Any], start_step: int, num_steps: int,
               log_every: int, eval_every: int, checkpoint_every: int,
               run_eval: Callable[[int, Any, bool], dict[str, Any]],
               manager: Any, fingerprint: Mapping[str, Any],
               writer: 'metric_writers.MetricWriter',
               pending: step_metrics.StepMetrics, nan_fix: str,
               progress_path: Optional[str] = None,
               name: str = 'train') -> LoopResult:
  """The training loop of every stage: steps, logs, evaluations, checkpoints.

  Steps `start_step + 1 .. num_steps`; logs the training metrics and the
  interval's steps/s (to `writer`) and updates the console's progress line
  (`console.Progress`: steps/s, ETA) every `log_every` steps, calls `run_eval(step, state, is_last)` every
  `eval_every` steps and saves the state with `fingerprint` through the orbax
  `manager` every `checkpoint_every` steps, and all three at the last step.
  Before anything reads or saves the state, the metrics held since the last
  check must be finite: a NaN stops the run with an error naming its step,
  and the newest checkpoint on disk is from before it.

  Args:
    state, train_step, train_iter: the stage's state, its jitted step
      `(state, batch) -> (state, metrics)` and the batches from `start_step`.
    start_step, num_steps: the restored step and the last step.
    log_every, eval_every, checkpoint_every: cadences in steps.
    run_eval: `(step, state, is_last) -> metrics`; writes its own summaries.
    manager, fingerprint: the stage's orbax CheckpointManager and the config
      fingerprint saved with each checkpoint.
    writer, pending: the metric writer and the held per-step metrics.
    nan_fix: what the non-finite error suggests (e.g. which learning rate to
      lower).
    progress_path: where the training figures so far (last train summary,
      steps/s, evaluation seconds) are written with every checkpoint, for a
      rerun after a kill before metrics.json; None writes nothing.
    name: the stage, for the console's progress line.

  Raises:
    errors.Preempted: a preemption notice (SIGTERM) came; the state of the
      step every process agreed on (`parallel.preemption_watch`) was saved
      first, and a rerun resumes from it.
  """
  line = console.Progress(name, start_step, num_steps)
  eval_metrics, train_summary, eval_seconds = None, {}, 0.0
  loop_start = time.time()
  with parallel.preemption_watch() as preempted:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step(state, next(train_iter))
      pending.append(step, metrics)
      is_last = step == num_steps
      # Every process asks at every step, so all stop at the same one. The
      # count starts at 1 in every run: a notice that came before the first
      # step (during a restore) then stops after it, not never.
      stop = preempted(step - start_step) and not is_last
      do_log = step % log_every == 0 or is_last
      do_eval = step % eval_every == 0 or is_last
      do_save = step % checkpoint_every == 0 or is_last or stop
      if do_log or do_eval or do_save:
        last = manager.latest_step()
        pending.check_finite(
            f'Fix: {nan_fix}, then run again: it resumes from the newest '
            f'checkpoint (step {last}) in {manager.directory}, which is '
            'intact.' if last is not None else
            f'Fix: {nan_fix}, then run again (no checkpoint had been '
            'written yet).')
      if do_log:
        train_summary = pending.pop_summary()
        steps_per_sec = line.update(step, {k: train_summary[k]
                                           for k in _PROGRESS_KEYS
                                           if k in train_summary})
        writer.write_scalars(
            step, {**step_metrics.scalars(train_summary, 'train'),
                   'steps_per_sec': steps_per_sec})
      if do_eval:
        eval_start = time.time()
        eval_metrics = run_eval(step, state, is_last)
        eval_seconds += time.time() - eval_start
      if do_save:
        checkpoints.save(manager, step, state, fingerprint)
        if progress_path is not None:
          done = step - start_step
          seconds = time.time() - loop_start - eval_seconds
          files.write_json_once(progress_path, {
              'step': step, 'steps_per_sec': done / seconds if seconds > 0
              else None, 'eval_time_s': eval_seconds,
              **step_metrics.scalars(train_summary, 'train')})
      if stop:
        line.close()
        manager.wait_until_finished()  # The checkpoint is on disk first.
        raise errors.Preempted(
            f'{name}: stopped by a preemption notice (SIGTERM) at step '
            f'{step} of {num_steps}; checkpoint step {step} is saved in '
            f'{manager.directory}. Run the same command again to resume '
            'from it.', step=step)
  return LoopResult(
      state=state, eval_metrics=eval_metrics, train_summary=train_summary,
      steps=max(num_steps - start_step, 0),
      train_seconds=time.time() - loop_start - eval_seconds,
      eval_seconds=eval_seconds)


# Training figures on the console's progress line, when a stage has them.
_PROGRESS_KEYS = ('loss', 'psnr', 'bits_per_code', 'accuracy')
# Evaluation figures of a stage's result line, when it has them.
_RESULT_KEYS = ('eval/psnr_area', 'eval/psnr', 'eval/used_fraction_level0',
                'eval/used_fraction_level1', 'eval/bits_per_code',
                'eval/accuracy', 'eval/top5_accuracy')


def result_line(name: str, final: Mapping[str, Any]) -> str:
  """One line of a finished stage's key figures."""
  figures = ', '.join(f'{k[len("eval/"):]} {final[k]:.4g}'
                      for k in _RESULT_KEYS if k in final)
  timing = ''
  if final.get('wall_time_s') is not None:
    timing = f' in {final["wall_time_s"]:.0f} s'
    if final.get('steps_per_sec'):
      timing += f' ({final["steps_per_sec"]:.1f} steps/s)'
  return f'{name}: step {final.get("step")}{timing}; {figures or "done"}'


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How long a stage trains and how often it logs, evaluates and saves.

  Attributes:
    num_steps: the last optimizer step.
    log_every, eval_every, checkpoint_every: intervals in steps; the last
      step does all three.
    keep_checkpoints: newest checkpoints kept on disk; None keeps all.
  """
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int | None = 2

  @classmethod
  def from_config(cls, section: ml_collections.ConfigDict) -> 'Cadence':
    """From a config section's num_train_steps, log_every, eval_every,
    checkpoint_every and keep_checkpoints (e.g. config.vqvae_train)."""
    return cls(num_steps=int(section.num_train_steps),
               log_every=int(section.log_every),
               eval_every=int(section.eval_every),
               checkpoint_every=int(section.checkpoint_every),
               keep_checkpoints=section.keep_checkpoints)


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a stage supplies to `run_training`.

  Attributes:
    name: for the log (e.g. 'VQ-VAE', 'Prior level 1').
    directory: the stage's directory (e.g. workdir/vqvae): checkpoints/,
      TensorBoard event files and metrics.json go here.
    fingerprint: the config values a checkpoint must agree on (saved with
      every checkpoint, checked on restore).
    programs: the jitted init, state shardings and train step.
    init_rng: the key of the initial state (used only without checkpoint).
    cadence: the run's length and intervals.
    train_iterator: (start_step) -> the batches of steps start_step + 1, ...
    evaluate: (step, state, is_last) -> flat scalar metrics named
      '<split>/<name>' (e.g. 'eval/mse'), and image grids (uint8 [h, w, c]
      numpy arrays, e.g. 'images/reconstructions') for TensorBoard; may
      write its own files.
    nan_fix: what the non-finite error suggests (e.g. which rate to lower).
    sum_prefixes: training metrics summed, not averaged, over a log interval.
    final_metrics: (final metrics) -> entries to add to them (e.g. sizes and
      baselines); None adds nothing.
    batch_size: the global batch, for the console's header line.
  """
  name: str
  directory: str
  fingerprint: Mapping[str, Any]
  programs: train_state.TrainPrograms
  init_rng: jax.Array
  cadence: Cadence
  train_iterator: Callable[[int], Iterator[Any]]
  evaluate: Callable[[int, Any, bool], dict[str, float]]
  nan_fix: str
  sum_prefixes: Sequence[str] = ()
  final_metrics: Optional[Callable[[dict[str, Any]], Mapping[str, Any]]] = None
  batch_size: Optional[int] = None


def run_training(stage: Stage) -> dict[str, Any]:
  """Trains a stage, resuming from its newest checkpoint; writes metrics.json.

  Callers check the checkpoint directory against the fingerprint
  (`checkpoints.check_directory`) before they build `stage.programs`, so
  that a wrong --workdir fails before anything compiles.

  Args:
    stage: what the stage supplies (see `Stage`).

  Returns:
    The final metrics (also in <stage.directory>/metrics.json): the last
    evaluation's, 'train/...' of the last log interval, 'step',
    'wall_time_s' (this call), 'steps_per_sec' (training steps per second of
    wall time, evaluations excluded, compilation included) and
    'eval_time_s', plus `stage.final_metrics`.

    A finished stage (its last checkpoint and a complete metrics.json on
    disk) is only read: nothing is evaluated, opened for writing or written,
    so a finished workdir can be shared read-only. A stage trained past
    `cadence.num_steps` (a later step on disk) trains nothing: one warning
    line says so, and its newest step stands (read, or evaluated when its
    metrics.json is missing). A stage whose last
    checkpoint was saved but whose metrics.json was not (a kill in between)
    is evaluated again, and its training figures come from progress.json,
    written with every checkpoint.

  Raises:
    errors.WorkdirError: the stage directory cannot be written, or the disk
      filled up (the message names the newest intact checkpoint, which a
      rerun resumes from).
    step_metrics.NonFiniteError: a training metric was NaN or infinite.
  """
  start_time = time.time()
  cadence = stage.cadence
  metrics_path = workdir_lib.metrics_json(stage.directory)
  progress_path = workdir_lib.progress_json(stage.directory)
  finished = _finished_metrics(stage, metrics_path)
  if finished is not None:
    if finished['step'] > cadence.num_steps:
      _warn_past_the_end(stage, finished['step'])
    else:
      console.say('%s: finished at step %d earlier (nothing to do); metrics '
                  'in %s', stage.name, cadence.num_steps, metrics_path)
    return finished
  files.ensure_writable(stage.directory, 'checkpoints and metrics')
  # The full log of the run (every library, INFO and up), beside metrics.json.
  log_file = contextlib.ExitStack()
  if jax.process_index() == 0:  # One log file, however many processes.
    log_file.enter_context(console.log_file(
        workdir_lib.log_txt(stage.directory)))
  undecodable_before = image_folder.undecodable_files()
  manager = checkpoints.create_manager(
      workdir_lib.checkpoint_dir(stage.directory),
      max_to_keep=cadence.keep_checkpoints)
  writer = None
  try:
    writer = console.create_writer(os.fspath(stage.directory))
    # Resume order: the state (params, other variables, optimizer, RNG) from
    # the newest intact checkpoint, then the data iterator positioned at its
    # step. Damaged newer steps are moved aside (this run saves their step
    # numbers again). The initial state is built only when there is no
    # checkpoint.
    state = checkpoints.restore_latest(
        manager, train_state.restore_target(stage.programs),
        stage.fingerprint, set_aside=True)
    # After the restore: pruning first could delete the intact steps that a
    # damaged newest one needs to fall back on.
    checkpoints.prune(manager, cadence.keep_checkpoints)
    if state is None:
      state = stage.programs.init(stage.init_rng)
    start_step = int(state.step)
    if isinstance(writer, console.JsonLinesWriter):
      writer.drop_after(start_step)
    if start_step > cadence.num_steps:
      _warn_past_the_end(stage, start_step)
    console.say(
        '%s: %d steps%s%s on %d %s device(s); writes %s', stage.name,
        cadence.num_steps,
        f' of batch {stage.batch_size}' if stage.batch_size else '',
        f' (resuming at step {start_step})' if start_step else '',
        jax.device_count(), jax.default_backend(), stage.directory)
    if start_step == 0:
      writer.write_hparams({k: str(v) for k, v in stage.fingerprint.items()})

    def run_eval(step, state, is_last):
      metrics = dict(stage.evaluate(step, state, is_last))
      # Image grids (uint8 [h, w, c]) go to TensorBoard only.
      images = {k: metrics.pop(k) for k in list(metrics)
                if isinstance(metrics[k], np.ndarray)}
      writer.write_scalars(step, metrics)
      if images:
        writer.write_images(step, {k: v[None] for k, v in images.items()})
      return metrics

    loop = train_loop(
        state=state, train_step=stage.programs.train_step,
        train_iter=stage.train_iterator(start_step), start_step=start_step,
        num_steps=cadence.num_steps, log_every=cadence.log_every,
        eval_every=cadence.eval_every,
        checkpoint_every=cadence.checkpoint_every, run_eval=run_eval,
        manager=manager, fingerprint=stage.fingerprint, writer=writer,
        pending=step_metrics.StepMetrics(sum_prefixes=stage.sum_prefixes),
        nan_fix=stage.nan_fix, progress_path=progress_path, name=stage.name)
    eval_metrics = loop.eval_metrics
    if eval_metrics is None:  # Nothing left to train: evaluate what we have.
      eval_metrics = run_eval(start_step, loop.state, True)
      # The training figures of the run that trained (saved with its last
      # checkpoint); metrics.json is missing or incomplete here.
      final = (files.read_json(metrics_path) or
               files.read_json(progress_path) or {})
      final.pop('step', None)
    else:
      final = {'steps_per_sec': loop.steps_per_sec,
               'eval_time_s': loop.eval_seconds}
    final.update({'step': int(loop.state.step),
                  'wall_time_s': time.time() - start_time,
                  **eval_metrics,
                  **step_metrics.scalars(loop.train_summary, 'train')})
    if stage.final_metrics is not None:
      final.update(stage.final_metrics(final))
    undecodable = image_folder.undecodable_files() - undecodable_before
    if undecodable:  # Each was named when first seen; here the total.
      final['data/undecodable_files'] = len(undecodable)
      logging.warning('%s: %d image file(s) could not be decoded and were '
                      'replaced by the next file of the split.', stage.name,
                      len(undecodable))
    # metrics.json marks the stage finished, so the last checkpoint must be
    # on disk first: a save that fails now (a full disk) fails the run.
    manager.wait_until_finished()
    files.write_json_once(metrics_path, final)
    logging.info('%s final metrics: %s', stage.name, final)
    console.say('%s', result_line(stage.name, final))
    return final
  except Exception as e:  # pylint: disable=broad-except
    # Orbax reports a full disk from its save threads as tensorstore's
    # ValueError or wrapped, not always as OSError(ENOSPC).
    if not files.is_disk_full(e):
      raise
    raise checkpoints.disk_full_error(
        stage.directory, manager, e,
        train_state.state_bytes(stage.programs)) from e
  finally:
    try:
      manager.wait_until_finished()
      manager.close()
      if writer is not None:
        writer.flush()
    except Exception as e:  # pylint: disable=broad-except
      if not files.is_disk_full(e):
        raise
      # Already reported (the save in flight when the disk filled up).
      logging.debug('An unfinished save failed: %s', e)
    finally:
      log_file.close()


def _warn_past_the_end(stage: Stage, step: int) -> None:
  """One warning line: the stage holds `step`, past the run's last step."""
  logging.warning(
      '%s: %s already holds step %d, past num_train_steps=%d: nothing is '
      'trained and step %d is kept (to train %d steps, use a new --workdir).',
      stage.name, stage.directory, step, stage.cadence.num_steps, step,
      stage.cadence.num_steps)


def _finished_metrics(stage: Stage, metrics_path: str
                      ) -> Optional[dict[str, Any]]:
  """metrics.json of a stage finished at its last step, else None.

  Reads only: the newest checkpoint step comes from a read-only manager
  (when the directory exists), metrics.json must be valid, at the last step
  (or past it: a workdir trained longer than this run asks), at the newest
  checkpoint's step, and hold the training figures. A last checkpoint that
  is visibly damaged (`checkpoints.step_looks_intact`) makes the stage
  unfinished: the run resumes from the newest intact step and trains the
  rest again.
  """
  metrics = files.read_json(metrics_path)
  step = metrics.get('step') if metrics else None
  if not isinstance(step, int) or step < stage.cadence.num_steps or not any(
      k.startswith('train/') for k in metrics) or 'steps_per_sec' not in (
          metrics):
    return None
  directory = workdir_lib.checkpoint_dir(stage.directory)
  if not checkpoints.directory_exists(directory):
    return None
  with checkpoints.create_manager(directory, read_only=True) as manager:
    last = manager.latest_step()
    if last != step or not checkpoints.step_looks_intact(manager, last):
      return None
  return metrics



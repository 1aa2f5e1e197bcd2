"""orbax checkpoints of a stage's train state, with a config fingerprint.

Each checkpoint step holds two items: 'state' (the train state pytree) and
'fingerprint' (JSON: the config fields that define the model). A restore first
compares the stored fingerprint with the current config's, so that resuming
with another architecture fails with a message naming the differing fields,
not with an opaque shape error deep inside orbax.

Saves are orbax's: asynchronous, written to a temporary directory and renamed
when complete (atomic), older steps deleted beyond `max_to_keep`.

A save that fails on a full disk is reported once, by the trainer (a
WorkdirError naming the newest intact checkpoint, `disk_full_error`); orbax's
own tracebacks of it, from each of its threads, are kept out of the output
(see `_hide_disk_full_tracebacks`). `prune` deletes steps beyond
`max_to_keep` that a kill left behind.

A damaged checkpoint (a truncated or missing file, an empty fingerprint) is
skipped: the newest checkpoint that reads back is restored, with one warning
naming the damaged ones (`restore_newest_intact`). A trainer then moves each
damaged step directory aside as `<step>.damaged-<n>`, a name orbax does not
take for a step, so that it is kept for inspection and neither blocks the
save of that step number again nor is deleted by `max_to_keep`. Loaders
(read-only) leave it where it is. When no checkpoint reads back, the run
stops with one line (`errors.NoIntactCheckpointError`) and moves nothing.

Trainers restore the whole state to resume. Later stages restore only the
subtrees they need (`restore_subtrees`, e.g. 'params' and 'extra' of a
finished VQ-VAE), so a checkpoint still loads after a training-only setting
that shapes the optimizer state (gradient clipping, Polyak averaging)
changed.
"""

from collections.abc import Callable, Mapping
import json
import logging as py_logging
import os
import re
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import parallel

PyTree = Any
_STATE = 'state'
_FINGERPRINT = 'fingerprint'
DAMAGED_INFIX = '.damaged-'  # <step>.damaged-<n>: a damaged step set aside.


class _DiskFullTracebackFilter(py_logging.Filter):
  """Drops orbax's own log records of a save that failed on a full disk.

  When the disk fills during an asynchronous save, orbax logs the failure
  with its traceback from each thread that sees it (hundreds of lines, the
  cause at the end). The trainer reports it once instead, as a WorkdirError
  naming the newest intact checkpoint (`train.common.run_training`). With
  debug logging (--verbosity=1) the records are kept.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if (record.levelno < py_logging.WARNING or logging.level_debug() or
        f'{os.sep}orbax{os.sep}' not in record.pathname):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not ((error is not None and files.is_disk_full(error)) or
                files.mentions_disk_full(record.getMessage()))


_DISK_FULL_FILTER = _DiskFullTracebackFilter()


def _closed_loop_hook(previous: Any) -> Any:
  """An unraisable-exception hook that logs closed-event-loop noise only.

  When a save fails (a full disk), orbax closes its event loop while
  tensorstore still completes the writes in flight; each completion then
  raises "Event loop is closed" where nothing can catch it, and Python
  prints its traceback (dozens of them). The save has already failed and is
  reported once; these go to the debug log. Everything else goes to
  `previous`.
  """

  def hook(unraisable: Any) -> None:
    if (unraisable.exc_type is RuntimeError and
        str(unraisable.exc_value) == 'Event loop is closed'):
      logging.debug('A write of an abandoned save finished after its event '
                    'loop closed.')
      return
    previous(unraisable)

  hook.closed_loop_hook = True
  return hook


# '<checkpoint dir>/<step>/' of every step found damaged in this process.
_DAMAGED_STEPS: set[str] = set()
# The step `restore_newest_intact` is reading: asyncio may report its
# abandoned reads before their failure reaches the caller.
_READING: set[str] = set()


class _DamagedReadFilter(py_logging.Filter):
  """Drops asyncio's reports of reads of a damaged step that nobody awaits.

  When one array of a damaged step fails to read, orbax abandons the reads
  of the others; asyncio logs each of their failures when it collects them
  ("Future exception was never retrieved", tensorstore's whole spec
  included). The step is reported once (`restore_newest_intact`). With
  debug logging (--verbosity=1) the records are kept.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    steps = _DAMAGED_STEPS | _READING
    if not steps or logging.level_debug():
      return True
    error = record.exc_info[1] if record.exc_info else None
    text = record.getMessage() + ('' if error is None else str(error))
    return not any(step in text for step in steps)


_DAMAGED_READ_FILTER = _DamagedReadFilter()


def _hide_disk_full_tracebacks() -> None:
  """Keeps a failed save's or read's noise out of the output (not the log).

  Installs `_DISK_FULL_FILTER` on absl's logger (orbax logs through it),
  `_closed_loop_hook` as `sys.unraisablehook` and `_DAMAGED_READ_FILTER` on
  asyncio's logger, once each.
  """
  logger = logging.get_absl_logger()
  if _DISK_FULL_FILTER not in logger.filters:
    logger.addFilter(_DISK_FULL_FILTER)
  if not getattr(sys.unraisablehook, 'closed_loop_hook', False):
    sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)
  asyncio_logger = py_logging.getLogger('asyncio')
  if _DAMAGED_READ_FILTER not in asyncio_logger.filters:
    asyncio_logger.addFilter(_DAMAGED_READ_FILTER)


def directory_exists(directory: str | os.PathLike[str]) -> bool:
  """Whether `directory` exists, as process 0 sees it, on every process.

  Call it (on every process) wherever the answer decides whether to open a
  manager: each manager's creation is an orbax barrier on every process,
  and a process that looks after another one created the directory would
  open one that its peers skip, and wait at a barrier they never reach.
  """
  return parallel.primary_view(epath.Path(directory).exists())


def create_manager(directory: str, *, max_to_keep: int | None = 2,
                   async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager for one stage's directory (e.g. workdir/vqvae/checkpoints).

  Args:
    directory: where step directories are written; created if missing.
    max_to_keep: newest checkpoints kept; None keeps all.
    async_save: save in a background thread (the loop goes on meanwhile).
    read_only: only restore (e.g. a later stage loading this one's result).

  Returns:
    The manager; `close()` it (or use `with`) when done so pending saves finish.
  """
  _hide_disk_full_tracebacks()
  directory = epath.Path(directory).absolute()
  # Replica-parallel saving splits every replicated array into one slice per
  # replica, and slicing compiles one small XLA program per slice shape: the
  # first save of a small model on 8 CPU devices took ~15 s, the rest
  # < 1 s. Our states are small; one replica writing each array is as fast.
  handlers = {
      _STATE: ocp.PyTreeCheckpointHandler(
          type_handler_registry=_type_handlers()),
      _FINGERPRINT: ocp.JsonCheckpointHandler(),
  }
  with console.routine_warnings_hidden():  # orbax's notes on read_only.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers=handlers)


def _type_handlers() -> Any:
  """orbax's default leaf types, jax.Array without replica-parallel saves."""
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
      (str, th.StringHandler()))


def _normalise(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
  # Through JSON, so that tuples and lists (and int/float keys) compare equal
  # to what was stored.
  return json.loads(json.dumps(dict(fingerprint), sort_keys=True))


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds a checkpoint of any step (on every process
  alike: `directory_exists`)."""
  if not directory_exists(directory):
    return False
  manager = create_manager(directory, read_only=True)
  try:
    return manager.latest_step() is not None
  finally:
    manager.close()


def save_now(directory: str, step: int, state: PyTree,
             fingerprint: Mapping[str, Any]) -> None:
  """Saves `state` and `fingerprint` as checkpoint `step` of `directory`
  and returns once it is on disk."""
  manager = create_manager(directory, async_save=False)
  try:
    save(manager, step, state, fingerprint)
    manager.wait_until_finished()
  finally:
    manager.close()


def save(manager: ocp.CheckpointManager, step: int, state: PyTree,
         fingerprint: Mapping[str, Any]) -> None:
  """Saves `state` and `fingerprint` as checkpoint `step` (asynchronously)."""
  manager.save(int(step), args=ocp.args.Composite(**{
      _STATE: ocp.args.PyTreeSave(state),
      _FINGERPRINT: ocp.args.JsonSave(_normalise(fingerprint)),
  }), force=True)
  logging.info('Saving checkpoint step %d to %s', step, manager.directory)


def _restore_args(target: PyTree) -> PyTree:
  """Restores each array with the sharding, shape and dtype of `target`."""
  return jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(
          sharding=getattr(x, 'sharding', None), global_shape=x.shape,
          dtype=x.dtype), target)


def check_fingerprint(saved: Mapping[str, Any] | None,
                      current: Mapping[str, Any], directory: str) -> None:
  """Raises CheckpointMismatchError if the stored and current ones differ.

  Args:
    saved: the fingerprint stored with the checkpoint (None if absent).
    current: the fingerprint of the config in use.
    directory: the checkpoint directory, for the message.
  """
  if saved is None:
    raise errors.CheckpointMismatchError(
        f'The checkpoints in {directory} carry no config fingerprint, so they '
        'cannot be checked against this config. Fix: use another --workdir, '
        'or delete that directory to start again.')
  diffs = fingerprint_differences(saved, current).values()
  if not diffs:
    return
  raise errors.CheckpointMismatchError(
      f'The checkpoints in {directory} were written for a different model '
      f'config; differing fields: {"; ".join(diffs)}. Fix: pass another '
      '--workdir for this config, or run with the config that wrote them '
      '(e.g. override the fields above with --config.<field>=<checkpoint '
      'value>).')


def fingerprint_differences(saved: Mapping[str, Any],
                            current: Mapping[str, Any],
                            saved_name: str = 'checkpoint',
                            current_name: str = 'config') -> dict[str, str]:
  """Each field in which two fingerprints differ, sorted, with both values
  for a message: {key: '<key>: <saved_name> <value>, <current_name> <value>'}
  ('(absent)' for a field one lacks)."""
  saved, current = _normalise(saved), _normalise(current)
  missing = object()
  diffs = {}
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      old = '(absent)' if old is missing else repr(old)
      new = '(absent)' if new is missing else repr(new)
      diffs[key] = f'{key}: {saved_name} {old}, {current_name} {new}'
  return diffs


def restore_fingerprint(manager: ocp.CheckpointManager,
                        step: int) -> dict[str, Any] | None:
  """The fingerprint stored with checkpoint `step`, or None if it has none."""
  step_dir = epath.Path(manager.directory) / str(step) / _FINGERPRINT
  if not step_dir.exists():
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{
      _FINGERPRINT: ocp.args.JsonRestore()}))
  return dict(restored[_FINGERPRINT])


def newest_fingerprint(manager: ocp.CheckpointManager
                       ) -> tuple[int, dict[str, Any] | None] | None:
  """(step, its fingerprint) of the newest step whose fingerprint reads back.

  A step whose fingerprint cannot be read (damaged) is passed over for the
  next older one. Only fingerprints are read, so the state of the step
  returned may still be damaged (`restore_newest_intact` reads it all).

  Returns:
    None when there is no checkpoint; the fingerprint is None for a step
    saved without one.

  Raises:
    errors.NoIntactCheckpointError: there are checkpoints, and no
      fingerprint among them reads back.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, restore_fingerprint(manager, step)
    except Exception as e:  # pylint: disable=broad-except
      _reraise_if_not_damage(e)
      damaged.append((step, e))
  if damaged:
    raise _no_intact(str(manager.directory), damaged) from damaged[0][1]
  return None


def latest_checked_step(manager: ocp.CheckpointManager,
                        fingerprint: Mapping[str, Any]) -> int | None:
  """The newest step with a readable fingerprint, checked; None if none.

  See `newest_fingerprint`.

  Raises:
    ValueError: the checkpoint was written for a different model config.
    errors.NoIntactCheckpointError: no fingerprint reads back.
  """
  newest = newest_fingerprint(manager)
  if newest is None:
    return None
  check_fingerprint(newest[1], fingerprint, str(manager.directory))
  return newest[0]


def _reraise_if_not_damage(error: Exception) -> None:
  # Running out of memory says nothing about the files.
  if isinstance(error, MemoryError):
    raise error


def _reason(error: BaseException, directory: str, limit: int = 240) -> str:
  """What was wrong with a damaged step, in one line.

  tensorstore nests its causes ('CODE: Error opening ...: Error reading ...
  of local file "<path>": <what>' and the whole spec after them); its
  innermost error reading a file names the file and what was wrong.
  Paths are shown relative to `directory`.
  """
  lines = re.split(r' \[tensorstore_spec', str(error))[0].strip().splitlines()
  message = lines[0] if lines else '(no message)'
  code, _, rest = message.partition(': ')
  if code.isupper() and 'local file "' in rest:
    innermost = max(0, rest.rfind('Error ', 0, rest.rfind('local file "')))
    message = f'{code}: {rest[innermost:]}'
  message = message.replace(directory.rstrip(os.sep) + os.sep, '')
  line = f'{type(error).__name__}: {message}'
  return line if len(line) <= limit else line[:limit - 3] + '...'


def _no_intact(directory: str, damaged: list[tuple[int, Exception]]
               ) -> errors.NoIntactCheckpointError:
  steps = ', '.join(str(step) for step, _ in damaged)
  return errors.NoIntactCheckpointError(
      f'No checkpoint in {directory} reads back: step(s) {steps} are '
      f'damaged (step {damaged[0][0]}: {_reason(damaged[0][1], directory)}). '
      'Fix: restore them from a backup, or move that directory aside to '
      'train this stage again from the start.')


def restore_newest_intact(manager: ocp.CheckpointManager,
                          fingerprint: Mapping[str, Any],
                          restore: Callable[[int], Any], *,
                          set_aside: bool = False) -> tuple[Any, int] | None:
  """`restore(step)` of the newest checkpoint that reads back.

  Steps are tried newest first. A step is damaged when its fingerprint or
  `restore` fails to read (a truncated or missing file, an empty one): it is
  passed over for the next older step. A readable fingerprint of another
  config stops the search (the workdir belongs to another config). When an
  older step was restored, one warning names the damaged ones.

  Every process makes the same choice: a step counts as damaged when its
  reading failed on any process.

  Args:
    manager: from `create_manager`.
    fingerprint: the current config's; must equal the stored one.
    restore: step -> what to restore of it (e.g. `restore_step`).
    set_aside: move the damaged steps newer than the restored one to
      `<step>.damaged-<n>` (process 0; a trainer, which will save those step
      numbers again). Readers leave them in place.

  Returns:
    (restore(step), step), or None when there is no checkpoint.

  Raises:
    ValueError: the checkpoint was written for a different model config.
    errors.NoIntactCheckpointError: no checkpoint reads back (each is left
      where it is).
  """
  directory = str(manager.directory)
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = os.path.join(directory, str(step), '')
    _READING.add(step_dir)
    try:
      error, result = None, None
      try:
        saved = restore_fingerprint(manager, step)
      except Exception as e:  # pylint: disable=broad-except
        _reraise_if_not_damage(e)
        error = e
      if parallel.all_agree(error is None):
        check_fingerprint(saved, fingerprint, directory)
        try:
          _check_state_metadata(directory, step)
          result = restore(step)
        except Exception as e:  # pylint: disable=broad-except
          _reraise_if_not_damage(e)
          error = e
        if parallel.all_agree(error is None):
          if damaged:
            _set_aside_damaged(manager, damaged, step, set_aside)
          return result, step
      damaged.append((step, error or ValueError('damaged on another process')))
      _DAMAGED_STEPS.add(step_dir)
    finally:
      _READING.discard(step_dir)
  if damaged:
    raise _no_intact(directory, damaged) from damaged[0][1]
  return None


def step_looks_intact(manager: ocp.CheckpointManager, step: int) -> bool:
  """Cheap checks of step `step`: its fingerprint reads, its tree's metadata
  is there. Its arrays are not read (a truncated data file shows only when
  they are restored, see `restore_newest_intact`)."""
  try:
    restore_fingerprint(manager, step)
    _check_state_metadata(str(manager.directory), step)
  except Exception as e:  # pylint: disable=broad-except
    _reraise_if_not_damage(e)
    return False
  return True


def _check_state_metadata(directory: str, step: int) -> None:
  """Raises FileNotFoundError when step `step` lacks its tree's metadata.

  Without it orbax still reads the arrays that a partial restore names (the
  loaders' restores work, the trainer's fails on the tree's types); a step
  is the same step to both.
  """
  path = epath.Path(directory) / str(step) / _STATE / '_METADATA'
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing')


def _set_aside_damaged(manager: ocp.CheckpointManager,
                       damaged: list[tuple[int, Exception]], restored: int,
                       set_aside: bool) -> None:
  """Warns once about `damaged` steps; moves them aside if `set_aside`."""
  directory = epath.Path(manager.directory)
  steps = ', '.join(str(step) for step, _ in damaged)
  reason = _reason(damaged[0][1], str(directory))
  # Process 0 speaks for all (the others' consoles show their warnings).
  warn = logging.warning if jax.process_index() == 0 else logging.info
  if not set_aside:
    warn(
        'Checkpoint step(s) %s in %s are damaged (step %d: %s); using step %d '
        'instead.', steps, directory, damaged[0][0], reason, restored)
    return
  # The same names on every process: chosen from the same listing, before
  # process 0 renames anything.
  moved = {step: _damaged_name(directory, step) for step, _ in damaged}
  _sync('checkpoints_name_damaged')
  if jax.process_index() == 0:
    for step, name in moved.items():
      (directory / str(step)).rename(directory / name)
  _sync('checkpoints_set_aside_damaged')
  manager.reload()
  warn(
      'Checkpoint step(s) %s in %s are damaged (step %d: %s); resuming from '
      'step %d instead. Kept for inspection as %s.', steps, directory,
      damaged[0][0], reason, restored, ', '.join(moved.values()))


def _sync(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _damaged_name(directory: epath.Path, step: int) -> str:
  """`<step>.damaged-<n>` with the smallest n not yet taken in `directory`."""
  n = 1
  while (directory / f'{step}{DAMAGED_INFIX}{n}').exists():
    n += 1
  return f'{step}{DAMAGED_INFIX}{n}'


def saved_structure(manager: ocp.CheckpointManager, step: int) -> PyTree:
  """The state tree of checkpoint `step` with metadata leaves (no arrays).

  A state's dataclass fields are dict keys here (e.g. {'step', 'params',
  'opt_state', 'extra', 'rng', ...}); a field saved as None stays None.
  """
  metadata = manager.item_metadata(step)[_STATE]
  return getattr(metadata, 'tree', metadata)


def restore_subtrees(manager: ocp.CheckpointManager, step: int,
                     target: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """Restores only the subtrees of checkpoint `step` that `target` names.

  Args:
    manager: from `create_manager`.
    step: an existing checkpoint step.
    target: {field: abstract subtree}, e.g. {'params': ...} with
      `jax.ShapeDtypeStruct` leaves (with shardings); every other field of
      the saved state (the optimizer state, ...) is neither read nor checked.

  Returns:
    A dict like `target` holding the arrays.
  """
  target = dict(target)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      _STATE: ocp.args.PyTreeRestore(
          target, restore_args=_restore_args(target), partial_restore=True)}))
  logging.info('Restored %s of checkpoint step %d from %s', sorted(target),
               step, manager.directory)
  return dict(restored[_STATE])


def restore_latest(manager: ocp.CheckpointManager, target: PyTree,
                   fingerprint: Mapping[str, Any], *,
                   set_aside: bool = False) -> PyTree | None:
  """Restores the newest intact checkpoint into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: the state pytree or its abstract form (`jax.ShapeDtypeStruct`s
      with shardings, see `parallel.abstract_with_shardings`); arrays
      come back with those shardings.
    fingerprint: the current config's; must equal the stored one.
    set_aside: move damaged newer steps aside (see `restore_newest_intact`).

  Returns:
    The restored state, or None when there is no checkpoint yet.

  Raises:
    ValueError: the checkpoint was written for a different model config.
    errors.NoIntactCheckpointError: no checkpoint reads back.
  """
  restored = restore_newest_intact(
      manager, fingerprint, lambda step: restore_step(manager, step, target),
      set_aside=set_aside)
  return None if restored is None else restored[0]


def restore_step(manager: ocp.CheckpointManager, step: int,
                 target: PyTree) -> PyTree:
  """Restores checkpoint `step` into the structure of `target` (no checks).

  Args:
    manager: from `create_manager`.
    step: an existing checkpoint step.
    target: as in `restore_latest`.

  Returns:
    The state, its arrays with `target`'s shardings.
  """
  restored = manager.restore(step, args=ocp.args.Composite(**{
      _STATE: ocp.args.PyTreeRestore(
          target, restore_args=_restore_args(target))}))
  logging.info('Restored checkpoint step %d from %s', step, manager.directory)
  return restored[_STATE]


def check_directory(directory: str, fingerprint: Mapping[str, Any]) -> None:
  """Checks the newest checkpoint in `directory` (if any) against `fingerprint`.

  Cheap (reads small JSON files); trainers call it before building
  anything, so a wrong --workdir fails in seconds. A step whose fingerprint
  is damaged is passed over (see `latest_checked_step`).
  """
  directory = epath.Path(directory).absolute()
  if not directory_exists(directory):
    return
  manager = create_manager(str(directory), read_only=True)
  try:
    latest_checked_step(manager, fingerprint)
  finally:
    manager.close()


def disk_full_error(directory: str, manager: ocp.CheckpointManager,
                    error: BaseException, needed: int | None = None
                    ) -> errors.WorkdirError:
  """The one message of a full disk: where, and what is still intact."""
  try:  # Saves in flight finish (or fail) first; only finished ones count.
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    manager.reload()
    steps = sorted(manager.all_steps())
  except Exception:  # pylint: disable=broad-except
    steps = []
  return files.disk_full_error(
      directory, error,
      f'the newest intact checkpoint is step {steps[-1]} and a rerun resumes '
      'from it' if steps else 'no checkpoint had been written yet, so a rerun '
      'starts from the beginning', needed=needed)


def prune(manager: ocp.CheckpointManager, keep: int | None) -> None:
  """Deletes all but the newest `keep` checkpoints.

  A kill between a save and orbax's deletion of the oldest checkpoint leaves
  one too many; a resumed run that saves nothing more would keep it.
  """
  if keep is None:
    return
  steps = sorted(manager.all_steps())
  for step in steps[:-keep] if len(steps) > keep else []:
    logging.info('Deleting checkpoint %d (keep_checkpoints=%d).', step, keep)
    manager.delete(step)

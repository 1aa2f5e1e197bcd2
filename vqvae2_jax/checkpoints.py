"""orbax checkpoints of a stage's train state, with a config fingerprint.

Each checkpoint step holds two items: 'state' (the train state pytree) and
'fingerprint' (JSON: the config fields that define the model). A restore first
compares the stored fingerprint with the current config's, so that resuming
with another architecture fails with a message naming the differing fields,
not with an opaque shape error deep inside orbax.

Saves are orbax's: asynchronous, written to a temporary directory and renamed
when complete (atomic), older steps deleted beyond `max_to_keep`.

A save that fails on a full disk is reported once, by the trainer (a
WorkdirError naming the newest intact checkpoint); orbax's own tracebacks of
it, from each of its threads, are kept out of the output (see
`_hide_disk_full_tracebacks`).

Trainers restore the whole state to resume. Later stages restore only the
subtrees they need (`restore_subtrees`, e.g. 'params' and 'extra' of a
finished VQ-VAE), so a checkpoint still loads after a training-only setting
that shapes the optimizer state (gradient clipping, Polyak averaging)
changed.
"""

from collections.abc import Mapping
import json
import logging as py_logging
import os
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vqvae2_jax import files

PyTree = Any
_STATE = 'state'
_FINGERPRINT = 'fingerprint'


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


def _hide_disk_full_tracebacks() -> None:
  """Keeps a failed save's noise out of the output (not of the debug log).

  Installs `_DISK_FULL_FILTER` on absl's logger (orbax logs through it) and
  `_closed_loop_hook` as `sys.unraisablehook`, once each.
  """
  logger = logging.get_absl_logger()
  if _DISK_FULL_FILTER not in logger.filters:
    logger.addFilter(_DISK_FULL_FILTER)
  if not getattr(sys.unraisablehook, 'closed_loop_hook', False):
    sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)


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
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  # Replica-parallel saving splits every replicated array into one slice per
  # replica, and slicing compiles one small XLA program per slice shape: the
  # first save of a small model on 8 CPU devices took ~15 s, the rest
  # < 1 s. Our states are small; one replica writing each array is as fast.
  handlers = {
      _STATE: ocp.PyTreeCheckpointHandler(
          type_handler_registry=_type_handlers()),
      _FINGERPRINT: ocp.JsonCheckpointHandler(),
  }
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
  """Raises ValueError if the stored and current fingerprints differ.

  Args:
    saved: the fingerprint stored with the checkpoint (None if absent).
    current: the fingerprint of the config in use.
    directory: the checkpoint directory, for the message.
  """
  current = _normalise(current)
  if saved is None:
    raise ValueError(
        f'The checkpoints in {directory} carry no config fingerprint, so they '
        'cannot be checked against this config. Fix: use another --workdir, '
        'or delete that directory to start again.')
  saved = _normalise(saved)
  if saved == current:
    return
  missing = object()
  diffs = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      old = '(absent)' if old is missing else repr(old)
      new = '(absent)' if new is missing else repr(new)
      diffs.append(f'{key}: checkpoint {old}, config {new}')
  raise ValueError(
      f'The checkpoints in {directory} were written for a different model '
      f'config; differing fields: {"; ".join(diffs)}. Fix: pass another '
      '--workdir for this config, or run with the config that wrote them '
      '(e.g. override the fields above with --config.<field>=<checkpoint '
      'value>).')


def restore_fingerprint(manager: ocp.CheckpointManager,
                        step: int) -> dict[str, Any] | None:
  """The fingerprint stored with checkpoint `step`, or None if it has none."""
  step_dir = epath.Path(manager.directory) / str(step) / _FINGERPRINT
  if not step_dir.exists():
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{
      _FINGERPRINT: ocp.args.JsonRestore()}))
  return dict(restored[_FINGERPRINT])


def latest_checked_step(manager: ocp.CheckpointManager,
                        fingerprint: Mapping[str, Any]) -> int | None:
  """The newest checkpoint step, its fingerprint checked; None if none.

  Raises:
    ValueError: the checkpoint was written for a different model config.
  """
  step = manager.latest_step()
  if step is not None:
    check_fingerprint(restore_fingerprint(manager, step), fingerprint,
                      str(manager.directory))
  return step


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
                   fingerprint: Mapping[str, Any]) -> PyTree | None:
  """Restores the newest checkpoint into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: the state pytree or its abstract form (`jax.ShapeDtypeStruct`s
      with shardings, see `train.common.abstract_with_shardings`); arrays
      come back with those shardings.
    fingerprint: the current config's; must equal the stored one.

  Returns:
    The restored state, or None when there is no checkpoint yet.

  Raises:
    ValueError: the checkpoint was written for a different model config.
  """
  step = latest_checked_step(manager, fingerprint)
  if step is None:
    return None
  return restore_step(manager, step, target)


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

  Cheap (reads one small JSON file); trainers call it before building
  anything, so a wrong --workdir fails in seconds.
  """
  directory = epath.Path(directory).absolute()
  if not directory.exists():
    return
  manager = create_manager(str(directory), read_only=True)
  try:
    latest_checked_step(manager, fingerprint)
  finally:
    manager.close()

"""What a run prints: a short console, and the full log in files.

By default the console (stderr) shows only what a person follows: each
stage's header, its progress line, its results and where its files are
(`say`, `Progress`), and every warning and error from any library except
known routine ones. Everything else that is logged (this project's details,
orbax's checkpointing steps, tfds, clu's metric lines) goes to the log file
of the running training stage, workdir/<stage>/log.txt (`log_file`).
`--verbosity=1` shows this project's details too, and libraries' warnings
(`project_details`): not the thousands of INFO lines of orbax, JAX and
TensorFlow, which `--verbosity=2` adds, as absl would show them.

On a terminal the progress line updates in place; in a pipe or a file it is
printed at each quarter of the run (every log interval goes to the log file).

From Python (a notebook, a script) there is no command line to set this up,
and absl's handler is not in use: `python_console` gives `stages.run` and
the `Pipeline`'s long calls the same console on stderr (the progress line
in place in a notebook too) and complete log files; `show_in_python(False)`
turns it off.
"""

import contextlib
import functools
import io
import json
import logging as py_logging
import os
import re
import sys
import time
from typing import Any, Iterator, Mapping, Optional, TYPE_CHECKING

from absl import logging

from vqvae2_jax import files
from vqvae2_jax import workdir as workdir_lib

if TYPE_CHECKING:
  # For annotations only: clu needs TensorFlow (`create_writer` imports it).
  from clu import metric_writers

_CONSOLE = 'vqvae2_console'  # Record attribute: meant for the console.
# Routine warnings of libraries, not problems: read-only checkpoint managers
# (how finished stages are read), TensorFlow's AutoGraph notes, tfds looking
# into a dataset directory while another process prepares it.
_ROUTINE = re.compile(
    r'CheckpointManagerOptions\.read_only=True|Given directory is read only'
    r'|AutoGraph could not transform|do_not_convert'
    r'|has no dataset_info\.json')
_QUARTERS = 4  # Progress lines per stage when the console is not a terminal.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def say(message: str, *args) -> None:
  """Logs `message % args` at INFO, shown on the console."""
  logging.info(message, *args, extra={_CONSOLE: True})


class _ConsoleFilter(py_logging.Filter):
  """Passes console lines and warnings or worse that are not routine."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if getattr(record, _CONSOLE, False):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    try:
      return not _ROUTINE.search(record.getMessage())
    except Exception:  # pylint: disable=broad-except
      return True


_FILTER = _ConsoleFilter()


class _ConsoleFormatter(logging.PythonFormatter):
  """Console lines as plain text; anything else in absl's format."""

  def format(self, record: py_logging.LogRecord) -> str:
    if getattr(record, _CONSOLE, False):
      return record.getMessage()
    return super().format(record)


def quiet() -> None:
  """Keeps the console to `say` lines and warnings (see the module doc).

  Call before TensorFlow loads: it also silences TF's C++ banners.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  handler = logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)
    handler.setFormatter(_ConsoleFormatter())


class _ProjectDetailsFilter(py_logging.Filter):
  """Passes this project's records at any level, other code's warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or
            getattr(record, _CONSOLE, False) or
            os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


_PROJECT_DETAILS = _ProjectDetailsFilter()


def project_details() -> None:
  """Keeps the console to this project's records and every warning.

  For --verbosity=1: the details of this project's stages (INFO and DEBUG)
  without the INFO and DEBUG records of orbax, JAX, TensorFlow and other
  libraries (tens of thousands of lines in a run). --verbosity=2 or more
  does not call it and shows them as well.
  """
  handler = logging.get_absl_handler()
  if _PROJECT_DETAILS not in handler.filters:
    handler.addFilter(_PROJECT_DETAILS)


class _RoutineFilter(py_logging.Filter):
  """Drops libraries' routine warnings (`_ROUTINE`), passes the rest."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR:
      return True
    try:
      return not _ROUTINE.search(record.getMessage())
    except Exception:  # pylint: disable=broad-except
      return True


_ROUTINE_FILTER = _RoutineFilter()


@contextlib.contextmanager
def routine_warnings_hidden() -> Iterator[None]:
  """Drops libraries' routine warnings meanwhile, wherever they would go.

  For library calls outside the command line, where nothing may filter
  the console: orbax warns that each read-only checkpoint manager it is
  asked for is read-only (`checkpoints.create_manager` makes every manager
  under it). Other warnings pass.
  """
  logger = py_logging.getLogger('absl')  # orbax logs through absl.
  added = _ROUTINE_FILTER not in logger.filters
  if added:
    logger.addFilter(_ROUTINE_FILTER)
  try:
    yield
  finally:
    if added:
      logger.removeFilter(_ROUTINE_FILTER)


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
  """Mutes what native code writes to stderr meanwhile, unless everything
  is asked for (quiet or `project_details`).

  For TensorFlow's import, whose C++ start-up banners ignore
  TF_CPP_MIN_LOG_LEVEL. Python errors still propagate (and print after).
  """
  if not (is_quiet() or _in_python_console or
          _PROJECT_DETAILS in logging.get_absl_handler().filters):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


@contextlib.contextmanager
def captured(what: str) -> Iterator[None]:
  """When quiet, keeps what Python code prints meanwhile (progress bars, a
  library's prints) off the console: it goes to the log as one record."""
  if not is_quiet():
    yield
    return
  buffer = io.StringIO()
  try:
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
      yield
  finally:
    text = buffer.getvalue().strip()
    if text:
      logging.info('Output of %s:\n%s', what, text)


class _WarningsOnly(py_logging.Filter):
  """Passes warnings and errors only."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING


_WARNINGS_ONLY = _WarningsOnly()


def follow() -> None:
  """Keeps this process's console to warnings and errors, progress included.

  For the processes after the first of a multi-process run: they do the
  same work as process 0, which alone reports it (and writes the files).
  """
  handler = logging.get_absl_handler()
  if _WARNINGS_ONLY not in handler.filters:
    handler.addFilter(_WARNINGS_ONLY)


def is_following() -> bool:
  return _WARNINGS_ONLY in logging.get_absl_handler().filters


def is_quiet() -> bool:
  return _FILTER in logging.get_absl_handler().filters


_show_in_python = True
_in_python_console = False  # Inside `python_console`.


def show_in_python(enabled: bool = True) -> None:
  """Whether `python_console` shows anything (default True): False keeps
  the project silent from Python; the stages' log files are still kept."""
  global _show_in_python
  _show_in_python = bool(enabled)


def _python_shows() -> bool:
  return _in_python_console and _show_in_python


class _PythonConsole(py_logging.StreamHandler):
  """What `quiet` passes (say lines, warnings that are not routine), as
  plain text on the stream current at each record (a notebook gives each
  cell its own), unless silenced or following (`follow`)."""

  def __init__(self):
    super().__init__()
    self.addFilter(_FILTER)
    self.setFormatter(_ConsoleFormatter())

  def emit(self, record: py_logging.LogRecord) -> None:
    if _show_in_python and not is_following():
      self.setStream(sys.stderr)
      super().emit(record)


class _NotTwice(py_logging.Filter):
  """On the root handlers found when `python_console` starts: drops the
  absl records they would not have received (below absl's level before);
  on those that print to stdout or stderr (a notebook's or the user's
  `logging.basicConfig`) also what the console shows itself (no line
  twice) and libraries' routine warnings. Others (pytest's capture, a
  user's log file) get what they got before."""

  def __init__(self, absl_level: int, prints: bool):
    super().__init__()
    self._absl_level = absl_level
    self._prints = prints

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.name == 'absl' and record.levelno < self._absl_level:
      return False
    if not self._prints:
      return True
    if _show_in_python and not is_following() and _FILTER.filter(record):
      return False
    return _ROUTINE_FILTER.filter(record)


def _prints(handler: py_logging.Handler) -> bool:
  return (isinstance(handler, py_logging.StreamHandler) and
          getattr(handler, 'stream', None) in (
              sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


@contextlib.contextmanager
def python_console() -> Iterator[None]:
  """The command line's console and log files meanwhile, from Python.

  Under `main` (absl's handler in use) or inside another `python_console`
  this does nothing. Otherwise nothing would show: absl keeps WARNING in a
  bare interpreter, so the stages' INFO records (their headers, progress,
  results) reach neither the screen nor workdir/<stage>/log.txt. Meanwhile
  absl logs at INFO (restored afterwards), and a handler on stderr shows
  what `quiet` shows unless `show_in_python(False)`; everything logged
  still goes to the stage's log file. Handlers already on the root logger
  get none of the new INFO records, and those that print (a notebook's
  `logging.basicConfig`) no copy of a console line (`_NotTwice`); with
  this handler on the root logger, `basicConfig` adds none meanwhile.
  """
  global _in_python_console
  root = py_logging.getLogger()
  if _in_python_console or logging.get_absl_handler() in root.handlers:
    yield
    return
  absl_logger = py_logging.getLogger('absl')
  level, before = absl_logger.level, absl_logger.getEffectiveLevel()
  others = [(h, _NotTwice(before, _prints(h))) for h in root.handlers]
  for other, not_twice in others:
    other.addFilter(not_twice)
  absl_logger.setLevel(min(before, py_logging.INFO))
  handler = _PythonConsole()
  root.addHandler(handler)
  _in_python_console = True
  try:
    yield
  finally:
    _in_python_console = False
    root.removeHandler(handler)
    absl_logger.setLevel(level)  # NOTSET stays NOTSET (follows the root).
    for other, not_twice in others:
      other.removeFilter(not_twice)


class _FileHandler(py_logging.FileHandler):
  """A log file that stops quietly when it cannot be written (a full disk):
  the run's own error handling reports that, not a logging traceback."""

  def handleError(self, record: py_logging.LogRecord) -> None:
    del record
    self.setLevel(py_logging.CRITICAL + 1)


@contextlib.contextmanager
def log_file(path: str) -> Iterator[Optional[str]]:
  """Appends every log record (INFO and up, any library) to `path` meanwhile.

  Yields the path, or None when it cannot be written (a read-only workdir:
  the run goes on without a log file).
  """
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = _FileHandler(path, mode='a', encoding='utf-8')
  except OSError as e:
    logging.debug('No log file %s: %s', path, e)
    yield None
    return
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(py_logging.INFO)
  root = py_logging.getLogger()
  root.addHandler(handler)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()


class _Buffer(py_logging.Handler):
  """Keeps the records of a stage until it is known where they belong."""

  def __init__(self):
    super().__init__(py_logging.INFO)
    self.records = []

  def emit(self, record: py_logging.LogRecord) -> None:
    self.records.append(record)


@contextlib.contextmanager
def buffered_log() -> Iterator[list[py_logging.LogRecord]]:
  """Collects every log record (INFO and up) meanwhile, for `write_log`.

  For stages that write a log file only if they do any work (so a finished,
  read-only workdir stays untouched): the caller decides afterwards.
  """
  handler = _Buffer()
  root = py_logging.getLogger()
  root.addHandler(handler)
  try:
    yield handler.records
  finally:
    root.removeHandler(handler)


def write_log(path: str, records: list[py_logging.LogRecord]) -> None:
  """Appends `records` to the log file `path`; a failure is only logged."""
  formatter = logging.PythonFormatter()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a', encoding='utf-8') as f:
      for record in records:
        f.write(formatter.format(record) + '\n')
  except OSError as e:
    logging.debug('No log file %s: %s', path, e)


def _duration(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Progress:
  """One progress line per stage: step, figures, steps/s, ETA.

  The one progress report of a training loop. On a terminal (and a quiet
  console) the line is rewritten in place at every `update`; otherwise it is
  printed when the run passes each quarter. Every update also goes to the
  log file, and returns the steps/s of its interval for the metric writer.
  """

  def __init__(self, name: str, start_step: int, num_steps: int,
               stream=None, unit: str = 'step'):
    self._name = name
    self._unit = unit  # 'step': "step 5/10, 2.0 steps/s".
    self._start_step = start_step
    self._num_steps = num_steps
    self._start = time.time()
    self._last_step, self._last_time = start_step, self._start
    self._stream = sys.stderr if stream is None else stream
    self._in_place = ((is_quiet() or _python_shows()) and
                      not is_following() and _interactive(self._stream))
    self._next_quarter = 1
    self._width = 0

  def line(self, step: int, figures: Mapping[str, float]) -> str:
    done = step - self._start_step
    elapsed = time.time() - self._start
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self._num_steps - step) / rate if rate > 0 else 0.0
    parts = [f'{self._name}: {self._unit} {step}/{self._num_steps} '
             f'({100.0 * step / max(self._num_steps, 1):.0f}%)']
    parts += [f'{k} {v:.4g}' for k, v in figures.items()]
    parts.append(f'{rate:.1f} {self._unit}s/s')
    if step < self._num_steps:
      parts.append(f'ETA {_duration(eta)}')
    return ', '.join(parts)

  def update(self, step: int, figures: Mapping[str, float]) -> float:
    """Shows the line at `step` with `figures` (e.g. {'loss': ...}).

    Returns:
      Steps per second since the previous update (the first: since the
      start, compilation included), for TensorBoard's 'steps_per_sec'.
    """
    now = time.time()
    rate = ((step - self._last_step) / (now - self._last_time)
            if now > self._last_time else 0.0)
    self._last_step, self._last_time = step, now
    self._show(step, self.line(step, figures))
    return rate

  def _show(self, step: int, text: str) -> None:
    if self._in_place:
      logging.info('%s', text)  # The log file only.
      padded = text.ljust(self._width)
      self._width = len(text)
      self._stream.write('\r' + padded)
      if step >= self._num_steps:
        self._stream.write('\n')
        self._width = 0
      self._stream.flush()
      return
    crossed = False
    while (self._next_quarter <= _QUARTERS
           and step >= self._num_steps * self._next_quarter / _QUARTERS):
      self._next_quarter += 1
      crossed = True
    # Every update reaches the log file; quarters also the console.
    logging.info('%s', text, extra={_CONSOLE: crossed})

  def close(self) -> None:
    """Ends an in-place line early (an error mid-run)."""
    if self._in_place and self._width:
      self._stream.write('\n')
      self._stream.flush()
      self._width = 0


def _interactive(stream) -> bool:
  """A terminal, or a notebook's output (Jupyter, Colab: both redraw a line
  that starts with a carriage return)."""
  if type(stream).__module__.startswith('ipykernel'):
    return True
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


@functools.cache
def tensorflow() -> Any:
  """TensorFlow, imported on first use: quietly (`native_stderr_muted`), and
  kept off GPUs and TPUs, which JAX owns (tf.data and the metric files run
  on the host). Where data is read or metrics are written; nothing else in
  the project needs TensorFlow."""
  with native_stderr_muted():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such kind.
      pass
  return tf


def create_writer(logdir: str) -> 'metric_writers.MetricWriter':
  """TensorBoard event files in `logdir` plus the log; process 0 only writes.

  Where clu or TensorFlow is not installed (an accelerator image with JAX
  alone), a `JsonLinesWriter` instead: the scalars in the log and in
  `workdir.scalars_jsonl(logdir)`, the images left out (each stage also
  writes its grids as PNG files); one warning says so.
  """
  import jax  # pylint: disable=g-import-not-at-top
  try:
    tensorflow()  # clu's writers import it: quietly and on the host.
    # pylint: disable-next=g-import-not-at-top,redefined-outer-name
    from clu import metric_writers
  except ImportError as e:
    _warn_without_tensorboard(str(e))
    return JsonLinesWriter(logdir if jax.process_index() == 0 else None)
  return metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0)


@functools.cache
def _warn_without_tensorboard(reason: str) -> None:
  logging.warning(
      'No TensorBoard files (%s): each stage logs its scalars to log.txt and '
      'scalars.jsonl instead. Fix: pip install tensorflow-cpu clu for '
      'TensorBoard.', reason)


class JsonLinesWriter:
  """clu's `MetricWriter` calls without clu: scalars to the log and, given a
  directory, appended to its scalars.jsonl (one line a write, flushed);
  images are skipped, hyperparameters logged. A run resumed after one that
  was killed while writing drops that run's unfinished last line first, and
  (`drop_after`) the lines it wrote after its last checkpoint."""

  def __init__(self, logdir: Optional[str]):
    self._path = None
    if logdir is not None:
      self._path = workdir_lib.scalars_jsonl(logdir)
      _drop_unfinished_line(self._path)

  def drop_after(self, step: int) -> None:
    """Forgets the lines of steps after `step`, the checkpoint a run resumes
    from: the killed run's, which this one writes again (TensorBoard drops
    such events of its files itself). The file is rewritten atomically."""
    if self._path is None or not os.path.exists(self._path):
      return
    with open(self._path, 'rb') as f:
      lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)['step'] <= step]
    if len(kept) < len(lines):
      files.atomic_write(self._path, lambda f: f.writelines(kept))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(v) for k, v in scalars.items()}
    logging.info('[%d] %s', step,
                 ', '.join(f'{k}={v:.6g}' for k, v in values.items()))
    if self._path is not None:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'step': int(step), **values}) + '\n')

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images  # The stages write their grids as PNG files too.

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('Hyperparameters: %s', dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _drop_unfinished_line(path: str) -> None:
  """Truncates `path` after its last newline, if it exists and goes on."""
  try:
    with open(path, 'rb+') as f:
      data = f.read()
      end = data.rfind(b'\n') + 1
      if end < len(data):
        f.truncate(end)
  except FileNotFoundError:
    pass

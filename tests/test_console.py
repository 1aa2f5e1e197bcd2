"""The console: what a person sees, and the log files that keep the rest."""

import io
import json
import logging as py_logging
import os
import subprocess
import sys

from absl import logging
import pytest

from vqvae2_jax import console

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def absl_handler():
  """absl's handler with the console's filters off; its filters and
  formatter restored afterwards."""
  handler = logging.get_absl_handler()
  filters = list(handler.filters)
  formatter = handler.python_handler.formatter
  # pylint: disable-next=protected-access
  ours = (console._FILTER, console._WARNINGS_ONLY)
  handler.filters[:] = [f for f in filters if f not in ours]
  yield handler
  handler.filters[:] = filters
  handler.python_handler.setFormatter(formatter)


@pytest.fixture(autouse=True)
def info_verbosity():
  """absl at INFO, as `main` runs it (a bare interpreter keeps WARNING)."""
  before = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  yield
  logging.set_verbosity(before)


def _record(level, message, **extra):
  record = py_logging.LogRecord('x', level, __file__, 1, message, (), None)
  record.__dict__.update(extra)
  return record


def test_quiet_console_passes_say_lines_and_real_warnings(absl_handler):
  assert not console.is_quiet()
  console.quiet()
  console.quiet()  # Idempotent: one filter.
  assert console.is_quiet()
  # pylint: disable-next=protected-access
  assert absl_handler.filters.count(console._FILTER) == 1
  passes = absl_handler.filters[-1].filter
  assert not passes(_record(py_logging.INFO, 'a detail'))
  assert passes(_record(py_logging.INFO, 'a stage header',
                        vqvae2_console=True))
  assert passes(_record(py_logging.WARNING, 'disk almost full'))
  assert passes(_record(py_logging.ERROR, 'failed'))
  for routine in ('Given directory is read only: /w/vqvae',
                  'AutoGraph could not transform <fn>',
                  'Dataset x has no dataset_info.json'):
    assert not passes(_record(py_logging.WARNING, routine)), routine
  # Console lines print as their text alone.
  text = absl_handler.python_handler.formatter.format(
      _record(py_logging.INFO, 'step 3', vqvae2_console=True))
  assert text == 'step 3'


def test_following_processes_show_warnings_only(absl_handler):
  assert not console.is_following()
  console.follow()
  assert console.is_following()
  passes = absl_handler.filters[-1].filter
  assert not passes(_record(py_logging.INFO, 'step 3', vqvae2_console=True))
  assert passes(_record(py_logging.WARNING, 'slow disk'))


def test_captured_output_goes_to_the_log_when_quiet(absl_handler, capsys,
                                                   caplog):
  with console.captured('a loud library'):
    print('shown: not quiet')
  assert 'shown: not quiet' in capsys.readouterr().out
  console.quiet()
  with caplog.at_level(py_logging.INFO):
    with console.captured('a loud library'):
      print('progress 50%')
  assert 'progress 50%' not in capsys.readouterr().out
  assert 'Output of a loud library:\nprogress 50%' in caplog.text


def test_log_file_keeps_every_record_meanwhile(tmp_path):
  path = str(tmp_path / 'vqvae' / 'log.txt')
  with console.log_file(path) as got:
    assert got == path
    logging.info('inside %d', 1)
    py_logging.getLogger('orbax').warning('a library line')
  logging.info('after')
  text = (tmp_path / 'vqvae' / 'log.txt').read_text()
  assert 'inside 1' in text and 'a library line' in text
  assert 'after' not in text


def test_log_file_in_an_unwritable_place_is_none(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with console.log_file(str(blocker / 'log.txt')) as got:
    assert got is None
    logging.info('the run goes on')


def test_buffered_records_are_written_afterwards(tmp_path):
  with console.buffered_log() as records:
    logging.info('extracted %d codes', 96)
  logging.info('not buffered')
  assert [r.getMessage() for r in records] == ['extracted 96 codes']
  path = str(tmp_path / 'codes' / 'log.txt')
  console.write_log(path, records)
  console.write_log(path, records)  # Appends.
  assert open(path).read().count('extracted 96 codes') == 2
  console.write_log(str(tmp_path / 'codes' / 'log.txt' / 'x'), records)


@pytest.mark.parametrize('seconds,text', [
    (0.4, '0s'), (59, '59s'), (61, '1m01s'), (3599, '59m59s'),
    (3600 * 2 + 60 * 5 + 9, '2h05m'), (-3, '0s')])
def test_durations(seconds, text):
  assert console._duration(seconds) == text  # pylint: disable=protected-access


def test_progress_line_and_quarters_in_a_pipe(caplog):
  stream = io.StringIO()  # Not a terminal: no line rewritten in place.
  progress = console.Progress('vqvae', start_step=0, num_steps=8,
                              stream=stream)
  line = progress.line(2, {'loss': 0.123456})
  assert line.startswith('vqvae: step 2/8 (25%), loss 0.1235, ')
  assert 'steps/s' in line and 'ETA' in line
  assert 'ETA' not in progress.line(8, {})
  with caplog.at_level(py_logging.INFO):
    for step in range(1, 9):
      progress.update(step, {})
  shown = [r for r in caplog.records if getattr(r, 'vqvae2_console', False)]
  # Every update is logged; the console gets the one at each quarter.
  assert len(caplog.records) == 8
  assert [r.getMessage().split(' (')[0] for r in shown] == [
      f'vqvae: step {s}/8' for s in (2, 4, 6, 8)]
  assert stream.getvalue() == ''


def test_progress_update_returns_the_interval_steps_per_sec(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(console.time, 'time', lambda: now[0])
  progress = console.Progress('prior', start_step=10, num_steps=50,
                              stream=io.StringIO())
  now[0] += 5.0
  assert progress.update(20, {}) == pytest.approx(2.0)  # 10 steps in 5 s.
  now[0] += 2.0
  assert progress.update(30, {}) == pytest.approx(5.0)  # 10 more in 2 s.
  # The line's rate and ETA are over the whole run: 20 steps in 7 s.
  assert '2.9 steps/s' in progress.line(30, {})
  samples = console.Progress('Evaluate', 0, 50, stream=io.StringIO(),
                             unit='sample')
  now[0] += 4.0
  assert samples.line(20, {}).startswith('Evaluate: sample 20/50 (40%), '
                                         '5.0 samples/s, ETA 6s')


# A notebook or script: a bare interpreter where nothing set up absl's
# handler. The stage is a stand-in ('codes', whose log stages.run writes).
_FROM_PYTHON = r'''
import sys, types
from absl import logging
from configs import fashion_mnist
from vqvae2_jax import console, stages

class OutStream:  # What a Jupyter or Colab cell's stderr is.
  def __init__(self):
    self.text = ''
  def write(self, text):
    self.text += text
  def flush(self):
    pass
OutStream.__module__ = 'ipykernel.iostream'

def work(config, workdir):
  console.say('extracting into %s', workdir)
  logging.info('a detail of the stage')
  logging.warning('Given directory is read only: %s', workdir)
  logging.warning('a real warning')
  stream = OutStream() if mode == 'notebook' else None
  progress = console.Progress('Codes', 0, 8, stream=stream)
  for step in range(1, 9):
    progress.update(step, {})
  if stream is not None:
    sys.stderr.write('IN PLACE: ' + repr(stream.text) + '\n')
  return {'extract_time_s': 1.0}

mode = sys.argv[2]
if mode == 'basicconfig':  # As a notebook often has: a handler on stderr.
  import logging as py_logging
  py_logging.basicConfig()
sys.modules['stand_in'] = types.SimpleNamespace(work=work)
stages._STAGES['codes'] = ('stand_in', 'work')  # pylint: disable=protected-access
if mode == 'silent':
  console.show_in_python(False)
stages.run('codes', fashion_mnist.get_config('tiny'), sys.argv[1])
logging.info('after the stage')
absl_level = logging.get_absl_logger().level
sys.stderr.write(f'verbosity {logging.get_verbosity()} {absl_level}\n')
'''


@pytest.mark.parametrize('mode', ['script', 'notebook', 'silent',
                                  'basicconfig'])
def test_stages_from_python_show_the_console_and_keep_the_log(tmp_path, mode):
  result = subprocess.run(
      [sys.executable, '-c', _FROM_PYTHON, str(tmp_path), mode],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=True)
  shown = result.stderr
  log = (tmp_path / 'codes' / 'log.txt').read_text()
  # The log file holds every record of the stage, whatever is shown.
  for line in ('extracting into', 'a detail of the stage', 'a real warning',
               'Codes: step 1/8', 'Codes: step 8/8'):
    assert line in log, (line, log)
  # absl's level is the interpreter's again afterwards (WARNING, its
  # logger's own level unset: it follows the root logger's).
  end = f'verbosity {logging.WARNING} {py_logging.NOTSET}\n'
  assert shown.endswith(end), shown
  assert 'a detail' not in shown and 'after the stage' not in shown
  assert 'read only' not in shown  # Routine, as on the command line.
  if mode == 'silent':
    assert shown == end
    return
  # Each console line once (basicConfig's handler gets no copy).
  assert shown.count(f'extracting into {tmp_path}\n') == 1, shown
  assert shown.count('a real warning') == 1, shown
  assert 'INFO:absl' not in shown
  quarters = [l.split(' (')[0] for l in shown.splitlines()
              if l.startswith('Codes: ')]
  if mode != 'notebook':  # Not a terminal: a line at each quarter.
    assert quarters == [f'Codes: step {s}/8' for s in (2, 4, 6, 8)]
  else:  # A notebook cell: the line is redrawn in place.
    assert quarters == []
    drawn = shown.split('IN PLACE: ')[1].splitlines()[0]
    assert drawn.count('\\r') == 8 and drawn.endswith("\\n'"), drawn
    assert 'Codes: step 8/8 (100%)' in drawn


def test_json_lines_writer_appends_scalars_and_drops_an_unfinished_line(
    tmp_path, caplog):
  # The writer of a machine without clu and TensorFlow (an accelerator
  # image): a run killed while writing a line leaves it unfinished; the
  # resumed run's writer cuts it off, keeping every finished line.
  path = tmp_path / 'scalars.jsonl'
  path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
  writer = console.JsonLinesWriter(str(tmp_path))
  with caplog.at_level(py_logging.INFO):
    writer.write_scalars(2, {'loss': 2.25, 'bits': 3})
  writer.write_images(2, {'grid': None})
  writer.flush()
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {'step': 1, 'loss': 2.5}, {'step': 2, 'loss': 2.25, 'bits': 3.0}]
  assert '[2] loss=2.25, bits=3' in caplog.text
  # Other processes' writers (no directory) only log.
  console.JsonLinesWriter(None).write_scalars(3, {'loss': 2.0})
  console.JsonLinesWriter(None).drop_after(0)
  assert len(path.read_text().splitlines()) == 2
  # A run resumed at the checkpoint of step 1 forgets the later lines.
  writer.drop_after(2)
  assert len(path.read_text().splitlines()) == 2
  writer.drop_after(1)
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {'step': 1, 'loss': 2.5}]
  assert os.listdir(tmp_path) == ['scalars.jsonl']

"""The training skeleton: `run_training` and its loop.

The skeleton runs here on a toy stage (a least-squares fit), so that what
it promises every stage (restore-or-init, resume, metrics.json, a rerun of
a finished run) is checked apart from any model.
"""

import errno
import json
import logging
import os
import re
import subprocess
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax.train import common
from vqvae2_jax.train import optimizer
from vqvae2_jax.train import train_state

_TRUE_W = np.asarray([1.5, -2.0], np.float32)


class _ToyPrograms(NamedTuple):
  init: Callable[[jax.Array], train_state.TrainState]
  shardings: Any
  train_step: Callable


def _toy_programs(mesh, init_calls):
  """Least squares y = x . w with Adam; records each real (untraced) init."""
  tx, schedule = optimizer.create_optimizer(learning_rate=0.1,
                                            warmup_steps=1, num_train_steps=6)

  def init_fn(rng):
    params = {'w': jax.random.normal(rng, (2,))}
    return train_state.TrainState(step=jnp.zeros((), jnp.int32),
                                  params=params, opt_state=tx.init(params),
                                  extra={}, rng=jax.random.PRNGKey(0))

  def step_fn(state, batch):
    def loss_fn(params):
      return jnp.mean(jnp.square(batch['x'] @ params['w'] - batch['y']))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'learning_rate': schedule(state.step)}
    return (state.replace(step=state.step + 1, params=params,
                          opt_state=opt_state), metrics)

  jitted_init, shardings = train_state.sharded_init(init_fn, mesh,
                                                    jax.random.PRNGKey(0))

  def init(rng):
    traced = isinstance(rng, jax.core.Tracer)
    init_calls.append(traced)
    # Under `jax.eval_shape` the plain function: a jit with compiler
    # options may not be nested.
    return init_fn(rng) if traced else jitted_init(rng)

  return _ToyPrograms(init, shardings,
                      train_state.jit_train_step(step_fn, shardings, mesh))


def _batches(start_step):
  """The batch of step s depends on s only, as the real iterators'."""
  step = start_step
  while True:
    step += 1
    x = np.random.default_rng(step).normal(size=(8, 2)).astype(np.float32)
    yield {'x': x, 'y': x @ _TRUE_W}


def _run(directory, num_steps, init_calls, evaluations, keep=1,
         batches=_batches):
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  progs = _toy_programs(mesh, init_calls)

  def evaluate(step, state, is_last):
    evaluations.append((step, is_last))
    error = np.abs(np.asarray(state.params['w']) - _TRUE_W).sum()
    return {'eval/error': float(error)}

  return common.run_training(common.Stage(
      name='toy', directory=str(directory), fingerprint={'model': 'toy'},
      programs=progs, init_rng=jax.random.PRNGKey(3),
      cadence=common.Cadence(num_steps=num_steps, log_every=2, eval_every=4,
                             checkpoint_every=2, keep_checkpoints=keep),
      train_iterator=batches, evaluate=evaluate,
      nan_fix='lower the toy rate',
      final_metrics=lambda final: {'twice_step': 2 * final['step']}))


def _real_inits(calls):
  return sum(not traced for traced in calls)


def test_run_training_inits_resumes_and_reruns(tmp_path):
  whole, split = tmp_path / 'whole', tmp_path / 'split'
  calls, evals = [], []
  uninterrupted = _run(whole, 6, calls, evals)
  assert _real_inits(calls) == 1
  assert evals == [(4, False), (6, True)]
  assert uninterrupted['step'] == 6 and uninterrupted['twice_step'] == 12
  assert uninterrupted['steps_per_sec'] > 0
  for key in ('eval/error', 'train/loss', 'train/learning_rate',
              'wall_time_s', 'eval_time_s'):
    assert key in uninterrupted, key
  with open(whole / 'metrics.json') as f:
    assert json.load(f) == pytest.approx(uninterrupted)
  assert os.listdir(whole / 'checkpoints') == ['6']  # keep_checkpoints=1.

  # Four steps, then two more in a second call: restored, not initialised.
  calls, evals = [], []
  _run(split, 4, calls, evals)
  assert _real_inits(calls) == 1
  resumed = _run(split, 6, calls, evals)
  assert _real_inits(calls) == 1  # The second call restored step 4.
  assert any(calls)  # Its restore target came from `jax.eval_shape`.
  assert resumed['step'] == 6
  assert resumed['eval/error'] == uninterrupted['eval/error']
  assert resumed['train/loss'] == uninterrupted['train/loss']

  # A finished run is only read: nothing evaluated, built or written (the
  # TensorBoard directory and metrics.json are untouched).
  calls, evals = [], []
  before = {p: os.stat(whole / p).st_mtime_ns for p in os.listdir(whole)}
  again = _run(whole, 6, calls, evals)
  assert calls == [] and evals == []
  assert again == uninterrupted
  assert {p: os.stat(whole / p).st_mtime_ns
          for p in os.listdir(whole)} == before


def test_one_progress_report_with_steps_per_sec_in_tensorboard(tmp_path,
                                                               caplog):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.INFO, logger='absl'):
    _run(tmp_path, 6, [], [])
  acc = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={'tensors': 0})
  acc.Reload()
  # One point per log interval (log_every=2), beside the training figures.
  assert [e.step for e in acc.Tensors('steps_per_sec')] == [2, 4, 6]
  assert [e.step for e in acc.Tensors('train/loss')] == [2, 4, 6]
  assert 'uptime' not in acc.Tags()['tensors']
  # The log holds the one progress line per interval, and no second report.
  log = [r.getMessage() for r in caplog.records]
  lines = [m for m in log if re.match(r'toy: step \d+/6 ', m)]
  assert [m.split(' (')[0] for m in lines] == [
      'toy: step 2/6', 'toy: step 4/6', 'toy: step 6/6']
  assert not [m for m in log if re.search(r'\bETA\b', m) and m not in lines]


def _past_the_end_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and 'past num_train_steps' in
          r.getMessage()]


def test_fewer_steps_than_the_workdir_holds_trains_nothing_and_says_so(
    tmp_path, caplog):
  directory = tmp_path / 'six'
  six = _run(directory, 6, [], [])
  before = {p: os.stat(directory / p).st_mtime_ns
            for p in os.listdir(directory)}
  caplog.clear()
  calls, evals = [], []
  three = _run(directory, 3, calls, evals)
  # Finished at step 6: read, as a finished run is; nothing built or written.
  assert three == six and calls == [] and evals == []
  assert {p: os.stat(directory / p).st_mtime_ns
          for p in os.listdir(directory)} == before
  (line,) = _past_the_end_warnings(caplog)
  assert line == (
      f'toy: {directory} already holds step 6, past num_train_steps=3: '
      'nothing is trained and step 6 is kept (to train 3 steps, use a new '
      '--workdir).')
  # Without metrics.json (a kill after the last save): the same line, then
  # step 6 is evaluated, not trained.
  os.remove(directory / 'metrics.json')
  caplog.clear()
  calls, evals = [], []
  rerun = _run(directory, 3, calls, evals)
  assert _real_inits(calls) == 0 and evals == [(6, True)]
  assert rerun['step'] == 6 and rerun['eval/error'] == six['eval/error']
  assert len(_past_the_end_warnings(caplog)) == 1
  # The run's own length says nothing.
  caplog.clear()
  _run(directory, 6, [], [])
  assert not _past_the_end_warnings(caplog)


def _strict_json(path):
  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_kill_between_last_checkpoint_and_metrics(tmp_path):
  # An uninterrupted run, and one killed after its last checkpoint but
  # before metrics.json, with one checkpoint too many left (keep_checkpoints
  # would have deleted it after the save).
  uninterrupted = _run(tmp_path / 'whole', 6, [], [], keep=2)
  killed = tmp_path / 'killed'
  _run(killed, 6, [], [], keep=None)
  os.remove(killed / 'metrics.json')
  assert sorted(os.listdir(killed / 'checkpoints')) == ['2', '4', '6']
  calls, evals = [], []
  rerun = _run(killed, 6, calls, evals, keep=2)
  assert _real_inits(calls) == 0 and evals == [(6, True)]
  written = _strict_json(killed / 'metrics.json')  # No NaN, no Infinity.
  assert written == pytest.approx(rerun)
  assert sorted(os.listdir(killed / 'checkpoints')) == ['4', '6']
  # Complete: every figure of an uninterrupted run, training ones included.
  assert set(written) == set(uninterrupted)
  assert written['steps_per_sec'] is not None and written['steps_per_sec'] > 0
  for key in ('train/loss', 'train/learning_rate', 'eval/error', 'step'):
    assert written[key] == pytest.approx(uninterrupted[key]), key


def test_cadence_from_config(stage2_config):
  cadence = common.Cadence.from_config(stage2_config.prior)
  p = stage2_config.prior
  assert cadence == common.Cadence(
      num_steps=p.num_train_steps, log_every=p.log_every,
      eval_every=p.eval_every, checkpoint_every=p.checkpoint_every,
      keep_checkpoints=p.keep_checkpoints)


def test_a_full_disk_is_one_message_and_the_last_checkpoint_restores(
    tmp_path, monkeypatch):
  save = common.checkpoints.save

  def save_until_full(manager, step, state, fingerprint):
    if step >= 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                    str(tmp_path / 'full' / 'checkpoints' / str(step)))
    save(manager, step, state, fingerprint)

  monkeypatch.setattr(common.checkpoints, 'save', save_until_full)
  with pytest.raises(errors.WorkdirError) as info:
    _run(tmp_path / 'full', 6, [], [])
  message = str(info.value)
  assert 'The disk is full' in message and str(tmp_path / 'full') in message
  assert 'newest intact checkpoint is step 2' in message
  # The state's arrays: a step 2 and an Adam state of 2 weights, an RNG key.
  assert 'No space left on device; about 44 bytes still to write)' in message
  assert 'Fix: free space' in message
  assert not (tmp_path / 'full' / 'metrics.json').exists()
  # Space freed: the rerun resumes from step 2 and ends where an
  # uninterrupted run does.
  monkeypatch.setattr(common.checkpoints, 'save', save)
  calls = []
  resumed = _run(tmp_path / 'full', 6, calls, [])
  assert _real_inits(calls) == 0
  uninterrupted = _run(tmp_path / 'whole', 6, [], [])
  assert resumed['eval/error'] == uninterrupted['eval/error']


def test_final_metrics_count_the_undecodable_images_of_the_run(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  (tmp_path / 'bad.png').write_bytes(b'not an image at all')
  Image.new('RGB', (4, 4)).save(tmp_path / 'good.png')
  reader = image_folder.SafeReader(
      (str(tmp_path / 'bad.png'), str(tmp_path / 'good.png')), channels=3)
  mesh = parallel.create_mesh(devices=jax.devices()[:1])

  def batches(start):
    for batch in _batches(start):
      reader(0)  # The bad file, replaced by the good one each time.
      yield batch

  metrics = common.run_training(common.Stage(
      name='toy', directory=str(tmp_path / 'run'), fingerprint={'m': 'toy'},
      programs=_toy_programs(mesh, []), init_rng=jax.random.PRNGKey(3),
      cadence=common.Cadence(num_steps=2, log_every=2, eval_every=2,
                             checkpoint_every=2, keep_checkpoints=1),
      train_iterator=batches, evaluate=lambda step, state, last: {},
      nan_fix='-'))
  assert metrics['data/undecodable_files'] == 1
  # A later run without decode failures reports none.
  clean = _run(tmp_path / 'clean', 2, [], [])
  assert 'data/undecodable_files' not in clean


def _mount_tmpfs(directory, size):
  """Mounts a fresh tmpfs of `size` at `directory`; False where not allowed."""
  os.makedirs(directory)
  if os.geteuid() != 0:
    return False
  try:
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                           'tmpfs', str(directory)], capture_output=True)
  except OSError:  # No mount command.
    return False
  return done.returncode == 0


def _fill_disk(directory):
  """Writes a ballast file until the disk of `directory` is full."""
  fd = os.open(os.path.join(directory, 'ballast'), os.O_WRONLY | os.O_CREAT)
  try:
    for chunk in (2**16, 2**12, 1):
      try:
        while os.write(fd, b'\0' * chunk):
          pass
      except OSError as e:
        assert e.errno == errno.ENOSPC
  finally:
    os.close(fd)


def test_a_disk_that_fills_during_a_checkpoint_save(tmp_path, monkeypatch,
                                                    caplog, capfd):
  # As root: a real full disk (a small tmpfs, filled before the step-6
  # save). Elsewhere: the error tensorstore raises from orbax's save.
  disk = tmp_path / 'disk'
  real_disk = _mount_tmpfs(disk, '4m')
  run = disk / 'run'
  try:
    _run(run, 4, [], [], keep=2)
    save = common.checkpoints.save

    def filling(start):
      for step, batch in enumerate(_batches(start), start + 1):
        if step == 6 and real_disk:
          _fill_disk(disk)
        yield batch

    def full_from_step_6(manager, step, state, fingerprint):
      if step >= 6:
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "step/0": Failed to write to '
            "file: No space left on device [os_error_code='28']")
      save(manager, step, state, fingerprint)

    if not real_disk:
      monkeypatch.setattr(common.checkpoints, 'save', full_from_step_6)
    capfd.readouterr()
    # Full during the run, then full from the start (a rerun too early).
    for batches in (filling, _batches):
      with pytest.raises(errors.WorkdirError) as info:
        _run(run, 8, [], [], keep=2, batches=batches)
      message = str(info.value)
      assert message.startswith(f'The disk is full writing to {run}')
      assert ('the newest intact checkpoint is step 4 and a rerun resumes '
              'from it. Fix: free space') in message
      assert not (run / 'metrics.json').exists() or json.loads(
          (run / 'metrics.json').read_text())['step'] == 4
    # One message: no orbax tracebacks, logged or printed.
    assert not [r for r in caplog.records
                if r.levelno >= logging.ERROR or r.exc_info]
    assert 'Traceback' not in capfd.readouterr().err
    # Space freed: the rerun resumes from step 4 and ends as an
    # uninterrupted run does.
    if real_disk:
      os.remove(disk / 'ballast')
    monkeypatch.setattr(common.checkpoints, 'save', save)
    calls = []
    resumed = _run(run, 8, calls, [], keep=2)
    assert _real_inits(calls) == 0
    uninterrupted = _run(tmp_path / 'whole', 8, [], [], keep=2)
    for key in ('eval/error', 'train/loss'):
      assert resumed[key] == uninterrupted[key], key
    assert sorted(os.listdir(run / 'checkpoints')) == ['6', '8']
  finally:
    if real_disk:
      subprocess.run(['umount', '--lazy', str(disk)], check=True)

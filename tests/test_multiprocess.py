"""Multi-host for real (issue 13): 2 JAX processes x 4 CPU devices each.

Every stage runs as 2 processes through the local launcher
(`vqvae2_jax.launch`, jax.distributed over gloo) and is compared with the
same stages run by one process on 8 devices (the reference, a launch of
its own beside the first two). Stage 1 is interrupted twice on the way:
process 1 is killed with SIGKILL (the launcher must stop the other one and
name it), then process 0 gets a preemption notice (SIGTERM: both save at
the same step and exit 0), and the third launch finishes it. Meanwhile (it
mostly sleeps) a small program checks that a process arriving 35 s late at
the first collectives is waited for (tests/multiprocess_late_peer.py).
Another small program (tests/multiprocess_checkpoint_race.py) checks that a
process arriving after its peer created a checkpoint directory opens the
same orbax managers as the peer did. The
later stages read the reference's earlier stages, so each stage is compared
on the same input:

  workdir   stages run by 2 processes     compared with the reference's
  mp_vqvae  vqvae (killed, preempted,     vqvae/ state
            finished)
  mp_codes  codes, prior (vqvae/ copied)  codes/ files, prior_<i>/ states
  mp_sample sample (vqvae/, codes/ and    samples/<run>/codes.npz
            prior_<i>/ copied)
  mp_import vqvae, prior from the         vqvae/ weights, prior_<i>/ sampling
            reference's exported file     weights (exactly)
            (codes/ copied)

States are equal when every float array's max |a - b| / max |b| is at
most 1e-5 and every integer array is identical. One parameter is exempt:
the bias of an attention layer's key projection adds the same number to
all of a query's logits, which the softmax removes, so its gradient is 0
up to rounding, and Adam turns that rounding (different for 1 and 2
processes) into full-size steps. The test checks that premise instead:
its Adam first moment stays at rounding size.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

from configs import fashion_mnist
from vqvae2_jax import checkpoints
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.train import prior_trainer
from vqvae2_jax.train import train_state
from vqvae2_jax.train import vqvae_trainer

pytestmark = pytest.mark.multiprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = 10  # Stage 1's steps: enough to stop it twice on the way.
_OVERRIDES = {
    'data.train_split': 'train[:96]', 'data.eval_split': 'test[:40]',
    # The same batches for 1 and 2 processes.
    'data.input_streams': 2,
    'vqvae_train.num_train_steps': _STEPS, 'vqvae_train.checkpoint_every': 2,
    'vqvae_train.log_every': 2, 'vqvae_train.eval_every': _STEPS,
    'vqvae_train.eval_batch_size': 16, 'prior.codes_per_shard': 32,
    'prior.eval_batch_size': 16,
}
_TOLERANCE = 1e-5
_KILL_REPORT_SECONDS = 60


def _config():
  config = fashion_mnist.get_config('tiny')
  for field, value in _OVERRIDES.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


def _launch(output_dir, *args, module='vqvae2_jax.main', stage_flags=True,
            processes=2, devices_per_process=4):
  """Starts the launcher on `args` (with the tiny config's flags unless
  `stage_flags` is False); returns the Popen.

  Each process's whole output goes to `output_dir`/process_<i>.log (see
  `_logs`); a process that aborts or is sent SIGABRT prints every thread's
  Python stack there first (faulthandler).
  """
  env = dict(os.environ, PYTHONPATH=_ROOT, PYTHONFAULTHANDLER='1')
  command = [sys.executable, '-m', 'vqvae2_jax.launch',
             f'--processes={processes}',
             f'--devices_per_process={devices_per_process}',
             f'--module={module}', f'--output_dir={output_dir}', '--', *args]
  if stage_flags:
    command += ['--config=configs/fashion_mnist.py:tiny',
                *[f'--config.{k}={v}' for k, v in _OVERRIDES.items()]]
  launcher = subprocess.Popen(command, cwd=_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
  launcher.output_dir = output_dir
  return launcher


def _logs(launcher, output=''):
  """The launcher's own output and each process's whole log, for a failure
  message."""
  parts = [f'--- launcher:\n{output}']
  for path in sorted(glob.glob(os.path.join(launcher.output_dir, '*.log'))):
    with open(path, errors='replace') as f:
      parts.append(f'--- {path}:\n{f.read()}')
  return '\n'.join(parts)


def _children(launcher):
  """{JAX process id: psutil.Process} of the launcher's processes."""
  found = {}
  for child in psutil.Process(launcher.pid).children():
    try:
      found[int(child.environ()['JAX_PROCESS_ID'])] = child
    except (psutil.NoSuchProcess, KeyError):
      pass
  return found


def _saved_steps(stage_dir):
  """Finished checkpoint steps (orbax renames a step's directory when done)."""
  directory = workdir_lib.checkpoint_dir(stage_dir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _signal_after_checkpoint(launcher, stage_dir, after_step, process, signum):
  """Sends `signum` to JAX process `process` once a checkpoint newer than
  `after_step` is on disk; returns (that checkpoint's step, when sent)."""
  deadline = time.time() + 300
  while time.time() < deadline:
    assert launcher.poll() is None, _logs(launcher, launcher.communicate()[0])
    newer = [s for s in _saved_steps(stage_dir) if s > after_step]
    if newer:
      _children(launcher)[process].send_signal(signum)
      return newer[-1], time.time()
    time.sleep(0.02)
  raise AssertionError('No checkpoint was saved within 300 s.')


def _output(launcher, timeout):
  """The launcher's output once it exits; after `timeout` seconds its
  processes are killed and the test fails (a hang must not outlive it)."""
  try:
    return launcher.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    # SIGABRT first: faulthandler writes where each thread waits.
    children = list(_children(launcher).values())
    for child in children:
      child.send_signal(signal.SIGABRT)
    psutil.wait_procs(children, timeout=10)
    for child in children:
      if child.is_running():
        child.kill()
    launcher.kill()
    output = launcher.communicate()[0]
    raise AssertionError(f'The launch hung for {timeout} s:\n'
                         f'{_logs(launcher, output)}') from None


def _restore(stage_dir, programs):
  """(step, state) of the newest checkpoint in `stage_dir`, on 8 devices."""
  with checkpoints.create_manager(workdir_lib.checkpoint_dir(stage_dir),
                                  read_only=True) as manager:
    step = manager.latest_step()
    return step, checkpoints.restore_step(manager, step,
                                          train_state.restore_target(programs))


_NO_GRADIENT = "['key']['bias']"  # See the module docstring.


def _assert_states_equal(actual, expected):
  flat = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual = jax.tree.leaves(actual)
  assert len(actual) == len(flat)
  for (path, want), got in zip(flat, actual):
    want, got = np.asarray(want), np.asarray(got)
    name = jax.tree_util.keystr(path)
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if _NO_GRADIENT in name:
      if '.mu[' in name:  # Adam's mean gradient: rounding noise only.
        assert np.abs(want).max() < 1e-7 and np.abs(got).max() < 1e-7, name
      continue
    if not np.issubdtype(want.dtype, np.floating):
      np.testing.assert_array_equal(got, want, err_msg=name)
      continue
    scale = max(float(np.abs(want).max(initial=0.0)), np.finfo(np.float32).tiny)
    error = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    assert error / scale <= _TOLERANCE, (name, error / scale)


def _copy_stages(source, target, names):
  for name in names:
    shutil.copytree(os.path.join(source, name), os.path.join(target, name))


@pytest.fixture(scope='module')
def late_peer(tmp_path_factory):
  """The launcher of tests/multiprocess_late_peer.py, started first: it
  sleeps while `runs` computes."""
  return _launch(str(tmp_path_factory.mktemp('late_peer')),
                 module='tests.multiprocess_late_peer', stage_flags=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, late_peer):
  """The reference (1 process) and the 2-process runs, with what happened."""
  del late_peer  # Started before the reference (see `late_peer`).
  root = tmp_path_factory.mktemp('multiprocess')
  config = _config()
  reference = str(root / 'reference')
  # The reference runs in its own process (1 x 8 devices) beside launches 1
  # and 2, which spend much of their time starting up and waiting.
  reference_run = _launch(
      str(root / 'logs_reference'),
      f'--run={reference}:vqvae,codes,prior,sample,export',
      module='tests.multiprocess_stages', processes=1, devices_per_process=8)
  mp_vqvae, mp_codes, mp_sample, mp_import = (str(root / n) for n in (
      'mp_vqvae', 'mp_codes', 'mp_sample', 'mp_import'))
  events = {}
  stage_dir = os.path.join(mp_vqvae, 'vqvae')

  # 1. SIGKILL to process 1 after the first checkpoint.
  launcher = _launch(str(root / 'logs_kill'), f'--workdir={mp_vqvae}',
                     '--mode=vqvae')
  killed_after, sent = _signal_after_checkpoint(launcher, stage_dir, 0, 1,
                                                signal.SIGKILL)
  children = list(_children(launcher).values())
  output = _output(launcher, _KILL_REPORT_SECONDS + 30)
  events['kill'] = {'status': launcher.returncode, 'output': output,
                    'logs': _logs(launcher, output),
                    'seconds': time.time() - sent, 'after': killed_after,
                    'left': [c.pid for c in children if c.is_running() and
                             c.status() != psutil.STATUS_ZOMBIE]}

  # 2. The rerun resumes; a preemption notice (SIGTERM) to process 0 after
  # its first new checkpoint.
  resumed_at = _saved_steps(stage_dir)[-1]
  launcher = _launch(str(root / 'logs_preempt'), f'--workdir={mp_vqvae}',
                     '--mode=vqvae')
  _signal_after_checkpoint(launcher, stage_dir, resumed_at, 0,
                           signal.SIGTERM)
  output = _output(launcher, 300)
  events['preempt'] = {'status': launcher.returncode,
                       'logs': _logs(launcher, output),
                       'resumed_at': resumed_at,
                       'steps': _saved_steps(stage_dir),
                       'finished': os.path.exists(
                           os.path.join(stage_dir, 'metrics.json'))}

  output = _output(reference_run, 600)
  assert reference_run.returncode == 0, _logs(reference_run, output)
  os.makedirs(mp_codes)
  _copy_stages(reference, mp_codes, ['vqvae'])
  os.makedirs(mp_sample)
  _copy_stages(reference, mp_sample, ['vqvae', 'codes', 'prior_0', 'prior_1'])
  (exported,) = glob.glob(os.path.join(reference, 'export', '*.msgpack'))
  os.makedirs(mp_import)
  _copy_stages(reference, mp_import, ['codes'])

  # 3. One more launch finishes stage 1, runs the later stages on the
  # reference's inputs, and starts stage 1 and the priors from the
  # reference's exported file.
  launcher = _launch(str(root / 'logs_finish'), f'--run={mp_vqvae}:vqvae',
                     f'--run={mp_codes}:codes,prior',
                     f'--run={mp_sample}:sample',
                     f'--run={mp_import}:vqvae,prior@{exported}',
                     module='tests.multiprocess_stages')
  output = _output(launcher, 600)
  assert launcher.returncode == 0, _logs(launcher, output)
  return {'config': config, 'reference': reference, 'vqvae': mp_vqvae,
          'codes': mp_codes, 'sample': mp_sample, 'import': mp_import,
          'events': events}


def test_a_process_35_s_late_at_the_first_collectives_is_waited_for(
    late_peer, runs):
  del runs  # Only its order: the late peer runs meanwhile.
  output = _output(late_peer, 120)
  logs = _logs(late_peer, output)
  assert late_peer.returncode == 0, logs
  for i in range(2):
    assert f'process {i}: sum over 8 devices 8' in logs, logs


def test_a_late_process_agrees_whether_the_checkpoint_directory_exists(
    tmp_path):
  directory = str(tmp_path / 'stage' / 'checkpoints')
  launcher = _launch(str(tmp_path / 'logs'), f'--directory={directory}',
                     module='tests.multiprocess_checkpoint_race',
                     stage_flags=False)
  output = _output(launcher, 120)
  logs = _logs(launcher, output)
  assert launcher.returncode == 0, logs
  for i in range(2):
    assert f'process {i}: created {directory}' in logs, logs
  assert os.path.isdir(directory)


def test_a_killed_process_stops_the_launch_naming_it(runs):
  kill = runs['events']['kill']
  assert kill['status'] == 128 + signal.SIGKILL, kill['logs']
  assert 'Error: process 1 of 2 was killed by SIGKILL' in kill['output']
  assert kill['seconds'] < _KILL_REPORT_SECONDS
  assert not kill['left']  # Process 0 was stopped, not left waiting.
  assert 0 < kill['after'] < _STEPS


def test_sigterm_saves_the_agreed_step_on_every_process_and_exits_0(runs):
  preempt = runs['events']['preempt']
  assert preempt['status'] == 0, preempt['logs']
  assert not preempt['finished']
  stops = {int(line.split(' at step ')[1].split()[0])
           for line in preempt['logs'].splitlines()
           if 'stopped by a preemption notice (SIGTERM)' in line}
  # Both processes report it, at the same step: the newest checkpoint.
  lines = [line for line in preempt['logs'].splitlines()
           if 'stopped by a preemption notice (SIGTERM)' in line]
  assert len(lines) == 2, preempt['logs']
  assert len(stops) == 1
  stop = stops.pop()
  assert preempt['resumed_at'] < stop < _STEPS
  assert preempt['steps'][-1] == stop
  assert 'Run the same command again to resume' in lines[0]


def test_stage1_resumed_twice_equals_one_process(runs):
  programs = vqvae_trainer.programs(runs['config'], parallel.create_mesh())
  step, state = _restore(os.path.join(runs['vqvae'], 'vqvae'), programs)
  ref_step, ref_state = _restore(os.path.join(runs['reference'], 'vqvae'),
                                 programs)
  assert step == ref_step == _STEPS
  assert set(state.extra) == {'vq_stats'}  # Codebooks' EMA statistics.
  _assert_states_equal(state, ref_state)


def test_extracted_codes_are_byte_identical(runs):
  reference = os.path.join(runs['reference'], 'codes')
  names = sorted(os.path.relpath(p, reference) for p in glob.glob(
      os.path.join(reference, '**', '*.*'), recursive=True)
                 if not p.endswith('log.txt'))
  assert len([n for n in names if n.endswith('.npy')]) == 5
  for name in names:
    with open(os.path.join(reference, name), 'rb') as want, open(
        os.path.join(runs['codes'], 'codes', name), 'rb') as got:
      assert got.read() == want.read(), name
  produced = sorted(os.path.relpath(p, os.path.join(runs['codes'], 'codes'))
                    for p in glob.glob(os.path.join(runs['codes'], 'codes',
                                                    '**', '*.*'),
                                       recursive=True)
                    if not p.endswith('log.txt'))
  assert produced == names  # Nothing else (no temporary files).


def test_priors_equal_one_process(runs):
  mesh = parallel.create_mesh()
  for level in (0, 1):
    programs = prior_trainer.programs(runs['config'], level, mesh)
    step, state = _restore(workdir_lib.Workdir(runs['codes']).prior(level),
                           programs)
    ref_step, ref_state = _restore(
        workdir_lib.Workdir(runs['reference']).prior(level), programs)
    assert step == ref_step == runs['config'].prior.num_train_steps
    if level == 0:  # The top prior has attention: the exemption applies.
      assert any(_NO_GRADIENT in jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state.params)[0])
    _assert_states_equal(state, ref_state)


def test_samples_are_identical_and_written_once(runs):
  (reference,) = glob.glob(os.path.join(runs['reference'], 'samples', '*'))
  samples = glob.glob(os.path.join(runs['sample'], 'samples', '*'))
  assert [os.path.basename(p) for p in samples] == [
      os.path.basename(reference)]  # Renamed once, no .tmp left.
  want = np.load(os.path.join(reference, 'codes.npz'))
  got = np.load(os.path.join(samples[0], 'codes.npz'))
  assert sorted(got) == sorted(want) == ['codes_0', 'codes_1', 'labels']
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The same files (one TensorBoard file: one writer), nothing left over.
  kinds = lambda d: sorted(  # pylint: disable=g-long-lambda
      'events' if n.startswith('events.out.tfevents') else n
      for n in os.listdir(d))
  assert kinds(samples[0]) == kinds(reference)


def test_stages_from_an_export_hold_its_weights_once(runs):
  """--config.{vqvae_train,prior}.from_export on 2 processes: each stage's
  one checkpoint holds the file's weights at the file's step, and the stage
  is finished (evaluated, metrics.json written)."""
  mesh = parallel.create_mesh()
  wd, ref = workdir_lib.Workdir(runs['import']), workdir_lib.Workdir(
      runs['reference'])
  stages = [(wd.vqvae, ref.vqvae, vqvae_trainer.programs(runs['config'],
                                                           mesh))]
  stages += [(wd.prior(level), ref.prior(level),
              prior_trainer.programs(runs['config'], level, mesh))
             for level in (0, 1)]
  for stage_dir, ref_dir, programs in stages:
    assert len(_saved_steps(stage_dir)) == 1, stage_dir
    assert os.path.exists(os.path.join(stage_dir, 'metrics.json')), stage_dir
    step, state = _restore(stage_dir, programs)
    ref_step, ref_state = _restore(ref_dir, programs)
    assert step == ref_step, stage_dir
    # The file holds the sampling weights: a prior's Polyak average.
    want = getattr(ref_state, 'eval_params', lambda: ref_state.params)()
    jax.tree.map(np.testing.assert_array_equal, state.params, want)
    jax.tree.map(np.testing.assert_array_equal, state.extra, ref_state.extra)
    if getattr(state, 'polyak', None) is not None:  # A prior's, the same.
      jax.tree.map(np.testing.assert_array_equal, state.polyak, want)

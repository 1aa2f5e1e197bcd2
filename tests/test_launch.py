"""The local launcher and the multi-process settings, without JAX processes.

The launcher's processes here are tiny Python programs, so that its
bookkeeping (environment, exit statuses, stopping the others, forwarding a
preemption notice) is tested in seconds; tests/test_multiprocess.py runs
the stages through it.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from vqvae2_jax import errors
from vqvae2_jax import launch
from vqvae2_jax import parallel


def _program(code):
  return [sys.executable, '-c', code]


def test_each_process_gets_its_settings_and_devices(tmp_path):
  code = ('import os; open(os.path.join(%r, os.environ["JAX_PROCESS_ID"]), '
          '"w").write("\\n".join(os.environ[k] for k in ('
          '"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PLATFORMS", '
          '"XLA_FLAGS")))' % str(tmp_path))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_dump_to=/tmp/x')
  assert launch.launch(_program(code), num_processes=3, devices_per_process=2,
                       port=12345, env=env) == 0
  assert sorted(os.listdir(tmp_path)) == ['0', '1', '2']
  for i in range(3):
    address, count, platforms, xla_flags = (
        tmp_path / str(i)).read_text().split('\n')
    assert (address, count, platforms) == ('127.0.0.1:12345', '3', 'cpu')
    # The device count replaced, other XLA flags kept.
    assert xla_flags.split() == ['--xla_dump_to=/tmp/x',
                                 '--xla_force_host_platform_device_count=2']


def test_a_failed_process_stops_the_others_and_is_named(capfd):
  # Process 1 fails at once; process 0 would run for a minute.
  code = ('import os, sys, time\n'
          'if os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
          'time.sleep(60)')
  start = time.time()
  status = launch.launch(_program(code), num_processes=2,
                         devices_per_process=1)
  assert time.time() - start < 20
  assert status == 3
  assert 'Error: process 1 of 2 exited with status 3' in capfd.readouterr().err


def test_a_process_killed_by_a_signal_gives_128_plus_its_number(capfd):
  code = ('import os, signal, time\n'
          'if os.environ["JAX_PROCESS_ID"] == "0":\n'
          '  os.kill(os.getpid(), signal.SIGKILL)\n'
          'time.sleep(60)')
  status = launch.launch(_program(code), num_processes=2,
                         devices_per_process=1)
  assert status == 128 + signal.SIGKILL
  assert 'process 0 of 2 was killed by SIGKILL' in capfd.readouterr().err


def test_output_dir_keeps_each_process_output_whole(tmp_path, capfd):
  # Both streams of each process in its own file; the failed one is named.
  code = ('import os, sys\n'
          'i = os.environ["JAX_PROCESS_ID"]\n'
          'print("out of", i, flush=True)\n'
          'print("err of", i, file=sys.stderr, flush=True)\n'
          'sys.exit(int(i) * 5)')
  (tmp_path / 'process_1.log').write_text('an earlier launch\n')
  status = launch.launch(_program(code), num_processes=2,
                         devices_per_process=1, output_dir=str(tmp_path))
  assert status == 5
  for i in range(2):
    assert sorted((tmp_path / f'process_{i}.log').read_text().splitlines()) == [
        f'err of {i}', f'out of {i}']
  err = capfd.readouterr().err
  assert 'Error: process 1 of 2 exited with status 5' in err
  assert f'Fix: see {tmp_path / "process_1.log"},' in err


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
  # Each process records the notice and exits 0, as a preempted stage does.
  code = ('import os, signal, sys, time\n'
          'def stop(*_):\n'
          '  open(os.path.join(%r, os.environ["JAX_PROCESS_ID"]), "w").close()\n'
          '  sys.exit(0)\n'
          'signal.signal(signal.SIGTERM, stop)\n'
          'open(os.path.join(%r, "ready" + os.environ["JAX_PROCESS_ID"]), '
          '"w").close()\n'
          'time.sleep(60)' % (str(tmp_path), str(tmp_path)))
  launcher = subprocess.Popen(
      [sys.executable, '-c',
       'import sys; from vqvae2_jax import launch; sys.exit(launch.launch('
       f'{_program(code)!r}, num_processes=2, devices_per_process=1))'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  deadline = time.time() + 30
  while not all((tmp_path / f'ready{i}').exists() for i in range(2)):
    assert time.time() < deadline
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=30) == 0
  assert (tmp_path / '0').exists() and (tmp_path / '1').exists()


def test_processes_that_ignore_a_notice_are_killed_after_the_grace(tmp_path):
  # Process 0 stops on the notice; process 1 ignores it (as one stuck in a
  # collective would): the launcher must not wait for it for good.
  code = ('import os, signal, sys, time\n'
          'pid = os.environ["JAX_PROCESS_ID"]\n'
          'signal.signal(signal.SIGTERM, (lambda *_: sys.exit(0)) if pid == '
          '"0" else signal.SIG_IGN)\n'
          'open(os.path.join(%r, "ready" + pid), "w").close()\n'
          'time.sleep(120)' % str(tmp_path))
  launcher = subprocess.Popen(
      [sys.executable, '-c',
       'import sys; from vqvae2_jax import launch; sys.exit(launch.launch('
       f'{_program(code)!r}, num_processes=2, devices_per_process=1, '
       'stop_grace_seconds=1.0))'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not all((tmp_path / f'ready{i}').exists() for i in range(2)):
    assert time.time() < deadline
    time.sleep(0.05)
  sent = time.time()
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
  assert time.time() - sent < 10  # 1 s of grace, not the 120 s sleep.
  message = launcher.stderr.read()
  assert 'process(es) [1] of 2 had not stopped 1 s after' in message
  assert '--stop_grace_seconds' in message


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4',
      'JAX_PROCESS_ID': '3'},
     {'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 3}),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '1',
      'JAX_PROCESS_ID': '0'}, None),
    ({'SLURM_NTASKS': '8'}, {}),
    ({'SLURM_NTASKS': '1'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, {}),
    ({'TPU_WORKER_HOSTNAMES': 'a'}, None),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1'}, {}),
])
def test_distributed_settings(environ, expected):
  assert parallel.distributed_settings(environ) == expected


@pytest.mark.parametrize('environ', [
    {'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
    {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2',
     'JAX_PROCESS_ID': '2'},
    {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': 'two',
     'JAX_PROCESS_ID': '0'},
])
def test_incomplete_settings_say_what_to_set(environ):
  with pytest.raises(errors.ConfigError, match='Fix: set all three'):
    parallel.distributed_settings(environ)

r"""Runs a stage as several JAX processes on this machine (multi-host, locally).

  python -m vqvae2_jax.launch --processes=2 --devices_per_process=4 -- \
    --config=configs/fashion_mnist.py:tiny --workdir=/tmp/vqvae2_mp \
    --mode=vqvae

Everything after `--` goes to `python -m vqvae2_jax.main` (or --module). Each
process gets the coordinator address (127.0.0.1 and a free port), the number
of processes and its id (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, read by `parallel.maybe_initialize_distributed`) and its own
fake CPU devices, so the run is a multi-controller JAX job as on a TPU pod
or a GPU cluster, with `jax.process_count() > 1`.

The launcher waits for all processes. When one fails (a non-zero exit, or
killed by a signal), the others cannot go on (they would wait for it in the
next collective), so they are killed at once, and the launcher exits with
the failed process's status (128 + the signal's number when it was killed),
naming it. A SIGTERM or SIGINT (Ctrl-C) to the launcher is passed on to
every process as SIGTERM, a preemption notice: each saves a checkpoint at
the step they agree on and exits 0 (see `parallel.preemption_watch`).

The processes share the launcher's console, so their lines interleave; with
--output_dir=DIR each process writes its whole output (stdout and stderr) to
DIR/process_<i>.log instead, and a failure names the failed process's file.
On the console, the lines that the CPU collectives (Gloo) print as the
processes connect are left out, unless the command asks for libraries'
lines with --verbosity=2 (or more).
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from absl import app
from absl import flags

from vqvae2_jax import parallel

_PROCESSES = flags.DEFINE_integer('processes', 2, 'JAX processes to start.',
                                  lower_bound=1)
_DEVICES = flags.DEFINE_integer(
    'devices_per_process', 4, 'Fake CPU devices of each process.',
    lower_bound=1)
_MODULE = flags.DEFINE_string('module', 'vqvae2_jax.main',
                              'Python module each process runs.')
_PORT = flags.DEFINE_integer('port', 0,
                             "The coordinator's port; 0 picks a free one.")
# Not --log_dir: absl.logging has that flag (its own log files).
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, "Write process i's whole output to "
    "OUTPUT_DIR/process_<i>.log (created if missing; replaces an earlier "
    "launch's) instead of the console.")

_STOP_GRACE = flags.DEFINE_float(
    'stop_grace_seconds', 300.0,
    'After a SIGTERM or Ctrl-C, how long the processes may take to save and '
    'exit before the launcher kills them.', lower_bound=0.0)

_POLL_SECONDS = 0.1


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_environment(base: Mapping[str, str], *, process_id: int,
                        num_processes: int, port: int,
                        devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus its settings."""
  env = dict(base)
  # The settings `parallel.distributed_settings` reads in each process.
  env[parallel.COORDINATOR_ENV] = f'127.0.0.1:{port}'
  env[parallel.NUM_PROCESSES_ENV] = str(num_processes)
  env[parallel.PROCESS_ID_ENV] = str(process_id)
  env['JAX_PLATFORMS'] = 'cpu'
  flag = parallel.HOST_DEVICE_FLAG
  xla_flags = [f for f in env.get('XLA_FLAGS', '').split()
               if not f.startswith(flag)]
  env['XLA_FLAGS'] = ' '.join(xla_flags + [f'{flag}={devices_per_process}'])
  return env


def log_path(output_dir: str, process_id: int) -> str:
  """The file that holds process `process_id`'s output under `output_dir`."""
  return os.path.join(output_dir, f'process_{process_id}.log')


# What Gloo prints (to stdout) as each process connects to its peers.
_GLOO_PREFIX = b'[Gloo] '


def _copy_lines(source: IO[bytes], fd: int, drop: bytes) -> None:
  """Copies a child's output to our file descriptor `fd` line by line,
  without the lines that start with `drop`."""
  with source:
    for line in iter(source.readline, b''):
      if not line.startswith(drop):
        os.write(fd, line)


def asks_for_library_lines(command: Sequence[str]) -> bool:
  """Whether `command` has --verbosity=2 or more (main's libraries' lines)."""
  return any(m and int(m.group(2)) >= 2 for m in (
      re.fullmatch(r'--?(v|verbosity)=(\d+)', a) for a in command))


def describe_exit(status: int) -> str:
  """'exited with status 1' or 'was killed by SIGKILL' (Popen's returncode)."""
  if status < 0:
    try:
      name = signal.Signals(-status).name
    except ValueError:
      name = f'signal {-status}'
    return f'was killed by {name}'
  return f'exited with status {status}'


def launch(command: Sequence[str], *, num_processes: int,
           devices_per_process: int, port: int = 0,
           env: Mapping[str, str] | None = None,
           output_dir: str | None = None,
           stop_grace_seconds: float = 300.0,
           gloo_lines: bool = False) -> int:
  """Runs `command` as `num_processes` JAX processes and waits for them.

  Args:
    command: the program and its arguments (e.g. [python, -m,
      vqvae2_jax.main, --config=..., ...]), the same for every process.
    num_processes: processes to start.
    devices_per_process: fake CPU devices of each.
    port: the coordinator's port; 0 picks a free one.
    env: the processes' base environment; None: this process's.
    output_dir: if set, process i writes its stdout and stderr to
      `log_path(output_dir, i)` (overwritten) instead of the console.
    stop_grace_seconds: after a SIGTERM or SIGINT to the launcher (passed on
      to the processes as a preemption notice), the time they have to save
      and exit; then the launcher kills them (a process stuck in a
      collective would otherwise keep it waiting for good).
    gloo_lines: keep the lines Gloo prints as the processes connect (on the
      console; the files of `output_dir` keep everything).

  Returns:
    0 when every process exited 0; else the status of the first that failed
    (128 + signal number when a signal killed it), after the others were
    killed; 128 + SIGTERM when they outlived the grace period of a notice.
    A failure is reported on stderr, naming the process.
  """
  port = port or free_port()
  base = os.environ if env is None else env
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
  children, copiers = _start(
      command, num_processes=num_processes, port=port,
      devices_per_process=devices_per_process, base_env=base,
      output_dir=output_dir, gloo_lines=gloo_lines)

  notified = []  # When the first notice was passed on.

  def forward(signum, frame):
    del signum, frame
    notified.append(time.monotonic())
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, forward)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while True:
      statuses = [child.poll() for child in children]
      failed = [i for i, s in enumerate(statuses) if s not in (None, 0)]
      if failed:
        # A process killed by a signal is the cause; the others may have
        # failed because it vanished.
        first = min(failed, key=lambda i: (statuses[i] > 0, i))
        _kill(children)
        _join(copiers)  # The processes' last lines come before ours.
        status = statuses[first]
        where = (log_path(output_dir, first) if output_dir else
                 f'the output of process {first} above')
        sys.stderr.write(
            f'Error: process {first} of {num_processes} '
            f'{describe_exit(status)}; the other processes were stopped. '
            f'Fix: see {where}, then run the same command again (every '
            'stage resumes from its last checkpoint).\n')
        sys.stderr.flush()
        return status if status > 0 else 128 - status
      if all(s == 0 for s in statuses):
        return 0
      if notified and time.monotonic() - notified[0] > stop_grace_seconds:
        running = [i for i, s in enumerate(statuses) if s is None]
        _kill(children)
        _join(copiers)
        sys.stderr.write(
            f'Error: process(es) {running} of {num_processes} had not '
            f'stopped {stop_grace_seconds:g} s after the preemption notice '
            '(SIGTERM) and were killed. Fix: run the same command again (it '
            'resumes from the newest checkpoint on disk); if the processes '
            'were busy saving, give them more time with '
            '--stop_grace_seconds.\n')
        sys.stderr.flush()
        return 128 + signal.SIGTERM
      time.sleep(_POLL_SECONDS)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _kill(children)
    _join(copiers)


def _start(command: Sequence[str], *, num_processes: int, port: int,
           devices_per_process: int, base_env: Mapping[str, str],
           output_dir: str | None, gloo_lines: bool
           ) -> tuple[list[subprocess.Popen], list[threading.Thread]]:
  """Starts the processes of `launch`, each in its own process group.

  Returns:
    (the processes, the threads copying their piped output to ours: none
    for those writing to a file of `output_dir`).
  """
  children, copiers = [], []
  for i in range(num_processes):
    output = open(log_path(output_dir, i), 'wb') if output_dir else None
    with output or contextlib.nullcontext():  # The child keeps its own copy.
      children.append(subprocess.Popen(
          list(command),
          env=process_environment(base_env, process_id=i,
                                  num_processes=num_processes, port=port,
                                  devices_per_process=devices_per_process),
          stdout=output or (None if gloo_lines else subprocess.PIPE),
          stderr=(subprocess.STDOUT if output else
                  None if gloo_lines else subprocess.PIPE),
          # Own process groups: a Ctrl-C in the terminal reaches the
          # launcher only, which passes it on as a preemption notice.
          start_new_session=True))
    for stream, fd in ((children[-1].stdout, 1), (children[-1].stderr, 2)):
      if stream is not None:
        copiers.append(threading.Thread(
            target=_copy_lines, args=(stream, fd, _GLOO_PREFIX), daemon=True))
        copiers[-1].start()
  return children, copiers


def _join(copiers: Sequence[threading.Thread]) -> None:
  """Waits until the copiers of the children's output have copied it all."""
  for copier in copiers:
    copier.join(timeout=10)


def _kill(children: Sequence[subprocess.Popen]) -> None:
  """SIGKILLs every child still running (and its process group), then reaps."""
  for child in children:
    if child.poll() is None:
      try:
        os.killpg(child.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for child in children:
    child.wait()


def main(argv: Sequence[str]) -> None:
  command = [sys.executable, '-m', _MODULE.value, *argv[1:]]
  sys.exit(launch(command, num_processes=_PROCESSES.value,
                  devices_per_process=_DEVICES.value, port=_PORT.value,
                  output_dir=_OUTPUT_DIR.value,
                  stop_grace_seconds=_STOP_GRACE.value,
                  gloo_lines=asks_for_library_lines(argv[1:])))


if __name__ == '__main__':
  app.run(main)

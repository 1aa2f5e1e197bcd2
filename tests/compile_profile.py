"""Where the suite's time goes: JAX compilation per test (a pytest plugin).

Most of the suite's time is JAX turning Python into programs, not running
them. Loaded with `-p tests.compile_profile` and VQVAE2_COMPILE_PROFILE
naming a file, every test process (each pytest-xdist worker) appends one
JSON line per test that compiled anything to that file: its programs
compiled by XLA, how many of them were small (under 50 ms, typically one
operation run outside `jit`), and the seconds spent tracing, lowering to
MLIR and compiling (a program read from the compilation cache counts as
compiled, in the time it took to read). The
processes a test starts (`python -m ...`) are not counted: their time is in
the test's duration only. Then

  python -m tests.compile_profile FILE [--top=N]

prints the totals and the tests with the most compile time and the most
small programs. For example, the whole suite as CI runs it:

  VQVAE2_COMPILE_PROFILE=/tmp/profile.jsonl bash scripts/test.sh \
      -p tests.compile_profile
"""

import argparse
import collections
import json
import logging
import os
import re
import sys

_FILE = 'VQVAE2_COMPILE_PROFILE'
_SMALL_SECONDS = 0.05
# jax._src.dispatch's debug line for each XLA compilation (as of jax 0.10).
_COMPILED = re.compile(r'Finished XLA compilation of (.*) in ([\d.]+) sec')
_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s'}

_per_test = collections.defaultdict(collections.Counter)
_current = ['(outside tests)']


class _Compilations(logging.Handler):
  """Counts each XLA compilation JAX's dispatch logs, for the current test."""

  def emit(self, record):
    try:
      found = _COMPILED.match(record.getMessage())
    except Exception:  # pylint: disable=broad-except
      return
    if found:
      seconds = float(found.group(2))
      row = _per_test[_current[0]]
      row['programs'] += 1
      row['compile_s'] += seconds
      if seconds < _SMALL_SECONDS:
        row['small_programs'] += 1


def _on_event(event, duration, **unused_kwargs):
  if event in _EVENTS:
    _per_test[_current[0]][_EVENTS[event]] += duration


def pytest_configure(config):
  del config
  if not os.environ.get(_FILE):
    return
  import jax.monitoring  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  logger = logging.getLogger('jax._src.dispatch')
  logger.setLevel(logging.DEBUG)
  logger.addHandler(_Compilations())
  logger.propagate = False  # Its debug lines stay out of pytest's output.


def pytest_runtest_setup(item):
  _current[0] = item.nodeid


def pytest_unconfigure(config):
  del config
  path = os.environ.get(_FILE)
  if not path or not _per_test:
    return
  lines = [json.dumps({'test': test, **{k: round(v, 3) for k, v in row.items()}})
           for test, row in _per_test.items()]
  # One write per process, appended: xdist's workers share the file.
  with open(path, 'a') as f:
    f.write('\n'.join(lines) + '\n')


def summary(rows: list[dict], top: int) -> list[str]:
  """The report's lines: totals, then the `top` tests by compile time and by
  small programs."""
  total = collections.Counter()
  for row in rows:
    total.update({k: v for k, v in row.items() if k != 'test'})
  spent = lambda r: r.get('trace_s', 0) + r.get('lower_s', 0) + r.get(
      'compile_s', 0)
  lines = [f'{len(rows)} tests; {total["programs"]:.0f} programs compiled '
           f'({total["small_programs"]:.0f} under {_SMALL_SECONDS * 1000:.0f} '
           f'ms); tracing {total["trace_s"]:.1f} s, lowering '
           f'{total["lower_s"]:.1f} s, XLA {total["compile_s"]:.1f} s',
           '', '| seconds | programs | small | test |', '|---|---|---|---|']
  for row in sorted(rows, key=spent, reverse=True)[:top]:
    lines.append(f'| {spent(row):.1f} | {row.get("programs", 0):.0f} | '
                 f'{row.get("small_programs", 0):.0f} | {row["test"]} |')
  lines += ['', 'Most small programs (operations run outside jit):', '']
  for row in sorted(rows, key=lambda r: r.get('small_programs', 0),
                    reverse=True)[:top]:
    lines.append(f'  {row.get("small_programs", 0):5.0f}  {row["test"]}')
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('file')
  parser.add_argument('--top', type=int, default=20)
  args = parser.parse_args(argv)
  with open(args.file) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  print('\n'.join(summary(rows, args.top)))


if __name__ == '__main__':
  sys.exit(main())

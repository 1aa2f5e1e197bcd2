"""tests/compile_profile.py: compile time per test, and its report."""

import json
import os
import subprocess
import sys
import textwrap

from tests import compile_profile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_test_gets_its_programs_and_the_report_ranks_them(tmp_path):
  (tmp_path / 'test_toy.py').write_text(textwrap.dedent('''\
      import jax
      import jax.numpy as jnp
      import numpy as np

      def test_jitted():
        x = np.ones(3, np.float32)
        jax.jit(lambda x: jnp.sin(x) * 2 + 1)(x).block_until_ready()

      def test_eager():
        x = jnp.asarray(np.arange(5, dtype=np.float32))
        (jnp.cos(x) * 3 - x).block_until_ready()  # One program per operation.

      def test_nothing():
        pass
      '''))
  out = tmp_path / 'profile.jsonl'
  env = {**os.environ, 'PYTHONPATH': _ROOT,
         'VQVAE2_COMPILE_PROFILE': str(out)}
  env.pop('PYTEST_XDIST_WORKER', None)
  done = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'tests.compile_profile',
       '-p', 'no:cacheprovider', str(tmp_path / 'test_toy.py')],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  rows = {r['test'].split('::')[-1]: r
          for r in map(json.loads, out.read_text().splitlines())}
  # The jitted function is one program, traced and lowered once.
  assert rows['test_jitted']['programs'] == 1
  assert rows['test_jitted']['trace_s'] > 0 < rows['test_jitted']['lower_s']
  # Eagerly: cos, multiply, subtract, each a program of its own (small).
  assert rows['test_eager']['programs'] >= 3
  assert rows['test_eager']['small_programs'] >= 2
  assert 'test_nothing' not in rows  # Nothing compiled: no line.
  lines = compile_profile.summary(list(rows.values()), top=5)
  assert lines[0].startswith(f'{len(rows)} tests; ')
  table = [l for l in lines if l.startswith('| ') and '::' in l]
  assert len(table) == len(rows)
  most_small = lines[lines.index(
      'Most small programs (operations run outside jit):') + 2]
  assert most_small.endswith('::test_eager')
  # Without the variable the plugin writes nothing.
  del env['VQVAE2_COMPILE_PROFILE']
  out.unlink()
  again = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'tests.compile_profile',
       '-p', 'no:cacheprovider', str(tmp_path / 'test_toy.py')],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stdout + again.stderr
  assert not out.exists()

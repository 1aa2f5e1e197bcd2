"""The host allocator settings: XLA:CPU steps stop faulting in fresh pages."""

import os
import platform
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Repeats a jitted conv forward and backward (buffers of a few MB, allocated
# and freed by XLA's threads every call) and prints page faults per call in
# the quietest of 8 windows of 5 calls.
_PROGRAM = r'''
import resource
from vqvae2_jax import hostmem
print('tuned', hostmem.tune_malloc())
import jax, jax.numpy as jnp
x = jnp.ones((64, 16, 16, 64)); w = jnp.full((3, 3, 64, 64), 0.01)
def loss(w, x):
  for _ in range(3):
    x = jax.nn.relu(jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return jnp.mean(x ** 2)
grad = jax.jit(jax.grad(loss))
for _ in range(3):
  g = grad(w, x)
g.block_until_ready()
windows = []  # Page faults per call in windows of 5 calls.
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    g = grad(w, x)
  g.block_until_ready()
  windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                  - before) / 5)
# The steady state: on a busy machine the scheduling of XLA's threads can
# raise the peak heap (new pages) in some windows, not in all of them.
print('faults', min(windows))
'''


def _run(tuning: str) -> tuple[bool, float]:
  env = {**os.environ, 'PYTHONPATH': _ROOT, 'VQVAE2_MALLOC_TUNING': tuning,
         'XLA_FLAGS': ''}
  out = subprocess.run([sys.executable, '-c', _PROGRAM], env=env, cwd=_ROOT,
                       capture_output=True, text=True, timeout=300, check=True)
  values = dict(line.split() for line in out.stdout.splitlines())
  return values['tuned'] == 'True', float(values['faults'])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='mallopt settings exist only in glibc')
def test_tuned_malloc_reuses_pages_across_steps():
  tuned, tuned_faults = _run('1')
  untuned, untuned_faults = _run('0')
  assert tuned and not untuned  # VQVAE2_MALLOC_TUNING=0 turns it off.
  # Untuned, every call faults in its buffers again (thousands of pages);
  # tuned, the pages of the first calls are reused.
  assert untuned_faults > 1000
  assert tuned_faults < untuned_faults / 10

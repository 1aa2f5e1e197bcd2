"""Host allocator settings that keep XLA:CPU steps free of page faults.

XLA:CPU allocates every op's output and scratch buffers when a step runs and
frees them as it goes, from several threads. glibc's malloc gives each thread
its own arena and hands freed memory back to the kernel (heap trimming,
mmap'd chunks), so every step touches fresh pages again: about 20,000 page
faults and 45 ms of kernel time per stage-1 train step at the Fashion-MNIST
default's size on a 2-core machine, 10-15% of the step. One arena that keeps
what it has (no trimming below 2 GiB, no mmap'd chunks) reuses the same
pages every step; the process holds its peak heap, which a training run
reaches anyway.

`tune_malloc()` sets this with `mallopt` when it is called before JAX and
TensorFlow start their threads (the top of `main`); it does nothing where
libc is not glibc, or when VQVAE2_MALLOC_TUNING=0.
"""

import ctypes
import os
import platform

from absl import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = (
    (_M_ARENA_MAX, 1),  # One arena: threads share (and reuse) its pages.
    (_M_MMAP_MAX, 0),  # Large buffers come from the heap, not fresh mmaps.
    (_M_TRIM_THRESHOLD, 2 << 30),  # Keep up to 2 GiB of free heap.
    (_M_TOP_PAD, 64 << 20),  # Grow the heap in 64 MiB steps.
)

_ENV = 'VQVAE2_MALLOC_TUNING'


def tune_malloc() -> bool:
  """Applies `SETTINGS` to glibc's malloc; True if they took effect.

  Call it once, as early as possible in the process (before JAX runs
  anything): arenas that threads already hold are not merged.
  """
  if os.environ.get(_ENV, '1') == '0':
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    libc = ctypes.CDLL(None)
    ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
  except (OSError, AttributeError):
    return False
  if ok:
    logging.info('glibc malloc: one arena, no trimming below 2 GiB, no mmap '
                 'chunks (%s=0 turns this off).', _ENV)
  return ok

"""Batches of extracted codes for stage 2: shuffled epochs and ordered passes.

The file format and its readers are in `data.codes`; this module only decides
which examples make up each global batch and lays them out on the mesh.

Training batches depend only on (seed, step): the stream is a concatenation
of epochs, each a permutation of the split drawn from (seed, epoch), and step
s takes stream positions [s * B, (s + 1) * B). A run resumed at step N so
yields exactly what an uninterrupted run yields from step N on. Each process
reads only its own rows of every global batch.
"""

from collections.abc import Iterator, Sequence
import itertools
from typing import Any, Protocol

import jax
from jax.sharding import Mesh
import numpy as np

from vqvae2_jax import parallel


class CodeSource(Protocol):
  """What the iterators read: `data.codes.CodeSplit` or a stand-in."""

  num_examples: int

  def read(self, indices: np.ndarray, levels: Sequence[int]
           ) -> dict[str, Any]:
    """{'codes': [int32 [n, h_l, w_l] for l in levels], 'label': int32 [n]}."""


def _process_share(global_batch_size: int, mesh: Mesh) -> tuple[int, int]:
  """(this process's first row in a global batch, its number of rows)."""
  num_processes = jax.process_count()
  if global_batch_size % parallel.num_batch_shards(mesh):
    raise ValueError(
        f'Batch size {global_batch_size} is not divisible by the '
        f'{parallel.num_batch_shards(mesh)} devices of the mesh.')
  local = global_batch_size // num_processes
  return jax.process_index() * local, local


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of epoch `epoch`: a permutation of the examples."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(num_examples: int, seed: int, positions: np.ndarray,
                  cache: dict[int, np.ndarray] | None = None) -> np.ndarray:
  """Examples at `positions` of the endless stream of shuffled epochs.

  Args:
    num_examples: examples in the split (the length of an epoch).
    seed: the data order's seed.
    positions: int [n], positions in the stream (epoch * num_examples +
      offset).
    cache: epoch -> permutation, reused across calls; at most two epochs are
      kept, since one batch spans at most two.

  Returns:
    int64 [n], the example index at each position.
  """
  cache = {} if cache is None else cache
  epochs, offsets = np.divmod(np.asarray(positions, np.int64), num_examples)
  out = np.empty(len(offsets), np.int64)
  for epoch in np.unique(epochs):
    if epoch not in cache:
      if len(cache) >= 2:  # A batch spans at most two epochs.
        cache.pop(min(cache))
      cache[epoch] = epoch_permutation(num_examples, seed, int(epoch))
    sel = epochs == epoch
    out[sel] = cache[epoch][offsets[sel]]
  return out


def create_train_iterator(split: CodeSource, *, global_batch_size: int,
                          mesh: Mesh, seed: int, levels: Sequence[int],
                          start_step: int = 0
                          ) -> Iterator[dict[str, Any]]:
  """Endless shuffled global batches of codes, sharded over `mesh`.

  See the module docstring for the order; `start_step=N` yields exactly what
  an uninterrupted run yields from step N on.

  Args:
    split: from `CodeDataset.split('train')`.
    global_batch_size: B, divisible by the number of devices.
    mesh: the batch is laid out with `parallel.data_sharding(mesh)`.
    seed: the data order's seed.
    levels: which levels' codes each batch holds, e.g. (0, 1).
    start_step: the first step to yield.

  Yields:
    {'codes': [int32 [B, h_l, w_l] for l in levels], 'label': int32 [B]} as
    global `jax.Array`s.
  """
  first, local = _process_share(global_batch_size, mesh)
  cache = {}
  for step in itertools.count(int(start_step)):
    start = step * global_batch_size + first
    indices = train_indices(split.num_examples, seed,
                            np.arange(start, start + local), cache)
    yield parallel.shard_batch(split.read(indices, levels), mesh)


def create_eval_iterator(split: CodeSource, *, global_batch_size: int,
                         mesh: Mesh, levels: Sequence[int],
                         num_examples: int | None = None
                         ) -> Iterator[dict[str, Any]]:
  """One ordered pass over a split in global batches, sharded over `mesh`.

  Args:
    split: a `CodeSplit`.
    global_batch_size: B, divisible by the number of devices.
    mesh: the batch is laid out with `parallel.data_sharding(mesh)`.
    levels: which levels' codes each batch holds.
    num_examples: pass over only the first this many examples (default all).

  Yields:
    Batches as in `create_train_iterator` plus 'mask': bool [B], False on the
    padding rows of the last batch (which repeat example 0).
  """
  n = split.num_examples if num_examples is None else min(
      int(num_examples), split.num_examples)
  first, local = _process_share(global_batch_size, mesh)
  for start in range(0, n, global_batch_size):
    positions = np.arange(start + first, start + first + local)
    valid = positions < n
    batch = split.read(np.where(valid, positions, 0), levels)
    batch['mask'] = valid
    yield parallel.shard_batch(batch, mesh)

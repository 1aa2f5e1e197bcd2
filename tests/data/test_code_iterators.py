"""Batches of codes: shuffled resumable epochs and ordered, masked passes.

The iterators read any `CodeSource`; here an in-memory one whose example i
holds codes filled with i, so every row names its example.
"""

import jax
import numpy as np
import pytest

from vqvae2_jax import parallel
from vqvae2_jax.data import code_iterators

_SHAPES = ((2, 3), (4, 6))  # Non-square on purpose.


class _Source:
  """`num_examples` examples; level l of example i is all i, its label
  i % 10."""

  def __init__(self, num_examples):
    self.num_examples = num_examples
    self.reads = []

  def read(self, indices, levels):
    indices = np.asarray(indices)
    self.reads.append(indices)
    return {'codes': [np.broadcast_to(indices[:, None, None],
                                      (len(indices), *_SHAPES[l])
                                      ).astype(np.int32) for l in levels],
            'label': (indices % 10).astype(np.int32)}


def _host(batch):
  return jax.tree.map(np.asarray, batch)


def _ids(batch):
  return batch['codes'][-1][:, 0, 0]


def test_epoch_permutations_depend_on_seed_and_epoch():
  one = code_iterators.epoch_permutation(23, seed=3, epoch=0)
  assert sorted(one) == list(range(23))
  np.testing.assert_array_equal(
      one, code_iterators.epoch_permutation(23, seed=3, epoch=0))
  assert not np.array_equal(one, code_iterators.epoch_permutation(23, 3, 1))
  assert not np.array_equal(one, code_iterators.epoch_permutation(23, 4, 0))


def test_train_indices_follow_the_epochs_and_keep_two_in_cache():
  perm = [code_iterators.epoch_permutation(10, 5, e) for e in range(3)]
  cache = {}
  # Stream positions 18..23: the end of epoch 1 and the start of epoch 2.
  got = code_iterators.train_indices(10, 5, np.arange(18, 24), cache)
  np.testing.assert_array_equal(got, np.concatenate([perm[1][8:],
                                                     perm[2][:4]]))
  assert set(cache) == {1, 2}
  got = code_iterators.train_indices(10, 5, np.array([5]), cache)
  assert got == perm[0][5]
  assert set(cache) == {0, 2}  # The oldest epoch was dropped.
  # A cache changes nothing but the work.
  np.testing.assert_array_equal(
      code_iterators.train_indices(10, 5, np.arange(18, 24)),
      np.concatenate([perm[1][8:], perm[2][:4]]))


def test_train_iterator_is_deterministic_resumable_and_covers_epochs():
  split = _Source(23)
  mesh = parallel.create_mesh()  # 8 devices.
  kwargs = dict(global_batch_size=8, mesh=mesh, seed=3, levels=(0, 1))
  it = code_iterators.create_train_iterator(split, **kwargs)
  batches = [_host(next(it)) for _ in range(6)]  # 48 = 2 epochs + 2.
  assert batches[0]['codes'][0].shape == (8, 2, 3)
  assert batches[0]['codes'][1].shape == (8, 4, 6)
  first = next(iter(code_iterators.create_train_iterator(split, **kwargs)))
  assert first['label'].sharding == parallel.data_sharding(mesh)
  resumed = code_iterators.create_train_iterator(split, start_step=4,
                                                 **kwargs)
  for want in batches[4:]:
    got = _host(next(resumed))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(g, w)
  # Each epoch is a permutation of the split, and the next epoch another.
  ids = np.concatenate([_ids(b) for b in batches])
  assert sorted(ids[:23]) == list(range(23))
  assert sorted(ids[23:46]) == list(range(23))
  assert list(ids[:23]) != list(ids[23:46])
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches]), ids % 10)
  other = code_iterators.create_train_iterator(split, **{**kwargs, 'seed': 4})
  assert not np.array_equal(_ids(_host(next(other))), _ids(batches[0]))


def test_each_process_reads_only_its_rows(monkeypatch):
  split = _Source(23)
  mesh = parallel.create_mesh()
  kwargs = dict(global_batch_size=8, mesh=mesh, seed=3, levels=(1,))
  want = _ids(_host(next(code_iterators.create_train_iterator(split,
                                                              **kwargs))))
  # Process 1 of 2 reads rows 4..7 of every global batch, and only those.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(parallel, 'shard_batch', lambda batch, mesh: batch)
  split.reads.clear()
  rows = next(code_iterators.create_train_iterator(split, **kwargs))
  np.testing.assert_array_equal(_ids(rows), want[4:])
  assert [len(r) for r in split.reads] == [4]


def test_eval_iterator_is_ordered_and_masks_padding():
  split = _Source(9)
  batches = [_host(b) for b in code_iterators.create_eval_iterator(
      split, global_batch_size=8, mesh=parallel.create_mesh(), levels=(0, 1))]
  assert len(batches) == 2
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(16) < 9)
  ids = np.concatenate([_ids(b) for b in batches])
  np.testing.assert_array_equal(ids[:9], np.arange(9))
  assert (ids[9:] == 0).all()  # Padding repeats example 0.
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches])[:9], np.arange(9))
  first4 = list(code_iterators.create_eval_iterator(
      split, global_batch_size=8, mesh=parallel.create_mesh(), levels=(1,),
      num_examples=4))
  assert len(first4) == 1
  np.testing.assert_array_equal(np.asarray(first4[0]['mask']),
                                np.arange(8) < 4)


def test_batch_not_divisible_by_devices_is_refused():
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    next(code_iterators.create_eval_iterator(
        _Source(9), global_batch_size=12, mesh=parallel.create_mesh(),
        levels=(0,)))

"""Where examples and pixels lie: process shares, eval rows, padded areas."""

import jax
import ml_collections
import numpy as np
import pytest

from vqvae2_jax.data import layout


@pytest.mark.parametrize('n,count', [(17, 2), (17, 4), (8, 4), (3, 4)])
def test_eval_shares_are_consecutive_and_cover_every_example(n, count):
  ranges = [layout.process_range(n, drop_remainder=False, share=(i, count))
            for i in range(count)]
  assert ranges[0][0] == 0 and ranges[-1][1] == n
  for (_, stop), (start, _) in zip(ranges, ranges[1:]):
    assert stop == start
  sizes = [stop - start for start, stop in ranges]
  # The first n % count processes read one more.
  assert sizes == [n // count + (i < n % count) for i in range(count)]


def test_train_shares_drop_the_remainder():
  assert [layout.process_range(17, drop_remainder=True, share=(i, 4))
          for i in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
  # Without a share: this process's, of one process here.
  assert layout.process_range(17, drop_remainder=True) == (0, 17)


def test_original_area_of_padded_and_resized_datasets():
  data = ml_collections.ConfigDict({'name': 'fashion_mnist',
                                    'image_size': 32})
  assert layout.original_area(data) == (2, 2, 28, 28)
  data.image_size = 64
  assert layout.original_area(data) == (18, 18, 28, 28)
  data.image_size = 28  # Nothing padded.
  assert layout.original_area(data) is None
  data.name, data.image_size = 'cifar10', 32
  assert layout.original_area(data) is None


def test_eval_batch_positions_of_one_process():
  np.testing.assert_array_equal(
      layout.eval_batch_positions(10, 8, 0), np.arange(8))
  np.testing.assert_array_equal(
      layout.eval_batch_positions(10, 8, 1), [8, 9, -1, -1, -1, -1, -1, -1])


def test_eval_batch_positions_of_two_processes(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  # 11 examples: process 0 reads 0..5, process 1 reads 6..10; each gives
  # 4 rows of every global batch of 8.
  np.testing.assert_array_equal(
      layout.eval_batch_positions(11, 8, 0), [0, 1, 2, 3, 6, 7, 8, 9])
  np.testing.assert_array_equal(
      layout.eval_batch_positions(11, 8, 1), [4, 5, -1, -1, 10, -1, -1, -1])

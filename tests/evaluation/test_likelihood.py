"""Bits per code: per-batch sums, exact host totals, the baselines."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.evaluation import likelihood


def test_bits_per_code_on_a_hand_made_example():
  # Code probabilities 1/2, 1/4, 1/8, 1/8 at every position.
  log_probs = np.log([0.5, 0.25, 0.125, 0.125])
  logits = jnp.asarray(np.broadcast_to(log_probs + 3.0, (2, 1, 2, 4)))
  targets = jnp.asarray([[[0, 1]], [[2, 3]]], jnp.int32)  # 1+2 and 3+3 bits.
  mask = jnp.asarray([True, False])
  sums = likelihood.batch_sums(logits, targets, mask)
  total = likelihood.add_sums(None, sums)
  metrics = likelihood.summarize(total)
  assert metrics['bits_per_code'] == pytest.approx(1.5, rel=1e-6)
  assert metrics['nll'] == pytest.approx(1.5 * math.log(2), rel=1e-6)
  assert metrics['accuracy'] == 0.5  # Code 0 is the argmax.
  assert metrics['num_codes'] == 2 and metrics['num_examples'] == 1
  # Adding the second example: (1 + 2 + 3 + 3) / 4 bits.
  total = likelihood.add_sums(total, likelihood.batch_sums(
      logits[1:], targets[1:]))
  assert likelihood.summarize(total)['bits_per_code'] == pytest.approx(
      2.25, rel=1e-6)
  assert likelihood.uniform_bits(512) == 9.0
  # Training codes 0,0,1,2 (+1 smoothing over K=4: 3,2,2,1 / 8).
  unigram = likelihood.unigram_bits(np.array([0, 0, 1, 2]), np.array([0, 3]),
                                    4)
  assert unigram['unigram_bits_per_code'] == pytest.approx(
      (-math.log2(3 / 8) - math.log2(1 / 8)) / 2)


def test_unigram_entropy_is_that_of_the_smoothed_frequencies():
  # Codes 0 and 1 twice each over K=2: (2+1, 2+1) / 6, one bit.
  out = likelihood.unigram_bits(np.array([[0, 1], [1, 0]]), np.array([1]), 2)
  assert out['unigram_entropy_bits'] == pytest.approx(1.0)
  assert out['unigram_bits_per_code'] == pytest.approx(1.0)
  # No evaluation codes: 0 bits, not a division by zero.
  assert likelihood.unigram_bits(np.array([0]), np.array([], np.int64),
                                 2)['unigram_bits_per_code'] == 0.0


def test_host_totals_are_float64_and_exact():
  keys = ('nll', 'correct', 'num_codes', 'num_examples')
  total = likelihood.add_sums(None, {k: np.float32(2**24) for k in keys})
  total = likelihood.add_sums(total, {k: np.float32(1.0) for k in keys})
  assert all(isinstance(v, np.float64) for v in total.values())
  # In float32, 2**24 + 1 rounds back to 2**24.
  assert total['num_codes'] == 2**24 + 1
  assert likelihood.summarize(total)['accuracy'] == 1.0


def test_an_empty_split_is_refused():
  empty = likelihood.add_sums(None, likelihood.batch_sums(
      jnp.zeros((1, 1, 1, 3)), jnp.zeros((1, 1, 1), jnp.int32),
      jnp.asarray([False])))
  assert empty['num_codes'] == 0.0
  with pytest.raises(ValueError, match='no codes'):
    likelihood.summarize(empty)


def test_code_weight_table_weighs_by_inverse_frequency_at_mean_one():
  # Codes 0 x5, 1 x2, 2 x1 over K=4; add-one smoothing: 6, 3, 2, 1 / 12.
  codes = np.array([0, 0, 0, 0, 0, 1, 1, 2])
  table = likelihood.code_weight_table(codes, 4, 0.5)
  freq = np.array([6, 3, 2, 1]) / 12
  want = freq ** -0.5
  want /= np.mean(want[codes])
  np.testing.assert_allclose(table, want, rtol=1e-6)
  assert np.mean(table[codes]) == pytest.approx(1.0, rel=1e-6)
  assert table[0] < table[1] < table[2] < table[3]
  np.testing.assert_array_equal(likelihood.code_weight_table(codes, 4, 0.0),
                                np.ones(4, np.float32))


def test_weighted_nll_weighs_each_code_by_its_target_and_skips_padding():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 2, 2, 5)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 5, (3, 2, 2)), jnp.int32)
  weights = jnp.asarray([0.5, 1.0, 2.0, 3.0, 4.0])
  mask = jnp.asarray([True, False, True])
  sums = likelihood.batch_sums(logits, targets, mask, code_weights=weights)
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                            np.asarray(targets)[..., None], -1)[..., 0]
  kept = np.asarray(mask)
  want = np.sum((nll * np.asarray(weights)[np.asarray(targets)])[kept])
  assert float(sums['weighted_nll']) == pytest.approx(want, rel=1e-5)
  assert float(sums['nll']) == pytest.approx(np.sum(nll[kept]), rel=1e-5)
  assert 'weighted_nll' not in likelihood.batch_sums(logits, targets, mask)


def test_the_weighted_loss_is_lowest_at_the_data_times_the_weights():
  """A loss weighing code k by w(k) is minimised, in each context, by
  p(k) proportional to w(k) p_data(k): the contrast c trained in."""
  rng = np.random.default_rng(1)
  k = 6
  p_data = rng.dirichlet(np.ones(k))
  targets = rng.choice(k, size=(1, 40, 50), p=p_data).astype(np.int32)
  empirical = np.bincount(targets.ravel(), minlength=k) / targets.size
  table = likelihood.code_weight_table(targets, k, 0.75)

  def loss(logits):  # One context: the same logits at every position.
    tiled = jnp.broadcast_to(logits, (*targets.shape, k))
    sums = likelihood.batch_sums(tiled, jnp.asarray(targets),
                                 code_weights=table)
    return sums['weighted_nll'] / sums['num_codes']

  grad = jax.grad(loss)
  tilted = np.log(table * empirical)
  assert np.max(np.abs(grad(jnp.asarray(tilted, jnp.float32)))) < 1e-6
  # The plain optimum, the data's own frequencies, is not where it is lowest.
  plain = jnp.asarray(np.log(empirical), jnp.float32)
  assert np.max(np.abs(grad(plain))) > 0.01

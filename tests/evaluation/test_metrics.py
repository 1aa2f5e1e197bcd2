"""Tests of the sample-quality metrics against closed forms."""

from unittest import mock

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial import distance

from vqvae2_jax.evaluation import metrics


def _orthogonal(d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


# FeatureStats


def test_feature_stats_match_numpy_over_uneven_batches():
  rng = np.random.default_rng(0)
  # A large offset: the shifted sums must not lose the small spread.
  x = 1e4 + rng.normal(size=(257, 6)) @ rng.normal(size=(6, 6))
  probs = rng.dirichlet(np.ones(4), size=257)
  stats = metrics.FeatureStats(max_features=100)
  for start, stop in [(0, 3), (3, 3), (3, 90), (90, 200), (200, 257)]:
    stats.add(x[start:stop].astype(np.float64), probs[start:stop])
  assert stats.count == 257 and stats.dim == 6
  np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False),
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_array_equal(stats.features, x[:100])
  np.testing.assert_allclose(stats.probs, probs, rtol=1e-6)


def test_feature_stats_errors_name_the_fix():
  stats = metrics.FeatureStats()
  with pytest.raises(ValueError, match='at least 1'):
    _ = stats.mean
  stats.add(np.ones((1, 3)))
  with pytest.raises(ValueError, match='at least 2'):
    _ = stats.cov
  with pytest.raises(ValueError, match='dimension 4'):
    stats.add(np.ones((2, 4)))
  with pytest.raises(ValueError, match='probs with every batch'):
    stats.add(np.ones((2, 3)), np.full((2, 2), 0.5))
  with pytest.raises(ValueError, match='max_features > 0'):
    _ = stats.features
  with pytest.raises(ValueError, match='NaN'):
    stats.add(np.full((2, 3), np.nan))


# Frechet distance


def test_fid_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(1).normal(size=(500, 16)) * np.arange(1, 17)
  a, b = metrics.FeatureStats(), metrics.FeatureStats()
  a.add(x)
  b.add(x[::-1])
  assert abs(metrics.fid(a, b)) < 1e-8


def test_frechet_distance_diagonal_gaussians():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
  expected = (np.sum((mu1 - mu2) ** 2)
              + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_covariances():
  # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T share eigenvectors, so
  # (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T.
  rng = np.random.default_rng(3)
  q = _orthogonal(10, seed=4)
  a, b = rng.uniform(0.1, 5, size=10), rng.uniform(0.1, 5, size=10)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2,
                                 q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_2x2():
  # For 2x2 M with eigenvalues l1, l2 >= 0:
  # tr M^(1/2) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
  s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
  assert not np.allclose(s1 @ s2, s2 @ s1)
  mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
  tr_sqrt = np.sqrt(np.trace(s1 @ s2)
                    + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * tr_sqrt)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariances_are_finite_and_right():
  # Fewer examples than dimensions: rank-deficient covariances.
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(10, 32)), 0.5 + rng.normal(size=(12, 32))
  mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
  mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
  # Reference: tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), through
  # symmetric eigendecompositions only.
  w, v = np.linalg.eigh(s1)
  root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1),
                                   0, None)))
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * tr_sqrt)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  # Zero eigenvalues of S1 S2 have square roots of size sqrt(rounding).
  assert got == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite():
  s1, s2 = np.diag([1.0, 0.0, 2.0, 0.0]), np.diag([0.0, 0.0, 3.0, 1.0])
  mu1, mu2 = np.zeros(4), np.ones(4)
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def failing_once(matrix):
    calls.append(matrix)
    if len(calls) == 1:
      return np.full(matrix.shape, np.nan)
    return real_sqrtm(matrix)

  eps = 1e-4
  with mock.patch.object(metrics.scipy.linalg, 'sqrtm', failing_once), \
      mock.patch.object(metrics.logging, 'warning') as warning:
    got = metrics.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2 and warning.call_count == 1
  a, b = np.diagonal(s1), np.diagonal(s2)
  expected = 4 + np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps)))
  assert got == pytest.approx(expected, rel=1e-10)

  with mock.patch.object(metrics.scipy.linalg, 'sqrtm',
                         lambda m: np.full(m.shape, np.inf)):
    with pytest.raises(ValueError, match='larger eps'):
      metrics.frechet_distance(mu1, s1, mu2, s2, eps=eps)


def test_frechet_distance_imaginary_parts():
  # A small imaginary part (rounding) is dropped.
  real_sqrtm = scipy.linalg.sqrtm
  with mock.patch.object(metrics.scipy.linalg, 'sqrtm',
                         lambda m: real_sqrtm(m) + 1e-6j * np.eye(len(m))):
    got = metrics.frechet_distance(np.zeros(2), np.diag([4.0, 1.0]),
                                   np.zeros(2), np.diag([1.0, 1.0]))
  assert got == pytest.approx(5 + 2 - 2 * (2 + 1), rel=1e-12)
  # A large one means the inputs were no covariances: diag(1, -1) has the
  # square root diag(1, i).
  with pytest.raises(ValueError, match='imaginary component of 1'):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2),
                             np.eye(2))


def test_frechet_distance_shape_mismatch():
  with pytest.raises(ValueError, match='Fix'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# KID


def test_kid_equals_the_unbiased_statistic_written_out():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(7, 3)), 0.3 + rng.normal(size=(9, 3))
  # With subsets as large as the smaller set, y is subsampled; take both
  # whole by giving them one size.
  y = y[:7]

  def k(a, b):
    return (a @ b / 3 + 1) ** 3

  m = 7
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
  got = metrics.kid(x, y, num_subsets=3, subset_size=100)
  assert got.mean == pytest.approx(expected, rel=1e-12)
  assert got.std == pytest.approx(0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_positive_for_two():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
  same = metrics.kid(a, b, num_subsets=50, subset_size=500)
  # Unbiased: the mean over subsets of 500 (an estimate of the whole-set
  # statistic, whose spread is about a quarter of one subset's) stays within
  # a few subset stds of 0. A biased (V-statistic) estimate would sit about
  # 2 (k(x, x) - k(x, y)) / 500 ~ 0.03 above 0, many stds away.
  assert abs(same.mean) < 3 * same.std
  shifted = metrics.kid(a, b + 0.5, num_subsets=50, subset_size=500)
  assert shifted.mean > 10 * shifted.std
  assert shifted.mean > 100 * abs(same.mean)


# Inception Score


def test_inception_score_confident_balanced_is_num_classes():
  probs = np.eye(10)[np.arange(1000) % 10]
  score = metrics.inception_score(probs, num_splits=10)
  assert score.mean == pytest.approx(10, rel=1e-12)
  assert score.std == pytest.approx(0, abs=1e-12)


def test_inception_score_constant_prediction_is_one():
  row = np.array([0.1, 0.6, 0.0, 0.3])
  score = metrics.inception_score(np.tile(row, (50, 1)), num_splits=5)
  assert score.mean == pytest.approx(1, rel=1e-12)


def test_inception_score_mixed_closed_form():
  # Alternating rows [1, 0] and [0.5, 0.5]: p(y) = [0.75, 0.25].
  probs = np.array([[1.0, 0.0], [0.5, 0.5]] * 20)
  kl_sure = np.log(1 / 0.75)
  kl_even = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
  score = metrics.inception_score(probs, num_splits=4)
  assert score.mean == pytest.approx(np.exp((kl_sure + kl_even) / 2),
                                     rel=1e-12)


def test_inception_score_of_class_ordered_samples_needs_the_shuffle():
  # 100 confident samples per class, class by class (as samples are drawn).
  probs = np.eye(10)[np.repeat(np.arange(10), 100)]
  in_order = metrics.inception_score(probs, num_splits=10)
  assert in_order.mean == pytest.approx(1, rel=1e-12)  # One class per split.
  shuffled = metrics.inception_score(probs, num_splits=10, shuffle_seed=0)
  assert 9.0 < shuffled.mean <= 10.0
  again = metrics.inception_score(probs, num_splits=10, shuffle_seed=0)
  assert again == shuffled  # Deterministic for a seed.


def test_inception_score_rejects_logits():
  with pytest.raises(ValueError, match='softmax'):
    metrics.inception_score(np.random.default_rng(0).normal(size=(20, 3)))


# Precision and recall


def _reference_precision_recall(real, fake, k):
  """Brute force with scipy's distances and full sorts."""
  d_rr = distance.cdist(real, real)
  d_ff = distance.cdist(fake, fake)
  d_fr = distance.cdist(fake, real)
  r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
  r_fake = np.sort(d_ff, axis=1)[:, k]
  precision = np.mean(np.any(d_fr <= r_real[None, :], axis=1))
  recall = np.mean(np.any(d_fr.T <= r_fake[None, :], axis=1))
  return precision, recall


@pytest.mark.parametrize('batch_size', [7, 1024])
def test_precision_recall_matches_brute_force(batch_size):
  rng = np.random.default_rng(8)
  real = rng.normal(size=(300, 12))
  fake = 0.7 + 1.3 * rng.normal(size=(250, 12))
  expected = _reference_precision_recall(real, fake, k=3)
  assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95
  got = metrics.precision_recall(real, fake, k=3, batch_size=batch_size)
  assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_identical_and_far_apart():
  real = np.random.default_rng(9).normal(size=(400, 8))
  assert metrics.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_partial_overlap():
  # Real: uniform on [0, 1]^2. Fake: uniform on [0.75, 1.75] x [0, 0.5].
  # The overlap [0.75, 1] x [0, 0.5] holds 1/4 of the fake and 1/8 of the
  # real points. The balls reach past each support's edge by about one
  # k-NN radius (~0.02 here), hence the tolerance.
  rng = np.random.default_rng(10)
  real = rng.uniform(size=(4000, 2))
  fake = np.array([0.75, 0.0]) + rng.uniform(size=(4000, 2)) * [1.0, 0.5]
  got = metrics.precision_recall(real, fake, k=3, batch_size=500)
  assert got.precision == pytest.approx(0.25, abs=0.04)
  assert got.recall == pytest.approx(0.125, abs=0.04)


def test_precision_recall_rejects_bad_k():
  with pytest.raises(ValueError, match='smaller set'):
    metrics.precision_recall(np.zeros((3, 2)), np.ones((5, 2)), k=3)


def test_nearest_distances_match_brute_force():
  rng = np.random.default_rng(11)
  queries, reference = rng.normal(size=(50, 6)), rng.normal(size=(70, 6))
  expected = distance.cdist(queries, reference).min(axis=1)
  for batch_size in (7, 1024):
    np.testing.assert_allclose(
        metrics.nearest_distances(queries, reference, batch_size), expected,
        rtol=1e-10)
  with pytest.raises(ValueError, match='one extractor'):
    metrics.nearest_distances(queries, reference[:, :5])
  with pytest.raises(ValueError, match='positive size'):
    metrics.nearest_distances(queries, reference, batch_size=0)


def test_copying_tells_copies_new_data_and_strays_apart():
  rng = np.random.default_rng(12)
  train = rng.normal(size=(2000, 4))
  held_out = rng.normal(size=(1000, 4))
  # New draws of the data: like the held-out points.
  new = metrics.copying(train, held_out, rng.normal(size=(1000, 4)))
  assert new.closer == pytest.approx(0.5, abs=0.04)
  assert new.near_share == pytest.approx(0.05, abs=0.02)
  assert new.distance_ratio == pytest.approx(1.0, abs=0.08)
  # Training points a little perturbed: nearer than any held-out point.
  copies = train[:1000] + 1e-3 * rng.normal(size=(1000, 4))
  copied = metrics.copying(train, held_out, copies)
  assert copied.closer > 0.99 and copied.near_share > 0.99
  assert copied.distance_ratio < 0.01
  # Half copies, half new: in between.
  half = metrics.copying(train, held_out, np.concatenate(
      [copies[:500], rng.normal(size=(500, 4))]))
  assert 0.7 < half.closer < 0.8 and 0.45 < half.near_share < 0.6
  # Points off the data: further than held-out points.
  strays = metrics.copying(train, held_out, rng.normal(size=(1000, 4)) + 3)
  assert strays.closer < 0.1 and strays.distance_ratio > 2
  # The held-out points against themselves: 0.5 exactly (ties count half).
  own = metrics.copying(train, held_out, held_out)
  assert own.closer == 0.5 and own.distance_ratio == 1.0
  np.testing.assert_array_equal(own.distances, own.held_out_distances)
  np.testing.assert_allclose(
      new.held_out_distances, distance.cdist(held_out, train).min(axis=1),
      rtol=1e-10)


# Class agreement


def test_class_agreement_hand_made():
  probs = np.array([[0.7, 0.2, 0.1, 0.0],
                    [0.1, 0.5, 0.4, 0.0],
                    [0.3, 0.3, 0.1, 0.3],
                    [0.0, 0.1, 0.2, 0.7]])
  requested = np.array([0, 2, 2, 3])
  # Rows 0 and 3 agree; row 1 has class 2 second, row 2 has it last.
  assert metrics.class_agreement(probs, requested) == 0.5
  assert metrics.class_agreement(probs, requested, top_k=2) == 0.75
  assert metrics.class_agreement(probs, requested, top_k=4) == 1.0
  with pytest.raises(ValueError, match='one integer label per row'):
    metrics.class_agreement(probs, requested[:3])

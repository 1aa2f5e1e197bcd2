"""Sample-quality metrics over classifier features, computed on the host.

Features (Inception-v3 pool features or the domain classifier's) and class
probabilities come off the device batch by batch; everything here is numpy
and scipy in float64:

* `FeatureStats` adds batches up into the mean and covariance that FID needs
  without holding every feature (a running sum and a sum of outer products),
  and keeps the first `max_features` rows for KID and precision/recall.
* `frechet_distance` / `fid`: Heusel et al. 2017.
* `kid`: Binkowski et al. 2018, the unbiased MMD^2 with a cubic kernel,
  averaged over random subsets.
* `inception_score`: Salimans et al. 2016, from any classifier's softmax.
* `precision_recall`: Kynkaanniemi et al. 2019, k-NN manifolds of each set.
* `copying`: whether samples sit nearer the training images than new data
  does (after Meehan et al. 2020's data-copying test).
* `class_agreement`: how often the classifier agrees with the class a
  conditional sample was asked for.
"""

from typing import Any, NamedTuple

from absl import logging
import numpy as np
import scipy.linalg
import scipy.special

from vqvae2_jax import errors


class MetricsInputError(errors.UserError, ValueError):
  """Features or probabilities a metric cannot take (the message says why).

  Also a ValueError, for callers that catch those.
  """


class MeanStd(NamedTuple):
  """A metric averaged over subsets or splits, with its spread."""
  mean: float
  std: float


class PrecisionRecall(NamedTuple):
  """Improved precision (fidelity) and recall (coverage), both in [0, 1]."""
  precision: float
  recall: float


class Manifolds(NamedTuple):
  """Per point, what `precision_recall` averages: whether each fake point
  lies in the real manifold and each real point in the fake one, and each
  point's radius (distance to its k-th nearest neighbour in its own set)."""
  fake_inside: np.ndarray  # bool [n_fake]
  real_inside: np.ndarray  # bool [n_real]
  real_radii: np.ndarray  # float64 [n_real]
  fake_radii: np.ndarray  # float64 [n_fake]


def _as_matrix(x: Any, name: str) -> np.ndarray:
  """x as a float64 [n, d] host array, or a ValueError naming it."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise MetricsInputError(
        f'{name} has shape {x.shape}, not [n, d]. Fix: flatten each '
        'example\'s features (or probabilities) into one row.')
  if not np.all(np.isfinite(x)):
    raise MetricsInputError(
        f'{name} holds NaN or infinite values. Fix: check the model that '
        'produced them (and the images fed to it).')
  return x


def _two_sets(a: Any, b: Any, name_a: str, name_b: str
              ) -> tuple[np.ndarray, np.ndarray]:
  """`_as_matrix` of both, or a ValueError where their dimensions differ."""
  x, y = _as_matrix(a, name_a), _as_matrix(b, name_b)
  if x.shape[1] != y.shape[1]:
    raise MetricsInputError(
        f'{name_a} have dimension {x.shape[1]}, {name_b} {y.shape[1]}. '
        'Fix: compare features of one extractor.')
  return x, y


def _check_batch_size(batch_size: int) -> None:
  """A MetricsInputError unless batch_size >= 1."""
  if batch_size < 1:
    raise MetricsInputError(
        f'batch_size={batch_size}. Fix: pass a positive size.')


class FeatureStats:
  """Running mean and covariance of feature batches, on the host in float64.

  The sums are taken around a shift (the first batch's mean), so the
  covariance keeps its precision when the features' mean is large compared
  with their spread. Memory is O(d^2) whatever the number of examples;
  50,000 x 2048 Inception features need one 2048 x 2048 float64 matrix.

  Class probabilities, when `add` is given them, are kept whole (as float32,
  [n, C]): the Inception Score needs every row. Give them with every batch
  or with none.

  Attributes:
    max_features: how many feature rows (the first ones added) to keep for
      `features`; 0 keeps none. KID and precision/recall use them, so the
      examples should arrive in random order (samples do; shuffle a real
      split, or keep all of it).
  """

  def __init__(self, max_features: int = 0):
    if max_features < 0:
      raise MetricsInputError(
          f'max_features={max_features} is negative. Fix: pass 0 (keep no '
          'features) or the number of rows to keep.')
    self.max_features = max_features
    self._count = 0
    self._shift = None  # [d]
    self._sum = None  # [d], of (x - shift)
    self._outer = None  # [d, d], of (x - shift)^T (x - shift)
    self._kept = []  # float64 [*, d] arrays, max_features rows in all
    self._num_kept = 0
    self._probs = []  # float32 [*, C] arrays
    self._with_probs = None  # set by the first add

  def add(self, features: Any, probs: Any | None = None) -> None:
    """Adds one batch.

    Args:
      features: float [n, d], any array type numpy can read (a jax.Array
        included).
      probs: optional float [n, C] class probabilities of the same examples
        (softmax outputs, rows summing to 1).
    """
    x = _as_matrix(features, 'features')
    if self._shift is None:
      d = x.shape[1]
      self._shift = x.mean(axis=0) if len(x) else np.zeros(d)
      self._sum = np.zeros(d)
      self._outer = np.zeros((d, d))
      self._with_probs = probs is not None
    elif x.shape[1] != self._shift.shape[0]:
      raise MetricsInputError(
          f'features have dimension {x.shape[1]}, earlier batches '
          f'{self._shift.shape[0]}. Fix: feed one feature extractor\'s '
          'outputs to one FeatureStats.')
    if (probs is not None) != self._with_probs:
      raise MetricsInputError(
          'Class probabilities were given with some batches and not others. '
          'Fix: pass probs with every batch or with none.')
    if probs is not None:
      p = _as_matrix(probs, 'probs')
      if len(p) != len(x):
        raise MetricsInputError(
            f'probs has {len(p)} rows, features {len(x)}. Fix: pass the '
            'probabilities of the same examples.')
      if self._probs and p.shape[1] != self._probs[0].shape[1]:
        raise MetricsInputError(
            f'probs have {p.shape[1]} classes, earlier batches '
            f'{self._probs[0].shape[1]}. Fix: use one classifier.')
      self._probs.append(p.astype(np.float32))
    centered = x - self._shift
    self._sum += centered.sum(axis=0)
    self._outer += centered.T @ centered
    self._count += len(x)
    room = self.max_features - self._num_kept
    if room > 0 and len(x):
      self._kept.append(x[:room].copy())
      self._num_kept += len(self._kept[-1])

  @property
  def count(self) -> int:
    """Number of examples added."""
    return self._count

  @property
  def dim(self) -> int:
    """Feature dimension d (an error before the first batch)."""
    self._check_count(1)
    return self._shift.shape[0]

  def _check_count(self, minimum: int) -> None:
    if self._count < minimum:
      raise MetricsInputError(
          f'FeatureStats holds {self._count} examples; this needs at least '
          f'{minimum}. Fix: add more feature batches first.')

  @property
  def mean(self) -> np.ndarray:
    """float64 [d], the features' mean."""
    self._check_count(1)
    return self._shift + self._sum / self._count

  @property
  def cov(self) -> np.ndarray:
    """float64 [d, d], the unbiased (n - 1) covariance."""
    self._check_count(2)
    mean_shifted = self._sum / self._count
    scatter = self._outer - self._count * np.outer(mean_shifted, mean_shifted)
    cov = scatter / (self._count - 1)
    # Rounding can leave it a hair off symmetric; sqrtm prefers it exact.
    return (cov + cov.T) / 2

  @property
  def features(self) -> np.ndarray:
    """float64 [min(count, max_features), d], the first rows added."""
    if not self._kept:
      raise MetricsInputError(
          'FeatureStats kept no features. Fix: construct it with '
          'max_features > 0 (and add at least one batch).')
    return np.concatenate(self._kept)

  @property
  def probs(self) -> np.ndarray:
    """float32 [count, C], every class-probability row added."""
    if not self._probs:
      raise MetricsInputError(
          'FeatureStats holds no class probabilities. Fix: pass probs to '
          'add() with every batch.')
    return np.concatenate(self._probs)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any,
                     eps: float = 1e-6, max_imag: float = 1e-3) -> float:
  """Frechet distance between two Gaussians, in float64.

  d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  Args:
    mu1: float [d], the first mean.
    sigma1: float [d, d], the first covariance.
    mu2: float [d], the second mean.
    sigma2: float [d, d], the second covariance.
    eps: added to both diagonals when the matrix square root of the product
      is not finite (singular covariances, e.g. fewer examples than
      dimensions); the result is then a slight overestimate.
    max_imag: largest imaginary part tolerated on the square root's
      diagonal; rounding leaves a small one, a large one means the inputs
      are not covariances.

  Returns:
    The distance d^2 (FID when the inputs are Inception feature statistics).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if (mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d)
      or sigma2.shape != (d, d)):
    raise MetricsInputError(
        f'Shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, '
        f'sigma2 {sigma2.shape} do not match [d], [d, d]. Fix: compare '
        'statistics of one feature extractor.')
  for name, value in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2),
                      ('sigma2', sigma2)):
    if not np.all(np.isfinite(value)):
      raise MetricsInputError(
          f'{name} holds NaN or infinite values. Fix: check the features '
          'the statistics came from.')

  covmean = _sqrtm_or_none(sigma1 @ sigma2)
  if covmean is None:
    logging.warning(
        'The square root of sigma1 @ sigma2 is not finite (singular '
        'covariances?); adding %g * I to both covariances.', eps)
    offset = eps * np.eye(d)
    covmean = _sqrtm_or_none((sigma1 + offset) @ (sigma2 + offset))
    if covmean is None:
      raise MetricsInputError(
          'The square root of sigma1 @ sigma2 is not finite even with '
          f'eps={eps} added to the diagonals. Fix: pass a larger eps or '
          'use more examples than feature dimensions.')
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > max_imag:
      raise MetricsInputError(
          f'The square root of sigma1 @ sigma2 has an imaginary component '
          f'of {imag:.3g} on its diagonal (tolerance {max_imag:g}). Fix: '
          'pass covariances (symmetric, positive semi-definite) of finite '
          'features.')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
  """scipy's matrix square root, or None where it fails or is not finite."""
  try:
    root = scipy.linalg.sqrtm(matrix)
  except (np.linalg.LinAlgError, ValueError):
    return None
  return root if np.all(np.isfinite(root)) else None


def fid(stats_a: FeatureStats, stats_b: FeatureStats, **kwargs) -> float:
  """Frechet distance between two FeatureStats (kwargs: frechet_distance's)."""
  return frechet_distance(stats_a.mean, stats_a.cov, stats_b.mean,
                          stats_b.cov, **kwargs)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of x, y [m, d] with k(a, b) = (a.b / d + 1)^3."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1) ** 3
  k_yy = (y @ y.T / d + 1) ** 3
  k_xy = (x @ y.T / d + 1) ** 3
  # The U-statistic leaves out k(x_i, x_i): only pairs of distinct examples.
  within = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy)))
  return float(within / (m * (m - 1)) - 2 * k_xy.mean())


def kid(features_a: Any, features_b: Any, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> MeanStd:
  """Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel.

  Each of `num_subsets` rounds draws `subset_size` rows of each set without
  replacement and computes the unbiased MMD^2 with
  k(x, y) = (x.y / d + 1)^3; its expectation is 0 when both sets come from
  one distribution, so single estimates can be slightly negative.

  Args:
    features_a: float [n_a, d].
    features_b: float [n_b, d].
    num_subsets: rounds to average.
    subset_size: rows per set per round; capped at min(n_a, n_b).
    seed: numpy seed of the subset draws.

  Returns:
    MeanStd of the per-subset estimates (std over subsets, not the standard
    error of the mean).
  """
  x, y = _two_sets(features_a, features_b, 'features_a', 'features_b')
  m = min(subset_size, len(x), len(y))
  if m < 2 or num_subsets < 1:
    raise MetricsInputError(
        f'KID needs subsets of at least 2 rows and at least 1 subset (got '
        f'{m} rows, {num_subsets} subsets). Fix: pass more features.')
  rng = np.random.default_rng(seed)
  values = np.array([
      _mmd2_unbiased(x[rng.choice(len(x), m, replace=False)],
                     y[rng.choice(len(y), m, replace=False)])
      for _ in range(num_subsets)])
  return MeanStd(float(values.mean()), float(values.std()))


def _check_probs(probs: Any) -> np.ndarray:
  """probs as float64 [n, C] rows of a distribution, or a ValueError."""
  p = _as_matrix(probs, 'probs')
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
    raise MetricsInputError(
        'probs rows are not probability distributions (negative entries or '
        'sums away from 1). Fix: pass softmax outputs, not logits.')
  return p


def inception_score(probs: Any, num_splits: int = 10,
                    shuffle_seed: int | None = None) -> MeanStd:
  """Inception Score exp(E_x KL(p(y|x) || p(y))), per split of the rows.

  Args:
    probs: float [n, C], a classifier's softmax for each sample.
    num_splits: the rows are cut, in order, into this many near-equal
      splits; p(y) is each split's mean prediction.
    shuffle_seed: when given, the rows are permuted with this seed first.
      Samples drawn class by class must be: cut in order, each split would
      hold one class, its p(y) would match every p(y|x) and the score would
      be about 1 however good the samples.

  Returns:
    MeanStd over splits. 1 <= score <= C: C for confident predictions
    spread evenly over the classes, 1 when every sample gets one
    prediction.
  """
  p = _check_probs(probs)
  if not 1 <= num_splits <= len(p):
    raise MetricsInputError(
        f'num_splits={num_splits} for {len(p)} rows. Fix: use between 1 and '
        'the number of samples.')
  if shuffle_seed is not None:
    p = p[np.random.default_rng(shuffle_seed).permutation(len(p))]
  scores = []
  for part in np.array_split(p, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy(0, .) = 0: a class a sample rules out adds nothing, not NaN.
    kl = (scipy.special.xlogy(part, part)
          - scipy.special.xlogy(part, marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.array(scores)
  return MeanStd(float(scores.mean()), float(scores.std()))


def _squared_distances(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray,
                       b_sq: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2, [len(a), len(b)], from precomputed squared norms."""
  # In place: at 1024 x 10,000 each temporary costs as much as the matmul.
  dist = a @ b.T
  dist *= -2
  dist += a_sq[:, None]
  dist += b_sq[None, :]
  return np.maximum(dist, 0, out=dist)  # rounding can go below 0


def _knn_radii(x: np.ndarray, x_sq: np.ndarray, k: int,
               batch_size: int) -> np.ndarray:
  """Squared distance of each row of x to its k-th nearest other row, [n]."""
  radii = np.empty(len(x))
  for start in range(0, len(x), batch_size):
    stop = min(start + batch_size, len(x))
    dist = _squared_distances(x[start:stop], x, x_sq[start:stop], x_sq)
    # Leaves out the point itself, not its duplicates.
    dist[np.arange(stop - start), np.arange(start, stop)] = np.inf
    radii[start:stop] = np.partition(dist, k - 1, axis=1)[:, k - 1]
  return radii


def precision_recall(real_features: Any, fake_features: Any, k: int = 3,
                     batch_size: int = 1024) -> PrecisionRecall:
  """Improved precision and recall (Kynkaanniemi et al. 2019): the means of
  `manifolds`' fake_inside and real_inside (its arguments and errors)."""
  m = manifolds(real_features, fake_features, k, batch_size)
  return PrecisionRecall(float(m.fake_inside.mean()),
                         float(m.real_inside.mean()))


def manifolds(real_features: Any, fake_features: Any, k: int = 3,
              batch_size: int = 1024) -> Manifolds:
  """Per point, improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its points, each ball's
  radius the distance to the point's k-th nearest neighbour in its own set.
  Precision: the fraction of fake points inside the real manifold. Recall:
  the fraction of real points inside the fake manifold.

  Distances come in float64 blocks of `batch_size` rows against a whole
  set, so memory is O(batch_size * n), and the real-vs-fake block serves
  both directions.

  Args:
    real_features: float [n_real, d].
    fake_features: float [n_fake, d].
    k: neighbour whose distance sets the radius (the paper uses 3).
    batch_size: rows per distance block.

  Returns:
    Manifolds.
  """
  real, fake = _two_sets(real_features, fake_features, 'real_features',
                         'fake_features')
  if not 1 <= k < min(len(real), len(fake)):
    raise MetricsInputError(
        f'k={k} with {len(real)} real and {len(fake)} fake rows. Fix: use '
        '1 <= k < the size of the smaller set.')
  _check_batch_size(batch_size)
  real_sq = np.einsum('ij,ij->i', real, real)
  fake_sq = np.einsum('ij,ij->i', fake, fake)
  real_radii = _knn_radii(real, real_sq, k, batch_size)
  fake_radii = _knn_radii(fake, fake_sq, k, batch_size)
  fake_inside = np.zeros(len(fake), bool)
  real_inside = np.zeros(len(real), bool)
  for start in range(0, len(fake), batch_size):
    stop = min(start + batch_size, len(fake))
    dist = _squared_distances(fake[start:stop], real, fake_sq[start:stop],
                              real_sq)  # [b, n_real]
    fake_inside[start:stop] = np.any(dist <= real_radii[None, :], axis=1)
    real_inside |= np.any(dist <= fake_radii[start:stop, None], axis=0)
  return Manifolds(fake_inside, real_inside, real_radii, fake_radii)


class Copying(NamedTuple):
  """How near a set lies to the training data, against held-out data.

  Each point's distance to its nearest training point; `closer` is the
  probability that a point of the set is nearer its nearest training point
  than a held-out point is (ties count half: the Mann-Whitney U statistic
  over the product of the set sizes). Held-out data gives 0.5 and
  `near_share` 0.05 by construction; a set that copies training points
  gives `closer` near 1 and a `distance_ratio` far below 1; one that lies
  away from the data, `closer` below 0.5 and a ratio above 1.
  """
  closer: float
  # Share of the set nearer a training point than the held-out points' 5th
  # percentile of that distance.
  near_share: float
  # Median distance of the set over the held-out points' median.
  distance_ratio: float
  distances: np.ndarray  # float64 [n_set]
  held_out_distances: np.ndarray  # float64 [n_held_out]


def nearest_distances(queries: Any, reference: Any,
                      batch_size: int = 1024) -> np.ndarray:
  """Euclidean distance of each query row to its nearest reference row,
  [n_queries] float64, in blocks of `batch_size` queries."""
  queries, reference = _two_sets(queries, reference, 'queries', 'reference')
  if not len(reference):
    raise MetricsInputError('reference is empty. Fix: pass its features.')
  _check_batch_size(batch_size)
  q_sq = np.einsum('ij,ij->i', queries, queries)
  r_sq = np.einsum('ij,ij->i', reference, reference)
  out = np.empty(len(queries))
  for start in range(0, len(queries), batch_size):
    stop = min(start + batch_size, len(queries))
    out[start:stop] = _squared_distances(
        queries[start:stop], reference, q_sq[start:stop], r_sq).min(axis=1)
  return np.sqrt(out)


def copying(train_features: Any, held_out_features: Any, features: Any,
            batch_size: int = 1024) -> Copying:
  """How near `features` (samples, say) lie to `train_features` (the
  training data of the model that made them), against
  `held_out_features` (data it never saw): see `Copying`.

  Meehan et al. 2020 test the same distances (per cell of the data, as a
  z-score); here they are summed up over the whole set, which a model that
  copies some of the data and misses elsewhere can hide: read it beside
  recall.
  """
  held_out = nearest_distances(held_out_features, train_features, batch_size)
  dist = nearest_distances(features, train_features, batch_size)
  if not len(held_out) or not len(dist):
    raise MetricsInputError(
        f'{len(dist)} points and {len(held_out)} held-out points. Fix: '
        'pass at least one of each.')
  ranked = np.sort(held_out)
  right = np.searchsorted(ranked, dist, side='right')
  further = len(ranked) - right
  ties = right - np.searchsorted(ranked, dist, side='left')
  closer = float(np.mean(further + 0.5 * ties) / len(ranked))
  near = np.quantile(held_out, 0.05)
  return Copying(closer, float(np.mean(dist < near)),
                 float(np.median(dist) / np.median(held_out)), dist, held_out)


def class_agreement(probs: Any, requested_labels: Any,
                    top_k: int = 1) -> float:
  """Fraction of samples whose requested class is in the classifier's top k.

  Args:
    probs: float [n, C], class probabilities (or logits: only the order of
      each row matters).
    requested_labels: int [n], the class each sample was generated for.
    top_k: 1 compares the argmax; 5 gives top-5 agreement.

  Returns:
    The fraction in [0, 1].
  """
  p = _as_matrix(probs, 'probs')
  labels = np.asarray(requested_labels)
  if labels.shape != (len(p),):
    raise MetricsInputError(
        f'requested_labels has shape {labels.shape}, probs {p.shape}. Fix: '
        'pass one integer label per row of probs.')
  if not 1 <= top_k <= p.shape[1]:
    raise MetricsInputError(
        f'top_k={top_k} with {p.shape[1]} classes. Fix: use 1 <= top_k <= C.')
  if top_k == 1:
    hits = np.argmax(p, axis=1) == labels
  else:
    top = np.argpartition(-p, top_k - 1, axis=1)[:, :top_k]
    hits = np.any(top == labels[:, None], axis=1)
  return float(hits.mean())

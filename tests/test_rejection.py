"""Rejection sampling's selection: candidates per sample, the running top-m
per class, and the domain classifier's scores (the generate-level runs are
in test_api.py)."""

import numpy as np
import pytest

from vqvae2_jax import sampling


@pytest.mark.parametrize('keep, n', [(1.0, 1), (0.5, 2), (0.25, 4),
                                     (0.3, 4), (0.1, 10), (0.05, 20),
                                     (0.01, 100)])
def test_candidates_per_sample(keep, n):
  assert sampling.candidates_per_sample(keep) == n


@pytest.mark.parametrize('keep', [0.0, -0.5, 1.5])
def test_candidates_per_sample_refuses_keep_outside_0_1(keep):
  with pytest.raises(ValueError, match=r'Fix: use a fraction in \(0, 1\]'):
    sampling.candidates_per_sample(keep)


def _brute_force(labels, scores, quota):
  """Indices of each class's top quota[c] (ties: earlier), arrival order."""
  kept = []
  for c, m in quota.items():
    idx = np.flatnonzero(labels == c)
    ranked = sorted(idx, key=lambda i: (-scores[i], i))[:m]
    kept.extend(ranked)
  return np.sort(np.asarray(kept, int))


@pytest.mark.parametrize('batch', [1, 7, 64, 1000])
def test_top_per_class_equals_brute_force(batch):
  rng = np.random.default_rng(batch)
  n = 300
  labels = rng.integers(0, 4, n)
  # Few distinct scores: many ties, which the earlier candidate must win.
  scores = rng.integers(0, 5, n).astype(np.float64)
  codes = rng.integers(0, 512, (n, 2, 2))
  quota = {0: 5, 1: 1, 2: 30, 3: 200}  # Class 3 keeps all it has.
  selector = sampling.TopPerClass(quota)
  for begin in range(0, n, batch):
    sl = slice(begin, begin + batch)
    selector.add([codes[sl], np.arange(n)[sl]], labels[sl], scores[sl])
    _, kept_labels, _, _ = selector.result()
    # Memory: never more than the quota of any class.
    for c, m in quota.items():
      assert np.sum(kept_labels == c) <= m
  (kept_codes, ids), kept_labels, kept_scores, index = selector.result()
  want = _brute_force(labels, scores, quota)
  np.testing.assert_array_equal(index, want)
  np.testing.assert_array_equal(ids, want)  # Arrays travel with their rows.
  np.testing.assert_array_equal(kept_codes, codes[want])
  np.testing.assert_array_equal(kept_labels, labels[want])
  np.testing.assert_array_equal(kept_scores, scores[want])
  assert selector.num_seen == n


def test_top_per_class_unconditional_and_bad_input():
  selector = sampling.TopPerClass({-1: 2})
  selector.add([np.array([10, 11, 12])], np.full(3, -1), [0.1, 0.9, 0.5])
  selector.add([np.array([13])], np.full(1, -1), [0.95])
  (values,), labels, scores, index = selector.result()
  np.testing.assert_array_equal(values, [11, 13])
  np.testing.assert_array_equal(labels, [-1, -1])
  np.testing.assert_array_equal(index, [1, 3])
  np.testing.assert_allclose(scores, [0.9, 0.95])
  with pytest.raises(ValueError, match='quota names only'):
    selector.add([np.array([1])], np.array([3]), [1.0])
  with pytest.raises(ValueError, match='one each per candidate'):
    selector.add([np.array([1, 2])], np.full(2, -1), [1.0])
  with pytest.raises(ValueError, match='No candidates'):
    sampling.TopPerClass({0: 1}).result()


def test_classifier_scorer_scores_the_class_or_the_confidence(
    tmp_path, save_classifier_checkpoint):
  """p(requested class | image), or max_c p(c | image) without a label."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from configs import fashion_mnist
  from vqvae2_jax import builders
  from vqvae2_jax import generate
  from vqvae2_jax import parallel
  from vqvae2_jax.train import classifier_trainer
  # pylint: enable=g-import-not-at-top
  config = fashion_mnist.get_config('tiny')
  mesh = parallel.create_mesh(config.mesh)
  with pytest.raises(FileNotFoundError, match='--mode=classifier'):
    generate.classifier_scorer(config, str(tmp_path), mesh)
  # An untrained classifier saved as step 5: its probabilities are far from
  # uniform enough to tell a class's probability from the maximum.
  progs = classifier_trainer.programs(config, mesh)
  state = save_classifier_checkpoint(config, str(tmp_path), mesh, step=5)

  scorer, about = generate.classifier_scorer(config, str(tmp_path), mesh)
  assert about == {
      'step': 5,
      'fingerprint': builders.classifier_fingerprint(config)}
  rng = np.random.default_rng(0)
  n = 13  # Not a multiple of the 8 devices: the last batch is padded.
  size, channels = config.data.image_size, config.data.channels
  images = rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, config.data.num_classes, n).astype(np.int32)
  padded = np.zeros((16, *images.shape[1:]), np.float32)
  padded[:n] = images
  predict = jax.jit(lambda params, x: jax.nn.softmax(progs.model.apply(
      {'params': params}, x)[1].astype(jnp.float32), axis=-1))
  probs = predict(state.params, jax.device_put(
      padded, parallel.data_sharding(mesh)))
  probs = np.asarray(probs, np.float64)[:n]
  assert not np.allclose(probs[np.arange(n), labels], probs.max(axis=-1))
  conditional = scorer(images, [], labels)
  np.testing.assert_allclose(conditional, probs[np.arange(n), labels],
                             rtol=1e-6)
  np.testing.assert_allclose(scorer(images, [], None), probs.max(axis=-1),
                             rtol=1e-6)

"""The judge network: shapes, batch statistics, flip averaging, crops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import judge as judge_lib


def _tiny(**kwargs):
  return judge_lib.Judge(num_classes=10, widths=(4, 8, 16),
                         convs_per_stage=(1, 2, 1), **kwargs)


def _images(b=3, size=32):
  return jax.random.uniform(jax.random.PRNGKey(1), (b, size, size, 1),
                            minval=-1.0, maxval=1.0)


def test_features_and_logits_shapes():
  model = _tiny(crop=(2, 2, 28, 28))
  variables = model.init(jax.random.PRNGKey(0), _images(1))
  assert set(variables) == {'params', 'batch_stats'}
  features, logits = model.apply(variables, _images(5))
  assert features.shape == (5, 16) and logits.shape == (5, 10)
  assert features.dtype == logits.dtype == jnp.float32
  # Pooled after a relu.
  assert float(jnp.min(features)) >= 0.0


def test_training_updates_batch_stats_and_evaluation_does_not():
  model = _tiny()
  variables = model.init(jax.random.PRNGKey(0), _images(1))
  _, new = model.apply(variables, _images(4), train=True,
                       mutable=['batch_stats'])
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
      new['batch_stats']))
  assert all(changed)
  # Evaluation uses the running statistics: a row's output does not depend
  # on the rest of the batch.
  images = _images(4)
  _, whole = model.apply(variables, images)
  _, alone = model.apply(variables, images[:1])
  np.testing.assert_allclose(whole[:1], alone, rtol=1e-5, atol=1e-5)


def test_flip_average_cannot_tell_mirror_images_apart():
  plain, averaged = _tiny(), _tiny(flip_average=True)
  variables = plain.init(jax.random.PRNGKey(0), _images(1))
  images = _images(2)
  mirrored = images[:, :, ::-1]
  f, l = averaged.apply(variables, images)
  fm, lm = averaged.apply(variables, mirrored)
  np.testing.assert_allclose(f, fm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l, lm, rtol=1e-5, atol=1e-6)
  # It is the mean of both views of the plain network.
  _, lp = plain.apply(variables, images)
  _, lpm = plain.apply(variables, mirrored)
  np.testing.assert_allclose(l, (lp + lpm) / 2, rtol=1e-5, atol=1e-6)
  assert not np.allclose(lp, lpm)


def test_bad_shapes_are_clear():
  model = _tiny(crop=(2, 2, 28, 28))
  variables = model.init(jax.random.PRNGKey(0), _images(1))
  with pytest.raises(ValueError, match='does not fit'):
    model.apply(variables, _images(1, size=28))
  with pytest.raises(ValueError, match=r'images \[b, h, w, c\]'):
    model.apply(variables, jnp.zeros((32, 32, 1)))
  with pytest.raises(ValueError, match='convs_per_stage'):
    judge_lib.Judge(10, widths=(4, 8), convs_per_stage=(1,)).init(
        jax.random.PRNGKey(0), _images(1))

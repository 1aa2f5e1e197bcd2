"""The domain classifier's modules: shapes, the crop, the augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import classifier as classifier_lib


def test_crop_images_cuts_the_window_or_keeps_the_whole():
  images = jnp.arange(2 * 5 * 6 * 1, dtype=jnp.float32).reshape(2, 5, 6, 1)
  out = classifier_lib.crop_images(images, (1, 2, 3, 4), 'Net')
  np.testing.assert_array_equal(out, images[:, 1:4, 2:6])
  assert classifier_lib.crop_images(images, None, 'Net') is images
  with pytest.raises(ValueError, match=r'Crop \(3, 0, 3, 6\) does not fit'):
    classifier_lib.crop_images(images, (3, 0, 3, 6), 'Net')
  with pytest.raises(ValueError, match=r'^Net expects images \[b, h, w, c\]'):
    classifier_lib.crop_images(images[0], None, 'Net')


def test_residual_block_starts_as_the_identity_and_halves_with_stride_2():
  block = classifier_lib.ResidualBlock(features=8, num_groups=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 8))
  variables = block.init(jax.random.PRNGKey(1), x)
  # Zero-initialised last convolution: the block is the identity at first.
  np.testing.assert_array_equal(block.apply(variables, x), x)
  down = classifier_lib.ResidualBlock(features=16, strides=2, num_groups=4)
  out = down.apply(down.init(jax.random.PRNGKey(1), x), x)
  assert out.shape == (2, 3, 3, 16)


def test_model_shapes_and_stage_strides():
  # Shapes only (`jax.eval_shape`): nothing is compiled or run.
  model = classifier_lib.Classifier(num_classes=7, width=8,
                                    stage_sizes=(1, 2, 1))
  images = jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.float32)
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(model.init, key, images)
  features, logits = jax.eval_shape(model.apply, variables, images)
  assert features.shape == (3, 32) and logits.shape == (3, 7)
  # The first stage keeps the map when downsample_first is off: more work,
  # same output shapes.
  full = classifier_lib.Classifier(num_classes=7, width=8,
                                   stage_sizes=(1, 2, 1),
                                   downsample_first=False)
  intermediates = jax.eval_shape(
      lambda v, x: full.apply(v, x, capture_intermediates=True),
      jax.eval_shape(full.init, key, images), images)[1]['intermediates']
  assert intermediates['ResidualBlock_0']['__call__'][0].shape == (
      3, 32, 32, 8)
  with pytest.raises(ValueError, match='images'):
    jax.eval_shape(model.apply, variables,
                   jax.ShapeDtypeStruct((32, 32, 1), jnp.float32))


def test_crop_looks_only_at_the_source_area():
  model = classifier_lib.Classifier(num_classes=3, width=8, stage_sizes=(1,),
                                    crop=(2, 2, 28, 28))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 1))
  variables = model.init(jax.random.PRNGKey(0), images)
  border = images.at[:, :2].set(5.0).at[:, :, 30:].set(-5.0)
  np.testing.assert_array_equal(model.apply(variables, images)[1],
                                model.apply(variables, border)[1])
  inside = images.at[:, 2, 2].set(5.0)
  assert not np.allclose(model.apply(variables, images)[1],
                         model.apply(variables, inside)[1])
  with pytest.raises(ValueError, match='does not fit'):
    model.apply(variables, images[:, :20, :20])


def test_augment_shifts_and_flips_per_example():
  images = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6, 1)
  same = classifier_lib.augment(jax.random.PRNGKey(0), images, max_shift=0,
                                flip=False)
  np.testing.assert_array_equal(same, images)
  flipped = [classifier_lib.augment(jax.random.PRNGKey(k), images,
                                    max_shift=0, flip=True)
             for k in range(16)]
  for out in flipped:
    for i in range(2):  # Each image is either itself or its mirror image.
      assert (np.array_equal(out[i], images[i])
              or np.array_equal(out[i], images[i, :, ::-1]))
  assert any(not np.array_equal(out, images) for out in flipped)
  shifted = classifier_lib.augment(jax.random.PRNGKey(3), images, max_shift=2,
                                   flip=False)
  for i in range(2):
    # A shifted copy: every nonzero value of the output sits in the input at
    # one common offset, and the rest is zero padding.
    out, src = np.asarray(shifted[i, ..., 0]), np.asarray(images[i, ..., 0])
    matches = []
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        padded = np.pad(src, 2)[2 - dy:8 - dy, 2 - dx:8 - dx]
        matches.append(np.array_equal(padded, out))
    assert sum(matches) == 1



"""The domain classifier: a small ResNet over the dataset's own images.

It serves four ends: its pooled features give Fréchet distances on small
datasets (as the "Fréchet LeNet distance" does for MNIST), its softmax gives
Inception-Score-like scores and the class agreement of conditional samples,
it scores candidates in rejection sampling, and, trained on samples only, it
is the model of the Classification Accuracy Score (CAS).

Shapes, for a [b, 28, 28, 1] batch (a padded Fashion-MNIST image cropped
to its source area), width 32 and 3 stages: the stem keeps 28x28x32, the
stages give 14x14x32, 7x7x64 and 4x4x128 (each halves the map: cheap enough
to train in minutes on a CPU), the pooled features are [b, 128] and the
logits [b, num_classes].
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def crop_images(images: Array, crop: Sequence[int] | None, who: str
                ) -> Array:
  """[b, h, w, c] images cut to `crop` = (top, left, height, width).

  Args:
    images: float [b, h, w, c].
    crop: the area to keep (e.g. Fashion-MNIST's 28x28 source area of a
      32x32 canvas), or None for the whole image.
    who: the network's name, for the error messages.

  Returns:
    [b, height, width, c].
  """
  if images.ndim != 4:
    raise ValueError(f'{who} expects images [b, h, w, c], got shape '
                     f'{images.shape}.')
  if crop is None:
    return images
  top, left, height, width = crop
  if top + height > images.shape[1] or left + width > images.shape[2]:
    raise ValueError(f'Crop {tuple(crop)} does not fit images of shape '
                     f'{images.shape}.')
  return images[:, top:top + height, left:left + width]


class ResidualBlock(nn.Module):
  """Pre-activation residual block: (norm, relu, 3x3 conv) twice.

  Attributes:
    features: output channels.
    strides: 1, or 2 to halve the spatial size (the shortcut is then a strided
      1x1 convolution, as it is whenever the channel count changes).
    num_groups: groups of the group normalisations.
  """
  features: int
  strides: int = 1
  num_groups: int = 8

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shortcut = x
    y = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.strides,
                         use_bias=False, name='shortcut')(y)
    y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(y)
    y = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(y))
    # Zero-initialised last conv: each block starts as the identity, which
    # makes short training runs converge faster.
    y = nn.Conv(self.features, (3, 3), use_bias=False,
                kernel_init=nn.initializers.zeros)(y)
    return shortcut + y


class Classifier(nn.Module):
  """ResNet classifier returning pooled features and class logits.

  Group normalisation (not batch norm) keeps the model free of batch
  statistics: its outputs do not depend on the batch or the mesh.

  Attributes:
    num_classes: classes of the dataset.
    width: channels of the first stage; stage s has width * 2**s.
    stage_sizes: residual blocks per stage; every stage halves the spatial
      size (its first block has stride 2), the first only when
      `downsample_first`.
    num_groups: groups of the group normalisations.
    downsample_first: whether the first stage halves the map too.
    crop: (top, left, height, width) of the window the classifier looks at,
      or None for the whole image. MNIST-family images are 28x28 sources
      padded with black: the padding carries no class information and
      costs a third of the compute.
  """
  num_classes: int
  width: int = 32
  stage_sizes: Sequence[int] = (1, 1, 1)
  num_groups: int = 8
  downsample_first: bool = True
  crop: tuple[int, int, int, int] | None = None

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    """Features and logits of a batch of images.

    Args:
      images: float [b, h, w, c] in [-1, 1].

    Returns:
      (features float32 [b, width * 2**(stages - 1)],
       logits float32 [b, num_classes]).
    """
    images = crop_images(images, self.crop, 'Classifier')
    x = nn.Conv(self.width, (3, 3), use_bias=False, name='stem')(
        images.astype(jnp.float32))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = ResidualBlock(self.width * 2**stage,
                          strides=(2 if stage or self.downsample_first
                                   else 1) if block == 0 else 1,
                          num_groups=self.num_groups)(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='head')(features)
    return features, logits


def augment(rng: Array, images: Array, *, max_shift: int, flip: bool
            ) -> Array:
  """Random translations (zero padding) and horizontal flips, per example.

  Args:
    rng: PRNG key; each example draws its own shift and flip from it.
    images: float [b, h, w, c].
    max_shift: largest shift in pixels along each axis; 0 disables.
    flip: flip each image left-right with probability 1/2.

  Returns:
    float [b, h, w, c]: the augmented images.
  """
  b, h, w, _ = images.shape
  shift_rng, flip_rng = jax.random.split(rng)
  if max_shift > 0:
    pad = max_shift
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(shift_rng, (b, 2), 0, 2 * pad + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                   (h, w, image.shape[-1]))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_rng, 0.5, (b, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1], images)
  return images


def features_and_probabilities(module: nn.Module, variables: Any,
                               images: Array) -> tuple[Array, Array]:
  """(pooled features, float32 softmax) of a classifier's images (the
  domain classifier, or the judge built on it), for a ruler.

  Its products run in full float32 on every backend: a GPU's default
  (TF32) would move the features by about 1e-3 against a CPU's, and a
  ruler's figures (and the real-features files written on one machine and
  read on another) are comparable only if it computes the same everywhere.
  On a CPU the result is that of the default precision, bit for bit.
  """
  with jax.default_matmul_precision('highest'):
    features, logits = module.apply(variables, images)
  return features, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

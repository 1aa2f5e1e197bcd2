"""The judge: a fixed network that measures samples, apart from the scorer.

The domain classifier (`models.classifier`, a pre-activation ResNet with
group norm, one per workdir) picks rejection-sampling candidates; a network
that picked the samples cannot fairly measure them, and one trained per
workdir is not the same ruler in two workdirs. The judge is of another
family (a plain VGG-style stack: conv, batch norm, relu, max pooling, no
residual connections), trained once with augmentation and another seed, and
shipped with the package (`evaluation.judges`). Its pooled features serve
FID, KID and precision/recall; its softmax serves the Inception Score and
class agreement.

Shapes, for a [b, 32, 32, 1] batch (padded Fashion-MNIST) cropped to its
28x28 source area, widths (32, 64, 128) and (1, 2, 2) convolutions per
stage: the stages give 28x28x32, 14x14x64 and 7x7x128 (max pooling halves
the map between stages), the pooled features are [b, 128] and the logits
[b, num_classes].
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax.models import classifier

Array = jax.Array


class Judge(nn.Module):
  """VGG-style classifier returning pooled features and class logits.

  Batch normalisation holds running statistics in the `batch_stats`
  collection; evaluation (train=False) uses them, so outputs never depend on
  the batch or the mesh.

  Attributes:
    num_classes: classes of the dataset.
    widths: channels of each stage; every stage after the first starts with
      a 2x2 max pooling.
    convs_per_stage: 3x3 convolutions (each with batch norm and relu) of
      each stage.
    dropout: dropout rate before the head, in training only.
    crop: (top, left, height, width) of the window the judge looks at, or
      None for the whole image (the padding of MNIST-family images carries
      no class information).
    flip_average: in evaluation, average the features and logits of each
      image and its mirror image: a ruler that cannot tell the two apart,
      as fits classes that flips do not change (it was trained with flips).
  """
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  convs_per_stage: Sequence[int] = (1, 2, 2)
  dropout: float = 0.0
  crop: tuple[int, int, int, int] | None = None
  flip_average: bool = False

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False
               ) -> tuple[Array, Array]:
    """Features and logits of a batch of images.

    Args:
      images: float [b, h, w, c] in [-1, 1].
      train: batch statistics and dropout (needs the 'dropout' RNG stream
        when dropout > 0, and `batch_stats` mutable); False uses the running
        statistics.

    Returns:
      (features float32 [b, widths[-1]], logits float32 [b, num_classes]).
    """
    images = classifier.crop_images(images, self.crop, 'Judge')
    if len(self.convs_per_stage) != len(self.widths):
      raise ValueError(f'Judge has {len(self.widths)} widths and '
                       f'{len(self.convs_per_stage)} convs_per_stage.')
    x = images.astype(jnp.float32)
    batch = x.shape[0]
    averaged = self.flip_average and not train
    if averaged:
      # One pass over both views: running statistics keep each row's output
      # independent of the others.
      x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    for stage, (width, convs) in enumerate(zip(self.widths,
                                                self.convs_per_stage)):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(convs):
        x = nn.Conv(width, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
    features = jnp.mean(x, axis=(1, 2))
    y = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name='head')(y)
    if averaged:
      features = (features[:batch] + features[batch:]) / 2
      logits = (logits[:batch] + logits[batch:]) / 2
    return features, logits

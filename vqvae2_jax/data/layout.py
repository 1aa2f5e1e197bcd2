"""Where examples and pixels lie: shares, evaluation rows, padded areas.

The arithmetic of `input_pipeline`'s layout, apart from it because it needs
no TensorFlow: the Pipeline, the trainers and code extraction use it on
machines (accelerator images) that have JAX and not TensorFlow.
"""

import jax
import ml_collections
import numpy as np

# Datasets of 28x28 digits/clothes: padded (not resized) to the image size.
PAD_DATASETS = ('mnist', 'fashion_mnist', 'kmnist', 'emnist')
PAD_SOURCE_SIZE = 28  # Side of the MNIST family's images.


def process_range(n: int, drop_remainder: bool,
                  share: tuple[int, int] | None = None) -> tuple[int, int]:
  """[start, stop) of this process's share of n examples.

  The rule of `tfds.split_for_jax_process`, also used for image folders:
  consecutive shares, one per process in process order.

  Args:
    n: examples in the split.
    drop_remainder: give every process n // process_count examples (for
      training, so every process takes the same number of steps per epoch);
      otherwise the first n % process_count processes get one more, so that
      evaluation covers every example.

    share: (index, count) of the share; None: (this process, processes).

  Returns:
    (start, stop) of this process's examples.
  """
  index, count = share or (jax.process_index(), jax.process_count())
  per, extra = divmod(n, count)
  if drop_remainder or not extra:
    return index * per, (index + 1) * per
  start = index * per + min(index, extra)
  return start, start + per + (1 if index < extra else 0)


def original_area(data_config: ml_collections.ConfigDict
                  ) -> tuple[int, int, int, int] | None:
  """Where the source image lies in a preprocessed one, if it was padded.

  MNIST-family images (28x28) are centred on a black canvas of the image
  size; the rest of the canvas is padding, nearly free to reconstruct, so
  reconstruction metrics are also reported over this area (the protocol of
  the PyTorch ports).

  Returns:
    (top, left, height, width) of the source image, or None when images fill
    the whole canvas (resized datasets, image folders).
  """
  size = int(data_config.image_size)
  if data_config.name not in PAD_DATASETS or size <= PAD_SOURCE_SIZE:
    return None
  offset = (size - PAD_SOURCE_SIZE) // 2
  return (offset, offset, PAD_SOURCE_SIZE, PAD_SOURCE_SIZE)


def eval_batch_positions(num_examples: int, global_batch_size: int,
                         batch_index: int) -> np.ndarray:
  """Which example of the split each row of an evaluation batch holds.

  `input_pipeline.create_eval_iterator`'s layout: process p's rows of every
  global batch come from its share of the split, in order, so with several
  processes a batch holds several runs of consecutive examples, not one.

  Args:
    num_examples: examples in the split.
    global_batch_size: B, as given to `input_pipeline.create_eval_iterator`.
    batch_index: which batch of the pass (0 first).

  Returns:
    int64 [B]: the example's index in the split, -1 on padding rows.
  """
  count = jax.process_count()
  local = global_batch_size // count
  positions = np.full(global_batch_size, -1, np.int64)
  for p in range(count):
    start, stop = process_range(num_examples, drop_remainder=False,
                                share=(p, count))
    rows = start + batch_index * local + np.arange(local)
    positions[p * local:(p + 1) * local] = np.where(rows < stop, rows, -1)
  return positions

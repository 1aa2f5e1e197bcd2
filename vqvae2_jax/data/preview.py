"""--mode=data: prepares the dataset and writes a preview of the input.

Writes workdir/data/preview.png (the first training batch, as the model sees
it after preprocessing) and workdir/data/summary.json (examples per split,
image shape, label counts of the preview batch). Running it first turns a
missing dataset or a wrong image size into an error within seconds.
"""

import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from vqvae2_jax import files
from vqvae2_jax import images as images_lib
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import input_pipeline

_PREVIEW_IMAGES = 64


def preview_data(config: ml_collections.ConfigDict,
                 workdir: str) -> dict[str, Any]:
  """Prepares `config.data` and writes a preview grid and a summary.

  Returns:
    The summary: examples per split, image shape, value range and the label
    histogram of the previewed batch.
  """
  data = config.data
  mesh = parallel.create_mesh(config.mesh)
  splits = {split: input_pipeline.num_examples(data, split)
            for split in (data.train_split, data.eval_split)}
  # A multiple of the device count, so the batch can be sharded.
  batch_size = -(-_PREVIEW_IMAGES // jax.device_count()) * jax.device_count()
  batch = next(input_pipeline.create_train_iterator(
      data, global_batch_size=batch_size, mesh=mesh, seed=config.seed))
  images = np.asarray(batch['image'])[:_PREVIEW_IMAGES]
  labels = np.asarray(batch['label'])[:_PREVIEW_IMAGES]
  out_dir = workdir_lib.Workdir(workdir).data
  images_lib.write_image_grid(os.path.join(out_dir, 'preview.png'), images,
                          num_cols=16)
  summary = {
      'dataset': data.name,
      'examples': splits,
      'image_shape': list(images.shape[1:]),
      'pixel_min': float(images.min()),
      'pixel_max': float(images.max()),
      'preview_label_counts': np.bincount(
          labels, minlength=max(int(data.num_classes), 1)).tolist(),
  }
  files.write_json_once(os.path.join(out_dir, 'summary.json'), summary)
  logging.info('Data %s: %s; preview in %s', data.name, summary, out_dir)
  return summary

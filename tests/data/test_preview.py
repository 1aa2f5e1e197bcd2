"""--mode=data: the preview grid and summary of the prepared dataset."""

import json
import os

from PIL import Image

from configs import fashion_mnist
from vqvae2_jax import stages


def test_preview_writes_grid_and_summary(fashion_data_dir, tmp_path):
  config = fashion_mnist.get_config('tiny')
  config.data.data_dir = fashion_data_dir
  summary = stages.run('data', config, str(tmp_path))['data']
  assert summary['examples'] == {'train': 60000, 'test': 10000}
  assert summary['image_shape'] == [32, 32, 1]
  assert summary['pixel_min'] == -1.0 and summary['pixel_max'] <= 1.0
  assert sum(summary['preview_label_counts']) == 64
  with open(tmp_path / 'data' / 'summary.json') as f:
    assert json.load(f) == summary
  with Image.open(tmp_path / 'data' / 'preview.png') as grid:
    # 4 rows x 16 columns of 32x32 images with 2-pixel borders.
    assert grid.size == (16 * 34 + 2, 4 * 34 + 2)
    assert grid.mode == 'L'
  assert sorted(os.listdir(tmp_path)) == ['data']

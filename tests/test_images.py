"""images.py: the grid every stage shows, and the PNG files it writes."""

import jax
import numpy as np
from PIL import Image

from vqvae2_jax import images


def _three_grays():
  return np.stack([np.full((4, 5, 1), v, np.float32)
                   for v in (-1.0, 0.0, 1.0)])


def test_image_grid_layout():
  grid = images.image_grid(_three_grays(), num_cols=2, padding=1)
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 1)
  assert grid[1, 1, 0] == 0 and grid[1, 7, 0] == 128 and grid[6, 1, 0] == 255
  assert grid[0, 0, 0] == 255  # Padding.
  assert grid[6, 7, 0] == 255  # The empty fourth cell stays white.


def test_image_grid_clips_and_caps_columns():
  x = np.stack([np.full((2, 2, 3), v, np.float32) for v in (-3.0, 5.0)])
  grid = images.image_grid(x, num_cols=10, padding=0)
  assert grid.shape == (2, 4, 3)  # Two columns: no more than images.
  assert (grid[:, :2] == 0).all() and (grid[:, 2:] == 255).all()


def test_write_image_grid_writes_the_grid_as_png(tmp_path):
  path = tmp_path / 'deep' / 'dir' / 'grid.png'
  images.write_image_grid(str(path), _three_grays(), num_cols=3)
  with Image.open(path) as png:
    assert png.mode == 'L'  # One channel is written as grayscale.
    np.testing.assert_array_equal(
        np.asarray(png), images.image_grid(_three_grays(), 3)[..., 0])


def test_write_image_grid_only_on_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  path = tmp_path / 'grid.png'
  images.write_image_grid(str(path), _three_grays(), num_cols=3)
  images.write_side_by_side(str(tmp_path / 'pair.png'),
                            np.zeros((2, 2, 1), np.uint8),
                            np.zeros((2, 2, 1), np.uint8))
  assert not list(tmp_path.iterdir())


def test_side_by_side_pads_the_shorter_grid_with_white(tmp_path):
  left = np.zeros((4, 3, 3), np.uint8)
  right = np.full((2, 5, 3), 100, np.uint8)
  path = tmp_path / 'pair.png'
  images.write_side_by_side(str(path), left, right, gap=2)
  with Image.open(path) as png:
    pixels = np.asarray(png)
  assert pixels.shape == (4, 3 + 2 + 5, 3)
  assert (pixels[:, :3] == 0).all()
  assert (pixels[:, 3:5] == 255).all()  # The gap.
  assert (pixels[:2, 5:] == 100).all() and (pixels[2:, 5:] == 255).all()

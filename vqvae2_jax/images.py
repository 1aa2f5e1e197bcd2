"""Image grids and PNG files: what every stage shows of its images.

`image_grid` tiles images into one uint8 picture (the TensorBoard images and
the PNG grids use the same one); `write_image_grid` and `write_side_by_side`
write PNG files, on process 0 only, since every process holds the same
images.
"""

from absl import logging
from etils import epath
import jax
import numpy as np


def image_grid(images: np.ndarray, num_cols: int, padding: int = 2
               ) -> np.ndarray:
  """Tiles images into one picture, row by row.

  Args:
    images: float [n, h, w, c] in [-1, 1] (c = 1 or 3); values outside are
      clipped.
    num_cols: images per row.
    padding: pixels of white between images and around the grid.

  Returns:
    uint8 [rows * (h + padding) + padding, cols * (w + padding) + padding, c].
  """
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  num_cols = max(1, min(int(num_cols), n))
  num_rows = -(-n // num_cols)
  pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  grid = np.full((num_rows * (h + padding) + padding,
                  num_cols * (w + padding) + padding, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, num_cols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid


def write_image_grid(path: str, images: np.ndarray, num_cols: int) -> None:
  """Writes `image_grid(images, num_cols)` as a PNG file (process 0 only)."""
  if jax.process_index() != 0:
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = image_grid(images, num_cols)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(grid).save(f, format='PNG')
  logging.info('Wrote image grid %s', path)


def write_side_by_side(path: str, left: np.ndarray, right: np.ndarray,
                       gap: int = 8) -> None:
  """Writes two uint8 [h, w, c] grids side by side, white between (PNG).

  Process 0 only; the shorter grid is padded with white at the bottom.
  """
  if jax.process_index() != 0:
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h = max(left.shape[0], right.shape[0])
  c = left.shape[-1]
  canvas = np.full((h, left.shape[1] + gap + right.shape[1], c), 255,
                   np.uint8)
  canvas[:left.shape[0], :left.shape[1]] = left
  canvas[:right.shape[0], left.shape[1] + gap:] = right
  with open(path, 'wb') as f:
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(f, format='PNG')

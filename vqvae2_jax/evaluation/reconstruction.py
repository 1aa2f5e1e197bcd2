"""Reconstruction metrics over a whole split: MSE, PSNR, codebook usage.

An evaluation pass adds up per-batch sums (`batch_sums`, jit-friendly, padding
masked out) with `add_sums`, and `summarize` turns the totals into metrics.
Images are in [-1, 1], so PSNR uses a peak-to-peak range of 2 (the same value
as PSNR on [0, 1] images).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PEAK_TO_PEAK = 2.0  # Images span [-1, 1].
_MIN_MSE = 1e-10  # Keeps PSNR finite for a perfect reconstruction.


def psnr(mse: Any, peak_to_peak: float = PEAK_TO_PEAK) -> Any:
  """Peak signal-to-noise ratio in dB of a mean squared error (array or float)."""
  if isinstance(mse, (float, int, np.floating)):
    return 10.0 * math.log10(peak_to_peak**2 / max(float(mse), _MIN_MSE))
  return 10.0 * jnp.log10(peak_to_peak**2 / jnp.maximum(mse, _MIN_MSE))


def per_image_mse(images: jax.Array, recon: jax.Array) -> jax.Array:
  """Mean squared error of each image in float32: [b, h, w, c] x2 -> [b]."""
  diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def per_image_area_mse(images: jax.Array, recon: jax.Array,
                       area: tuple[int, int, int, int]) -> jax.Array:
  """`per_image_mse` over `area` = (top, left, height, width) only: [b]."""
  top, left, height, width = area
  crop = lambda x: x[:, top:top + height, left:left + width]
  return per_image_mse(crop(images), crop(recon))


def code_histogram(codes: jax.Array, mask: jax.Array,
                   num_embeddings: int) -> jax.Array:
  """How often each code occurs in the unmasked images.

  Args:
    codes: int32 [b, h, w].
    mask: bool [b]; False for padding examples.
    num_embeddings: K.

  Returns:
    int32 [K] counts.
  """
  weights = jnp.broadcast_to(mask[:, None, None], codes.shape).astype(jnp.int32)
  return jnp.zeros((num_embeddings,), jnp.int32).at[codes.reshape(-1)].add(
      weights.reshape(-1))


def batch_sums(images: jax.Array, recon: jax.Array,
               codes: Sequence[jax.Array], mask: jax.Array,
               num_embeddings: int,
               area: tuple[int, int, int, int] | None = None
               ) -> dict[str, jax.Array]:
  """Sums over the unmasked images of one batch.

  Args:
    images: [b, h, w, c] originals in [-1, 1].
    recon: [b, h, w, c] reconstructions.
    codes: per-level int32 code maps [b, h_i, w_i], top first.
    mask: bool [b].
    num_embeddings: codebook size K (the same for every level).
    area: (top, left, height, width) of the dataset's original image inside
      the canvas (`layout.original_area`), or None.

  Returns:
    'count' (images), 'sq_error' (sum of per-image MSEs), 'psnr' (sum of
    per-image PSNRs), 'code_counts_level<i>' (int32 [K]) and, with `area`,
    'sq_error_area' (sum of per-image MSEs over that area).
  """
  weights = mask.astype(jnp.float32)
  mse = per_image_mse(images, recon)
  sums = {
      'count': jnp.sum(weights),
      'sq_error': jnp.sum(mse * weights),
      'psnr': jnp.sum(psnr(mse) * weights),
  }
  if area is not None:
    sums['sq_error_area'] = jnp.sum(
        per_image_area_mse(images, recon, area) * weights)
  for i, level_codes in enumerate(codes):
    sums[f'code_counts_level{i}'] = code_histogram(level_codes, mask,
                                                   num_embeddings)
  return sums


def add_sums(total: Mapping[str, Any] | None,
             sums: Mapping[str, Any]) -> dict[str, Any]:
  """total + sums, key by key (total None: the first batch)."""
  if total is None:
    return dict(sums)
  return jax.tree.map(lambda a, b: a + b, dict(total), dict(sums))


def summarize(total: Mapping[str, Any]) -> dict[str, float]:
  """Metrics of a split from the summed `batch_sums`.

  Returns:
    'num_examples', 'mse' (mean per-image MSE), 'psnr' (of that MSE),
    'psnr_per_image' (mean of per-image PSNRs), with an original area
    'mse01_area' (MSE on [0, 1] pixels over it) and 'psnr_area', and per level
    'used_fraction_level<i>' (codes used at least once / K) and
    'perplexity_level<i>' (exp of the entropy of the code frequencies).
  """
  total = jax.device_get(dict(total))
  count = float(total['count'])
  if count <= 0:
    raise ValueError('The evaluation split has no examples.')
  mse = float(total['sq_error']) / count
  metrics = {
      'num_examples': count,
      'mse': mse,
      'psnr': psnr(mse),
      'psnr_per_image': float(total['psnr']) / count,
  }
  if 'sq_error_area' in total:
    # On [0, 1] pixels, as the PyTorch ports report it: a quarter of the MSE
    # on [-1, 1]; the PSNR is the same either way.
    area_mse = float(total['sq_error_area']) / count
    metrics['mse01_area'] = area_mse / PEAK_TO_PEAK**2
    metrics['psnr_area'] = psnr(area_mse)
  level = 0
  while f'code_counts_level{level}' in total:
    counts = np.asarray(total[f'code_counts_level{level}'], np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    metrics[f'used_fraction_level{level}'] = float(
        np.count_nonzero(counts) / counts.size)
    metrics[f'perplexity_level{level}'] = float(
        np.exp(-np.sum(nonzero * np.log(nonzero))))
    level += 1
  return metrics

"""Reconstruction sums: whole-image and original-area MSE/PSNR, code usage."""

import jax.numpy as jnp
import numpy as np

from vqvae2_jax.evaluation import reconstruction


def test_area_metrics_hand_made():
  # Two 4x4 images; the error is 0.5 everywhere inside the centre 2x2 and 0
  # on the border, the second image is padding (masked out).
  images = jnp.zeros((2, 4, 4, 1))
  recon = images.at[0, 1:3, 1:3].set(0.5).at[1].set(1.0)
  codes = [jnp.zeros((2, 1, 1), jnp.int32)]
  mask = jnp.array([True, False])
  sums = reconstruction.batch_sums(images, recon, codes, mask, 4,
                                   area=(1, 1, 2, 2))
  metrics = reconstruction.summarize(sums)
  assert metrics['num_examples'] == 1
  np.testing.assert_allclose(metrics['mse'], 0.25 * 4 / 16)
  # Over the area, on [0, 1] pixels: (0.5 / 2)^2.
  np.testing.assert_allclose(metrics['mse01_area'], 0.0625)
  np.testing.assert_allclose(metrics['psnr_area'],
                             10 * np.log10(1 / 0.0625), rtol=1e-6)
  without = reconstruction.summarize(
      reconstruction.batch_sums(images, recon, codes, mask, 4))
  assert 'psnr_area' not in without
  assert without['mse'] == metrics['mse']

"""Tests for vqvae2_jax/models/attention_kernel.py: an attention block's
position step as two Pallas kernels (run by Pallas's interpreter on a
CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import attention_kernel
from vqvae2_jax.models import gated_kernel
from vqvae2_jax.models import pixelcnn


def _block(channels, heads):
  block = pixelcnn.AttentionBlock(channels, heads, precision='highest')
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(1, 2, 3, channels)), jnp.float32)
  variables = block.init(jax.random.key(0), h, False)
  # Every parameter drawn (the layer norms' too), so that a scale, bias
  # or position term left out or added twice shows.
  variables = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype),
      variables)
  return block, variables


@pytest.mark.parametrize('channels,heads,batch,tile', [
    # 2 heads of 8; spans of 8 positions (the last partly masked); the MLP
    # in 8 programs of 4 hidden channels.
    (16, 2, 4, 4),
    # Batch 1, 4 heads of 8: spans of 8 again, 2 chunks of input channels.
    (32, 4, 1, 8),
])
def test_kernel_step_equals_the_blocks_step_over_a_map(channels, heads,
                                                       batch, tile):
  """Every position of a 4x6 map in raster order: the kernels' output (its
  pieces, summed) and key/value caches against `step_position`'s."""
  block, variables = _block(channels, heads)
  height, width = 4, 6
  apply = functools.partial(block.apply, variables)
  cache = apply(batch, height, width, method=block.init_cache)
  fused = apply(height, width, method=block.fused_view)
  view = apply(height, width, tile, method=block.kernel_view)
  assert view['mlp']['w_in'].shape == (2 * channels // tile, channels, tile)
  xla_step = jax.jit(lambda cache, h, r, c: apply(
      cache, h, r, c, fused, method=block.step_position))
  kernel_step = jax.jit(lambda cache, x, r, c: apply(
      cache, x, r, c, view, method=block.step_kernel))
  rng = np.random.default_rng(1)
  xla_cache = kernel_cache = cache
  for t in range(height * width):
    r, c = (jnp.int32(i) for i in divmod(t, width))
    h = jnp.asarray(rng.normal(size=(batch, channels)), jnp.float32)
    want, xla_cache = xla_step(xla_cache, h[:, None, None], r, c)
    # The input in pieces, as a gated block's kernel would hand it on.
    pieces = gated_kernel.Pending(
        h * 0.5, jnp.full((channels,), 0.125),
        jnp.stack([h * 0.25, h * 0.25 - 0.125]))
    got, kernel_cache = kernel_step(kernel_cache, pieces, r, c)
    assert got.parts.shape == (2 * channels // tile, batch, channels)
    np.testing.assert_allclose(got.total(), want[:, 0, 0], rtol=2e-5,
                               atol=2e-5, err_msg=f'position {t}')
    for name in ('k', 'v'):
      np.testing.assert_allclose(kernel_cache[name], xla_cache[name],
                                 rtol=2e-5, atol=2e-5,
                                 err_msg=f'{name}, position {t}')


def test_layouts_give_each_program_its_channels():
  c, heads, height, width, tile = 8, 2, 2, 3, 4
  d = c // heads
  count = lambda *shape: jnp.arange(np.prod(shape),
                                    dtype=jnp.float32).reshape(shape)
  w_qkv, pos, w_proj = count(c, 3 * c), count(height, width, 3 * c), count(
      c, c)
  laid = attention_kernel.attention_layout(w_qkv, pos, w_proj, heads)
  for p in range(heads):
    for j in range(3):  # Query, key, value.
      cols = slice(j * c + p * d, j * c + (p + 1) * d)
      np.testing.assert_array_equal(laid['w_qkv'][p, j], w_qkv[:, cols])
      np.testing.assert_array_equal(laid['pos_qkv'][p, :, :, j],
                                    pos[:, :, cols])
    np.testing.assert_array_equal(laid['w_proj'][p],
                                  w_proj[p * d:(p + 1) * d])
  w_in, b_in, w_out = count(c, 2 * c), count(2 * c), count(2 * c, c)
  laid = attention_kernel.mlp_layout(w_in, b_in, w_out, tile)
  for p in range(2 * c // tile):
    rows = slice(p * tile, (p + 1) * tile)
    np.testing.assert_array_equal(laid['w_in'][p], w_in[:, rows])
    np.testing.assert_array_equal(laid['b_in'][p], b_in[rows])
    np.testing.assert_array_equal(laid['w_out'][p], w_out[rows])


def test_heads_must_be_a_power_of_two_in_size():
  attention_kernel.check_heads(32, 4)
  with pytest.raises(gated_kernel.TileError, match='12 each.*step_kernel=xla'):
    attention_kernel.check_heads(48, 4)

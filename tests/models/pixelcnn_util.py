"""Helpers of the PixelCNN prior and sampler tests: tiny priors and weights."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax.models import pixelcnn


def make_prior(**kwargs) -> pixelcnn.PixelCNNPrior:
  """A tiny prior; keyword arguments override the defaults.

  Full float32 products ('highest'), so that comparisons of the cached and
  full paths hold on GPUs and TPUs as on CPUs.
  """
  fields = dict(num_embeddings=7, num_channels=8, num_layers=2,
                filter_size=3, dropout_rate=0.1, attention_layers=0,
                num_heads=1, num_classes=0, cond_num_embeddings=(),
                cond_stack_blocks=0, num_output_layers=1,
                precision='highest')
  fields.update(kwargs)
  return pixelcnn.PixelCNNPrior(**fields)


def random_variables(model: pixelcnn.PixelCNNPrior, codes, cond_codes=(),
                     labels=None, seed: int = 0, scale: float = 1.0
                     ) -> dict[str, Any]:
  """Variables with the shapes `model.init` gives, drawn with numpy.

  Kernels and embeddings are N(0, scale^2 / fan_in), biases small and random
  (so that no bias hides a wiring mistake), LayerNorm scales 1. Drawing with
  numpy instead of `model.init` saves the tests seconds of XLA compilation
  per model on a CPU; `model.init` itself is tested separately.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), codes, cond_codes=cond_codes,
                         labels=labels, train=False))
  return draw_variables(shapes, seed, scale)


def draw_variables(shapes: Any, seed: int = 0, scale: float = 1.0) -> Any:
  """Draws the leaves of a `jax.ShapeDtypeStruct` tree as `random_variables`.

  Any module's `jax.eval_shape(module.init, ...)` will do, e.g. one layer's.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim >= 2:
      fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
      if 'embedding' in name:
        fan_in = 1
      x = rng.normal(0.0, scale / np.sqrt(fan_in), leaf.shape)
    elif 'scale' in name:
      x = np.ones(leaf.shape)
    else:
      x = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)

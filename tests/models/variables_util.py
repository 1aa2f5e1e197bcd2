"""Model variables for tests without compiling the initialisers.

On XLA:CPU every random initialiser (a threefry kernel) takes seconds to
compile, so a real `model.init` of even a tiny VQ-VAE costs tens of seconds.
Tests take the variable shapes from `jax.eval_shape(model.init, ...)` (no
compilation) and fill them here with numpy, with the same rules as the
modules' initialisers; `test_quantizer.py` checks those rules against a real
init once.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _fill(path: tuple[str, ...], shape: jax.ShapeDtypeStruct,
          rng: np.random.Generator, codebooks: dict[tuple[str, ...], Any]
          ) -> jax.Array:
  name = path[-1]
  if name == 'kernel':
    # An Upsample2x kernel [2, 2, in, 2, 2, out] has four 2x2 filters.
    fan_dims = shape.shape[:3] if len(shape.shape) == 6 else shape.shape[:-1]
    fan_in = int(np.prod(fan_dims))
    value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape.shape)
  elif name == 'codebook':
    dim = shape.shape[-1]
    value = rng.uniform(-np.sqrt(3 / dim), np.sqrt(3 / dim), shape.shape)
    codebooks[path[1:-1]] = value
  elif name == 'embed_sum':
    value = codebooks[path[1:-1]]  # Starts as the codebook (count 1 each).
  elif name == 'cluster_size':
    value = np.ones(shape.shape)
  else:  # bias, offset, steps_unused, initialized
    value = np.zeros(shape.shape)
  return jnp.asarray(value, shape.dtype)


def init_variables(module: Any, *args: Any, seed: int = 0, **kwargs: Any
                   ) -> dict[str, Any]:
  """Variables shaped like `module.init(rngs, *args, **kwargs)`, filled by numpy.

  'params' and 'vq_stats' follow the modules' initialisers: kernels
  N(0, 1/fan_in), biases 0, codebooks U(+-sqrt(3/D)), 'embed_sum' equal to
  the codebook, 'cluster_size' 1, counters, offsets and flags 0.
  """
  key = jax.random.key(0)
  shapes = jax.eval_shape(
      lambda: module.init({'params': key, 'vq': key}, *args, **kwargs))
  rng = np.random.default_rng(seed)
  codebooks = {}
  # Leaves are visited in sorted key order: a level's 'codebook' is drawn
  # before its 'embed_sum' copies it.
  return jax.tree_util.tree_map_with_path(
      lambda path, shape: _fill(tuple(p.key for p in path), shape, rng,
                                codebooks),
      shapes)

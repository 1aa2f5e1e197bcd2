"""VQ-VAE-2 in JAX/Flax.

  from vqvae2_jax import Pipeline   # a trained workdir from Python
"""


def __getattr__(name):
  # Lazy: importing the package (e.g. for its errors) must not start JAX.
  if name == 'Pipeline':
    from vqvae2_jax.api import Pipeline  # pylint: disable=g-import-not-at-top
    return Pipeline
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

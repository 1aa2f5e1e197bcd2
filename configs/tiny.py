r"""Tiny configuration for tests and quick CPU smoke runs (seconds per stage).

  python -m vqvae2_jax.main --config=configs/tiny.py --workdir=/tmp/vqvae2_tiny \
    --mode=all

Same data as the Fashion-MNIST default, with small models and a few steps.
"""

import ml_collections

from configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny test configuration."""
  config = fashion_mnist.get_config()
  config.data.shuffle_buffer = 256

  model = config.model
  model.num_hiddens = 16
  model.num_residual_layers = 1
  model.num_residual_hiddens = 8
  model.embedding_dim = 8
  model.num_embeddings = 16
  model.dead_code_window = 4

  train = config.vqvae_train
  train.batch_size = 8
  train.num_train_steps = 6
  train.warmup_steps = 2
  train.log_every = 2
  train.eval_every = 6
  train.checkpoint_every = 3
  train.eval_batch_size = 64

  prior = config.prior
  prior.batch_size = 8
  prior.num_train_steps = 6
  prior.warmup_steps = 2
  prior.log_every = 2
  prior.eval_every = 6
  prior.checkpoint_every = 3
  prior.eval_batch_size = 64
  for level in (prior.level_0, prior.level_1):
    level.num_channels = 16
    level.num_layers = 2
    level.num_heads = 2

  config.sampling.num_samples_per_class = 1
  config.sampling.batch_size = 8
  config.eval.num_samples = 20
  return config

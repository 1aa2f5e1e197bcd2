r"""CIFAR-10 32x32 RGB, a small colour benchmark.

  python -m vqvae2_jax.main --config=configs/cifar10.py \
    --workdir=$HOME/vqvae2_cifar10 --mode=all

tfds downloads CIFAR-10 on first use; offline, prepare it elsewhere and pass
--config.data.data_dir. Two latent levels: top 8x8, bottom 16x16.
"""

import ml_collections

from configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  """Returns the CIFAR-10 configuration."""
  config = fashion_mnist.get_config()

  data = config.data
  data.name = 'cifar10'
  data.image_size = 32
  data.channels = 3
  data.num_classes = 10
  data.random_flip = True

  model = config.model
  model.downsample_factors = (4, 2)  # 8x8 top, 16x16 bottom.
  model.num_hiddens = 128
  model.num_residual_hiddens = 64

  config.vqvae_train.batch_size = 128
  config.vqvae_train.num_train_steps = 50_000
  config.vqvae_train.eval_every = 5000
  config.vqvae_train.checkpoint_every = 2000

  prior = config.prior
  prior.batch_size = 128
  prior.num_train_steps = 100_000
  prior.eval_every = 5000
  prior.checkpoint_every = 2000
  for level in (prior.level_0, prior.level_1):
    level.num_channels = 128
    level.num_layers = 12
    level.num_heads = 4
  prior.level_0.attention_layers = 2
  prior.level_1.cond_stack_blocks = 4
  return config

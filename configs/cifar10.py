r"""CIFAR-10 32x32 RGB, a small colour benchmark.

  python -m vqvae2_jax.main --config=configs/cifar10.py \
    --workdir=$HOME/vqvae2_cifar10 --mode=all

tfds downloads CIFAR-10 on first use; offline, prepare it elsewhere and pass
--config.data.data_dir. Two latent levels: top 8x8, bottom 16x16.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the CIFAR-10 configuration."""
  config = common.get_config()

  data = config.data
  data.name = 'cifar10'
  data.image_size = 32
  data.num_classes = 10
  data.random_flip = True

  config.model.downsample_factors = (4, 2)  # 8x8 top, 16x16 bottom.

  # 50k steps: a 500-step warm-up (1% of the run) lets Adam's moment
  # estimates settle before the peak rate; a checkpoint every 2000 steps
  # loses at most 4% of the run to a preemption.
  train = config.vqvae_train
  train.num_train_steps = 50_000
  train.warmup_steps = 500
  train.eval_every = 5000
  train.checkpoint_every = 2000

  # 100k steps per level; the base's 1000-step warm-up is 1% of them.
  prior = config.prior
  prior.learning_rate = 1e-3
  prior.polyak_decay = 0.999
  prior.eval_every = 5000
  prior.checkpoint_every = 2000
  for level in (prior.level_0, prior.level_1):
    level.num_channels = 128
    level.num_layers = 12
    level.filter_size = 3
    level.num_heads = 4
  prior.level_0.attention_layers = 2
  prior.level_1.cond_stack_blocks = 4

  config.sampling.batch_size = 80
  config.eval.num_samples = 1000
  return config

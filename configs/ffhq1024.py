r"""FFHQ 1024x1024 with three latent levels (Razavi et al. 2019).

FFHQ is read from an image folder of the user's own files (the 70,000 PNGs
of the FFHQ release; optional subfolders train/ and validation/):

  python -m vqvae2_jax.main --config=configs/ffhq1024.py \
    --workdir=$HOME/vqvae2_ffhq --mode=all \
    --config.data.image_folder=$HOME/ffhq/images1024x1024

Three levels: top 32x32, middle 64x64, bottom 128x128 (downsampling 32, 16,
8). Unconditional: faces have no class labels.
"""

import ml_collections

from configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  """Returns the FFHQ-1024 configuration."""
  config = fashion_mnist.get_config()

  data = config.data
  data.name = 'image_folder'
  data.image_folder = ''  # Set with --config.data.image_folder=...
  data.image_size = 1024
  data.channels = 3
  data.num_classes = 0
  data.random_flip = True

  model = config.model
  model.downsample_factors = (32, 16, 8)  # 32x32 top, 64x64, 128x128 bottom.
  model.num_hiddens = 128
  model.num_residual_layers = 2
  model.num_residual_hiddens = 64
  model.embedding_dim = 64
  model.num_embeddings = 512

  train = config.vqvae_train
  train.batch_size = 32
  train.num_train_steps = 300_000
  train.warmup_steps = 1000
  train.log_every = 500
  train.eval_every = 10_000
  train.checkpoint_every = 5000
  train.eval_batch_size = 32

  prior = config.prior
  prior.batch_size = 128
  prior.num_train_steps = 500_000
  prior.learning_rate = 3e-4
  prior.polyak_decay = 0.9999
  prior.train_eval_examples = 10_000  # A sample of the training images.
  prior.eval_every = 10_000
  prior.checkpoint_every = 5000
  prior.eval_batch_size = 128
  prior.level_2 = ml_collections.ConfigDict(prior.level_1.to_dict())
  for name in ('level_0', 'level_1', 'level_2'):
    level = prior[name]
    level.num_channels = 512
    level.num_layers = 20
    level.filter_size = 5
    level.dropout_rate = 0.1
    level.num_heads = 8
  prior.level_0.attention_layers = 4
  prior.level_0.cond_stack_blocks = 0
  prior.level_1.attention_layers = 1
  prior.level_1.cond_stack_blocks = 20
  prior.level_2.attention_layers = 0
  prior.level_2.cond_stack_blocks = 20

  config.sampling.conditional = False
  config.sampling.num_samples_per_class = 16
  config.sampling.batch_size = 8
  config.eval.num_samples = 10_000
  return config

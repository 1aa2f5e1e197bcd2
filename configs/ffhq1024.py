r"""FFHQ 1024x1024 with three latent levels (Razavi et al. 2019).

FFHQ is read from an image folder of the user's own files (the 70,000 PNGs
of the FFHQ release; optional subfolders train/ and validation/):

  python -m vqvae2_jax.main --config=configs/ffhq1024.py \
    --workdir=$HOME/vqvae2_ffhq --mode=all \
    --config.data.image_folder=$HOME/ffhq/images1024x1024

Three levels: top 32x32, middle 64x64, bottom 128x128 (downsampling 32, 16,
8). Unconditional: faces have no class labels. The model and the priors'
sizes are configs/common.py's (the paper's).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the FFHQ-1024 configuration."""
  config = common.get_config()

  data = config.data
  data.name = 'image_folder'
  data.image_folder = ''  # Set with --config.data.image_folder=...
  data.image_size = 1024
  data.random_flip = True

  # 32x32 top, 64x64 middle, 128x128 bottom.
  config.model.downsample_factors = (32, 16, 8)

  # Intervals sized for runs of 300k and 500k steps, as in imagenet256.py:
  # warm-ups of 1000 (the base) and 2000 steps let Adam's moment estimates
  # settle before the peak rate (the CPU demo's 100 would be 0.02% of the
  # prior's run); a log every 500 steps gives 600-1000 points per curve; a
  # checkpoint every 5000 steps (the base) loses at most 1-2% of a run.
  train = config.vqvae_train
  train.batch_size = 32
  train.num_train_steps = 300_000
  train.log_every = 500
  train.eval_batch_size = 32

  prior = config.prior
  prior.num_train_steps = 500_000
  prior.warmup_steps = 2000
  prior.log_every = 500
  prior.train_eval_examples = 10_000  # A sample of the training images.
  prior.eval_batch_size = 128
  # Top: attention; middle: one attention layer and a conditioning stack
  # over the top codes; bottom: a conditioning stack over both.
  prior.level_1.attention_layers = 1
  prior.level_2 = common.prior_level(cond_stack_blocks=20)

  config.sampling.conditional = False
  config.sampling.num_samples_per_class = 16
  config.sampling.batch_size = 8
  return config

r"""ImageNet 256x256 with the VQ-VAE-2 paper's hyperparameters.

Needs ImageNet prepared for tfds (manual download: put ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar in the manual directory):

  python -m vqvae2_jax.main --config=configs/imagenet256.py \
    --workdir=$HOME/vqvae2_imagenet --mode=all \
    --config.data.manual_dir=$HOME/imagenet_tars

Two latent levels: top 32x32 and bottom 64x64 (downsampling 8 and 4), K=512
codes of D=64 per level, beta=0.25, 128 hidden channels, 2 residual layers of
64 channels (Razavi et al. 2019, appendix). Priors: 512 channels, 20 layers,
filter 5, dropout 0.1; the top prior has 4 attention layers of 8 heads, the
bottom prior a 20-block conditioning stack over the top codes. These are the
defaults of configs/common.py, so this file sets only the data and the
length of the runs.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the ImageNet-256 configuration."""
  config = common.get_config()

  data = config.data
  data.name = 'imagenet2012'
  data.image_size = 256
  data.num_classes = 1000
  data.eval_split = 'validation'
  data.random_flip = True

  # Intervals sized for runs of 300k and 500k steps: the base's 1000-step
  # warm-up (and 2000 for the priors, whose attention layers are the most
  # sensitive to early large updates) lets Adam's moment estimates settle
  # before the peak rate; a log every 500 steps still gives 600-1000 points
  # per curve at a negligible cost; a checkpoint every 5000 steps (the base)
  # loses at most 1-2% of a run to a preemption without saving the large
  # priors too often.
  train = config.vqvae_train
  train.num_train_steps = 300_000
  train.log_every = 500

  prior = config.prior
  prior.batch_size = 256
  prior.num_train_steps = 500_000
  prior.warmup_steps = 2000
  prior.log_every = 500
  prior.train_eval_examples = 50_000  # All 1.28M would take hours.

  sampling = config.sampling
  sampling.num_samples_per_class = 1
  sampling.batch_size = 16
  # The paper trades diversity for quality with classifier-based rejection
  # sampling: a fraction < 1.0 here (or --config.sampling.rejection_keep)
  # keeps that share of the candidates the domain classifier scores highest;
  # 1.0 samples without rejection.
  sampling.rejection_keep = 1.0

  config.eval.num_samples = 50_000
  return config

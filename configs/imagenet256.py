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
bottom prior a 20-block conditioning stack over the top codes.
"""

import ml_collections

from configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  """Returns the ImageNet-256 configuration."""
  config = fashion_mnist.get_config()

  data = config.data
  data.name = 'imagenet2012'
  data.image_size = 256
  data.channels = 3
  data.num_classes = 1000
  data.eval_split = 'validation'
  data.random_flip = True

  model = config.model
  model.downsample_factors = (8, 4)  # 32x32 top, 64x64 bottom.
  model.num_hiddens = 128
  model.num_residual_layers = 2
  model.num_residual_hiddens = 64
  model.embedding_dim = 64
  model.num_embeddings = 512
  model.commitment_cost = 0.25
  model.ema_decay = 0.99

  train = config.vqvae_train
  train.batch_size = 128
  train.num_train_steps = 300_000
  train.learning_rate = 3e-4
  train.warmup_steps = 1000
  train.log_every = 500
  train.eval_every = 10_000
  train.checkpoint_every = 5000
  train.eval_batch_size = 256

  prior = config.prior
  prior.batch_size = 256
  prior.num_train_steps = 500_000
  prior.learning_rate = 3e-4
  prior.warmup_steps = 2000
  prior.polyak_decay = 0.9999
  prior.log_every = 500
  prior.eval_every = 10_000
  prior.checkpoint_every = 5000
  prior.eval_batch_size = 256
  prior.train_eval_examples = 50_000  # All 1.28M would take hours.
  for level in (prior.level_0, prior.level_1):
    level.num_channels = 512
    level.num_layers = 20
    level.filter_size = 5
    level.dropout_rate = 0.1
    level.num_heads = 8
  prior.level_0.attention_layers = 4
  prior.level_0.cond_stack_blocks = 0
  prior.level_1.attention_layers = 0
  prior.level_1.cond_stack_blocks = 20

  sampling = config.sampling
  sampling.num_samples_per_class = 1
  sampling.batch_size = 16
  # The paper trades diversity for quality with classifier-based rejection
  # sampling (a fraction < 1.0 here) once that is built; 1.0 until then.
  sampling.rejection_keep = 1.0

  config.eval.num_samples = 50_000
  return config

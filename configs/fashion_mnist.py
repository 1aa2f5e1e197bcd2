r"""Fashion-MNIST: the embedded default, sized for a 2-core CPU.

The whole pipeline (VQ-VAE, code extraction, priors, samples) in about 15
minutes on 2 CPU cores:

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=all

Images are 28x28 grayscale, padded to 32x32. Two latent levels: top 4x4 and
bottom 8x8 (downsampling 8 and 4).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, dropout, data order and sampling.

  # Input pipeline.
  config.data = data = ml_collections.ConfigDict()
  data.name = 'fashion_mnist'  # tfds name, or 'image_folder'.
  data.image_size = 32  # Square side the images are resized/padded to.
  data.channels = 1  # 1 (grayscale) or 3 (RGB).
  data.num_classes = 10  # Class labels; 0 for unlabelled data.
  data.train_split = 'train'  # tfds split (or folder subdirectory) to train on.
  data.eval_split = 'test'  # Held-out split for evaluation.
  data.data_dir = ''  # tfds data_dir; '' uses the tfds default.
  data.manual_dir = ''  # Directory with manually downloaded source files.
  data.image_folder = ''  # Root of an image folder when name == 'image_folder'.
  data.random_flip = False  # Random horizontal flips in training.
  data.shuffle_buffer = 10_000  # Examples in the shuffle buffer.

  # Stage 1: the hierarchical VQ-VAE. Levels are listed top (coarsest) first.
  config.model = model = ml_collections.ConfigDict()
  model.downsample_factors = (8, 4)  # Image side / latent side, per level.
  model.num_hiddens = 64  # Channels of the encoders and decoders.
  model.num_residual_layers = 2  # Residual blocks per stack.
  model.num_residual_hiddens = 32  # Bottleneck channels of a residual block.
  model.embedding_dim = 64  # D: size of each code vector.
  model.num_embeddings = 512  # K: codes per level's codebook.
  model.quantizer = 'ema'  # 'ema' (EMA codebook) or 'vq' (learned by loss).
  model.commitment_cost = 0.25  # beta.
  model.ema_decay = 0.99  # Decay of the EMA codebook statistics.
  model.ema_epsilon = 1e-5  # Laplace smoothing of the EMA cluster sizes.
  model.dead_code_window = 100  # Train steps a code may go unused before restart; 0 disables.
  model.kmeans_init = False  # Initialise codebooks by k-means on the first batch.
  model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16'.

  config.vqvae_train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # Global batch size.
  train.num_train_steps = 3000  # Optimizer steps.
  train.learning_rate = 3e-4  # Peak Adam learning rate.
  train.warmup_steps = 100  # Linear warm-up steps.
  train.cosine_decay = True  # Cosine decay to 0 after warm-up.
  train.grad_clip_norm = 1.0  # Global gradient-norm clip; 0 disables.
  train.log_every = 100  # Steps between metric logs.
  train.eval_every = 1000  # Steps between evaluations (and image grids).
  train.checkpoint_every = 500  # Steps between checkpoints.
  train.keep_checkpoints = 2  # Checkpoints kept on disk.
  train.eval_batch_size = 256  # Global batch size for evaluation.

  # Stage 2: priors over the codes. Shared training settings here; the model
  # of each level in prior.level_<i>, i = 0 for the top level.
  config.prior = prior = ml_collections.ConfigDict()
  prior.level = -1  # Level to train; -1 trains every level, top first.
  prior.batch_size = 32  # Global batch size.
  prior.num_train_steps = 2000  # Optimizer steps per level.
  prior.learning_rate = 1e-3  # Peak Adam learning rate.
  prior.warmup_steps = 100  # Linear warm-up steps.
  prior.grad_clip_norm = 1.0  # Global gradient-norm clip; 0 disables.
  prior.polyak_decay = 0.999  # EMA of weights for eval/sampling; 0 disables.
  prior.label_drop_rate = 0.1  # Label dropout, so one model also samples unconditionally.
  prior.log_every = 100  # Steps between metric logs.
  prior.eval_every = 2000  # Steps between held-out evaluations (whole split).
  prior.checkpoint_every = 500  # Steps between checkpoints.
  prior.keep_checkpoints = 2  # Checkpoints kept on disk.
  prior.eval_batch_size = 256  # Global batch size for evaluation.
  prior.train_eval_examples = 0  # Train examples scored per eval; 0: all.
  prior.codes_per_shard = 10_000  # Examples per file of extracted codes (--mode=codes).
  prior.level_0 = _prior_level(attention_layers=1, cond_stack_blocks=0)
  prior.level_1 = _prior_level(attention_layers=0, cond_stack_blocks=2)

  # Stage 3: sampling.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.num_samples_per_class = 8  # Samples per class (or in all, unlabelled).
  sampling.batch_size = 80  # Maps sampled at once.
  sampling.temperature = 1.0  # Softmax temperature.
  sampling.top_k = 0  # Keep the k most likely codes; 0 disables.
  sampling.top_p = 1.0  # Nucleus mass; 1.0 disables.
  sampling.conditional = True  # Sample with class labels when the data has them.
  sampling.use_polyak = True  # Use the priors' Polyak weights when present.
  sampling.rejection_keep = 1.0  # Kept by rejection sampling (not built: 1.0).

  # Evaluation of samples and reconstructions.
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000  # Samples scored by sample metrics.

  # Device mesh: the number of devices on each axis; -1 takes the rest.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis.
  mesh.fsdp = 1  # Parameter-sharding axis.
  return config


def _prior_level(*, attention_layers: int, cond_stack_blocks: int
                 ) -> ml_collections.ConfigDict:
  level = ml_collections.ConfigDict()
  level.num_channels = 32  # Channels of the gated stacks (64 is ~4x slower on a CPU).
  level.num_layers = 6  # Gated residual blocks.
  level.filter_size = 3  # Masked-convolution filter size.
  level.dropout_rate = 0.1  # Dropout in the gated blocks.
  level.attention_layers = attention_layers  # Causal self-attention blocks among the layers.
  level.num_heads = 4  # Heads of each attention block.
  level.cond_stack_blocks = cond_stack_blocks  # Residual blocks over the upper levels' codes.
  level.num_output_layers = 1  # 1x1 layers before the logits.
  return level

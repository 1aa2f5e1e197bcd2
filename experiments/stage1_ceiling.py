r"""What the judge says of stage 1's reconstructions: the ceiling of samples.

  python -m experiments.stage1_ceiling --config=configs/fashion_mnist.py \
    --workdir=workdir/fashion_mnist

Samples are decoded by the VQ-VAE, so they can be no closer to the data than
its reconstructions are. This prints, as one JSON object, the sample metrics
(`evaluation.run.sample_metrics`: FID, KID, IS, precision / recall, class
agreement with the true labels) of two sets against the whole held-out
split, both measured with the config's ruler (Fashion-MNIST's shipped judge
by default):

* reconstructions_vs_held_out: every held-out image encoded and decoded;
* train_vs_held_out: --num_train images of the training split, the
  real-vs-real floor at that count (the eval report's floor uses
  eval.num_samples images).
"""

import functools
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run



def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import `ceilings` beside other experiments)."""
  config = config_flags.DEFINE_config_file('config', None, 'Config file.')
  workdir = flags.DEFINE_string('workdir', None, 'A workdir with stage 1.')
  num_train = flags.DEFINE_integer('num_train', 10_000,
                                   'Training images of the floor row.')
  flags.mark_flags_as_required(['config', 'workdir'])
  return config, workdir, num_train


def ceilings(config, workdir: str, num_train: int) -> dict[str, dict]:
  """The two rows (see the module docstring)."""
  mesh = parallel.create_mesh(config.mesh)
  vqvae, variables, _ = loading.load_vqvae(config, workdir, mesh)
  features, _ = eval_run.feature_fn(config, workdir, mesh)
  reconstruct = jax.jit(lambda v, x: vqvae.apply(v, x, train=False)[0])
  held_out = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  recon = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  labels = []
  for images, batch_labels, batch in eval_run.real_batches(
      config, mesh, config.data.eval_split):
    mask = np.asarray(parallel.to_host(batch['mask']))
    decoded = np.asarray(parallel.to_host(
        reconstruct(variables, batch['image'])), np.float32)[mask]
    held_out.add(*features(images))
    recon.add(*features(np.clip(decoded, -1.0, 1.0)))
    labels.append(batch_labels)
  train = metrics_lib.FeatureStats(max_features=num_train)
  train_labels = []
  for images, batch_labels, _ in eval_run.real_batches(
      config, mesh, config.data.train_split, limit=num_train):
    train.add(*features(images))
    train_labels.append(batch_labels)
  return {
      'reconstructions_vs_held_out': eval_run.sample_metrics(
          config, held_out, recon, np.concatenate(labels)),
      'train_vs_held_out': eval_run.sample_metrics(
          config, held_out, train, np.concatenate(train_labels)),
  }


def main(argv, flag_values):
  del argv
  config, workdir, num_train = flag_values
  print(json.dumps(ceilings(config.value, workdir.value, num_train.value),
                   indent=1))


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

r"""Runs a stage of VQ-VAE-2, or the whole pipeline.

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=all

Modes: data (prepare and preview the input), vqvae (stage 1), codes (extract
the training set's codes), prior (stage 2), sample (stage 3), classifier (the
domain classifier of the sample metrics), eval (the evaluation report), all.
Every stage resumes from what `workdir` already holds.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vqvae2_jax import errors
from vqvae2_jax import stages

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    'config', None, 'Configuration file, e.g. configs/fashion_mnist.py.',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, codes, samples and metrics.')
flags.DEFINE_enum('mode', 'all', list(stages.MODES), 'Stage to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data runs on the host; keep TensorFlow off any accelerator JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.info('Mode %s, workdir %s', FLAGS.mode, FLAGS.workdir)
  try:
    stages.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except (errors.UserError, NotImplementedError, FileNotFoundError) as e:
    # Bad input, a stage of a later version, or one whose input another --mode
    # makes: the message says what to do; a traceback would only hide it.
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main)

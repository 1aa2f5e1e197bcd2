r"""Runs stages in several workdirs in one process, for the multi-process tests.

  python -m vqvae2_jax.launch --processes=2 --devices_per_process=4 \
    --module=tests.multiprocess_stages -- \
    --config=configs/fashion_mnist.py:tiny \
    --run=/tmp/a:vqvae --run=/tmp/b:codes,prior --run=/tmp/c:vqvae,prior@F

Each --run=<workdir>:<modes> runs its modes in order as `vqvae2_jax.main
--mode=<mode>` would, so one start-up of TensorFlow and JAX per process
serves several stages. A run ending in @<file> starts stage 1 and the
priors from that exported file (`--config.vqvae_train.from_export=<file>
--config.prior.from_export=<file>`).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from vqvae2_jax import stages

config_flags.DEFINE_config_file('config', None, 'Configuration file.')
flags.DEFINE_multi_string('run', None, '<workdir>:<mode>,<mode>,...')
flags.mark_flags_as_required(['config', 'run'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  for run in FLAGS.run:
    run, _, exported = run.partition('@')
    workdir, modes = run.rsplit(':', 1)
    config = FLAGS.config
    if exported:
      config = config.copy_and_resolve_references()
      config.vqvae_train.from_export = config.prior.from_export = exported
    for mode in modes.split(','):
      stages.run(mode, config, workdir)


if __name__ == '__main__':
  app.run(main)

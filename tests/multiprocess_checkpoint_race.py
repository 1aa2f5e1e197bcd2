"""Process 1 looks for a checkpoint directory after process 0 created it.

  python -m vqvae2_jax.launch --processes=2 --devices_per_process=4 \
    --module=tests.multiprocess_checkpoint_race -- --directory=D

What a trainer does at its start, on every process: check the newest
checkpoint of its directory (`checkpoints.check_directory`, a read-only
orbax manager when the directory exists), then open the writable manager,
whose creation makes the directory (process 0) and waits at an orbax
barrier. Here process 1 arrives late, so if each process decided alone
whether the directory exists, process 0 would find none, create it and
wait at the writable manager's barrier, while process 1 would find it and
wait at the read-only manager's: both stuck until orbax's timeout (the
race a CI run once hit in tests/test_multiprocess.py). Each process prints
'created <directory>' when both managers open and close.
"""

import time

from absl import app
from absl import flags
import jax

from vqvae2_jax import checkpoints
from vqvae2_jax import parallel

LATE_SECONDS = 5  # Process 0 creates the directory well within this.

_DIRECTORY = flags.DEFINE_string('directory', None,
                                 'A checkpoint directory not yet there.')


def main(argv):
  del argv
  parallel.maybe_initialize_distributed()
  if jax.process_index() == 1:
    time.sleep(LATE_SECONDS)
  fingerprint = {'model': 'none'}
  checkpoints.check_directory(_DIRECTORY.value, fingerprint)
  checkpoints.create_manager(_DIRECTORY.value).close()
  print(f'process {jax.process_index()}: created {_DIRECTORY.value}',
        flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('directory')
  app.run(main)

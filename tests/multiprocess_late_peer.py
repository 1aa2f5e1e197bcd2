"""Process 1 starts communicating 35 s after process 0 (for the multi-process tests).

  python -m vqvae2_jax.launch --processes=2 --devices_per_process=4 \
    --module=tests.multiprocess_late_peer

gloo gives up on a device group that a peer has not joined within 30 s of
its first use; `parallel.maybe_initialize_distributed` connects the groups
while the processes are in step, so here the first sum over all devices
and the first `multihost_utils` barrier wait for the late process. Each
process prints the sum.
"""

import time

from absl import app
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import parallel

LATE_SECONDS = 35  # More than gloo's 30 s.


def main(argv):
  del argv
  parallel.maybe_initialize_distributed()
  if jax.process_index() == 1:
    time.sleep(LATE_SECONDS)
  mesh = parallel.create_mesh()
  ones = parallel.shard_batch(np.ones(jax.local_device_count(), np.int32),
                              mesh)
  total = jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))(ones)
  multihost_utils.sync_global_devices('late peer')
  print(f'process {jax.process_index()}: sum over '
        f'{jax.device_count()} devices {int(total.addressable_data(0))}',
        flush=True)


if __name__ == '__main__':
  app.run(main)

r"""Two processes resume past a damaged newest checkpoint (for test_faults).

  python -m vqvae2_jax.launch --processes=2 --devices_per_process=2 \
    --module=tests.multiprocess_damaged -- <checkpoint dir>

Steps 1 and 2 of a state with a sharded and a replicated array are saved;
process 0 truncates the data files of step 2; both restore with
`checkpoints.restore_latest(set_aside=True)`, then save steps 2 and 3
again. Each process prints one line 'RESULT <json>': the step its arrays
came from, the listing of the directory and orbax's steps at the end.
"""

import glob
import json
import os

from absl import app
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vqvae2_jax import checkpoints
from vqvae2_jax import parallel

_FINGERPRINT = {'model': 'two arrays'}


def _state(mesh, step):
  """{'w': [4 * devices] sharded, 'b': [3] replicated}, values from `step`."""
  w = np.arange(4 * jax.device_count(), dtype=np.float32) + 100 * step
  b = np.full((3,), step, np.float32)
  return {
      'w': jax.make_array_from_callback(
          w.shape, NamedSharding(mesh, P('data')), lambda i: w[i]),
      'b': jax.make_array_from_callback(
          b.shape, NamedSharding(mesh, P()), lambda i: b[i])}


def main(argv):
  directory = argv[1]
  parallel.maybe_initialize_distributed()
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      _state(mesh, 0))
  manager = checkpoints.create_manager(directory, async_save=False)
  for step in (1, 2):
    checkpoints.save(manager, step, _state(mesh, step), _FINGERPRINT)
  manager.wait_until_finished()
  multihost_utils.sync_global_devices('saved')
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(directory, '2', 'state', '**', 'd',
                                       '*'), recursive=True):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  multihost_utils.sync_global_devices('damaged')
  restored = checkpoints.restore_latest(manager, abstract, _FINGERPRINT,
                                        set_aside=True)
  # Every local shard of both arrays, as the step it was saved at.
  steps = sorted({int(np.asarray(s.data).flat[0]) // 100 for s in
                  restored['w'].addressable_shards} |
                 {int(np.asarray(s.data)[0]) for s in
                  restored['b'].addressable_shards})
  for step in (2, 3):
    checkpoints.save(manager, step, _state(mesh, step), _FINGERPRINT)
  manager.wait_until_finished()
  multihost_utils.sync_global_devices('saved again')
  print('RESULT ' + json.dumps({
      'process': jax.process_index(), 'restored_from': steps,
      'listing': sorted(os.listdir(directory)),
      'steps': sorted(manager.all_steps())}), flush=True)
  manager.close()


if __name__ == '__main__':
  app.run(main)

"""Device mesh, shardings and multi-host set-up.

Every train step is a `jax.jit` over a `Mesh` with axes ('data', 'fsdp'):
batches are split over both axes (all devices take part in data
parallelism), parameters are replicated unless a caller shards them over
'fsdp'. The same code runs on 1 CPU, 8 fake CPU devices, a GPU or a pod.
"""

import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

DATA_AXES = ('data', 'fsdp')  # Batch dimension is split over both axes.


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` once, only on multi-host set-ups.

  Multi-host runs are recognised by the environment variables that cluster
  launchers set (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS); a single
  process never initializes, so notebooks and tests are unaffected.
  """
  if getattr(maybe_initialize_distributed, '_done', False):
    return
  multi_host = (
      'JAX_COORDINATOR_ADDRESS' in os.environ
      or int(os.environ.get('SLURM_NTASKS', '1')) > 1
      or 'TPU_WORKER_HOSTNAMES' in os.environ and
      ',' in os.environ['TPU_WORKER_HOSTNAMES'])
  if multi_host:
    jax.distributed.initialize()
    logging.info('Initialized JAX distributed: process %d of %d.',
                 jax.process_index(), jax.process_count())
  maybe_initialize_distributed._done = True


def mesh_shape(mesh_config: ml_collections.ConfigDict,
               num_devices: int) -> tuple[int, int]:
  """Resolves the ('data', 'fsdp') sizes of `mesh_config` for `num_devices`.

  Args:
    mesh_config: with integer fields `data` and `fsdp`; at most one may be -1
      ("the rest of the devices").
    num_devices: devices to lay out.

  Returns:
    (data, fsdp) whose product is `num_devices`.

  Raises:
    ValueError: when the sizes cannot cover the devices exactly.
  """
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh: only one of data and fsdp may be -1.')
  if data == -1:
    data = num_devices // max(fsdp, 1)
  if fsdp == -1:
    fsdp = num_devices // max(data, 1)
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(
        f'config.mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} does '
        f'not cover the {num_devices} devices; set config.mesh.data=-1 to use '
        'all devices for data parallelism.')
  return data, fsdp


def create_mesh(mesh_config: ml_collections.ConfigDict | None = None,
                devices: Any = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh; default: every device on 'data'."""
  devices = jax.devices() if devices is None else list(devices)
  if mesh_config is None:
    mesh_config = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), DATA_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading dimension split over every mesh axis."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held whole by every device."""
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways a global batch is split (it must divide the batch)."""
  return mesh.devices.size


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Lays out a process-local batch (numpy pytree) as global `jax.Array`s.

  Each process passes its own share of the global batch; the leading
  dimensions of all processes' shares are concatenated into the global batch
  and split over the mesh's data axes.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)

"""Mesh construction and batch sharding on 8 fake CPU devices."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from vqvae2_jax import parallel


def _mesh_config(data, fsdp):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp})


def test_default_mesh_puts_every_device_on_data():
  mesh = parallel.create_mesh()
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}


@pytest.mark.parametrize('data,fsdp,expected', [
    (-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (8, 1, (8, 1))])
def test_mesh_shape_resolves_minus_one(data, fsdp, expected):
  assert parallel.mesh_shape(_mesh_config(data, fsdp), 8) == expected


@pytest.mark.parametrize('data,fsdp', [(3, 1), (-1, 3), (-1, -1), (4, 4)])
def test_mesh_shape_that_does_not_cover_devices_is_refused(data, fsdp):
  with pytest.raises(ValueError, match='config.mesh'):
    parallel.mesh_shape(_mesh_config(data, fsdp), 8)


def test_shard_batch_splits_leading_dimension_over_devices():
  mesh = parallel.create_mesh(_mesh_config(-1, 2))
  batch = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           'label': np.arange(16, dtype=np.int32)}
  sharded = parallel.shard_batch(batch, mesh)
  for name, value in sharded.items():
    np.testing.assert_array_equal(np.asarray(value), batch[name])
    shards = value.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape[0] for s in shards} == {2}


def test_single_device_mesh():
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  assert mesh.devices.size == 1


_SPLIT_PROBE = r'''
import sys, jax
from vqvae2_jax import parallel
if sys.argv[2] == 'started':
  jax.numpy.zeros(1).block_until_ready()  # JAX's backends start here.
applied = parallel.split_host_cpu(int(sys.argv[1]))
print(applied, jax.device_count(), jax.default_backend())
'''


@pytest.mark.parametrize('count,xla_flags,when,expected', [
    (2, '', 'fresh', 'True 2 cpu'),
    (3, '', 'fresh', 'True 3 cpu'),
    (0, '', 'fresh', 'False 1 cpu'),  # 0: JAX's default.
    (2, '--xla_force_host_platform_device_count=4', 'fresh', 'False 4 cpu'),
    (2, '', 'started', 'False 1 cpu'),  # Too late: left alone, no error.
])
def test_split_host_cpu_makes_devices_unless_told_otherwise_or_too_late(
    count, xla_flags, when, expected):
  # A fresh interpreter: this one's JAX has started with 8 devices.
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  done = subprocess.run(
      [sys.executable, '-c', _SPLIT_PROBE, str(count), when], env=env,
      capture_output=True, text=True, timeout=120, check=True)
  assert done.stdout.split('\n')[-2] == expected, done.stderr[-2000:]

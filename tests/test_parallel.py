"""Mesh construction and batch sharding on 8 fake CPU devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
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


_CACHE_PROBE = r'''
import sys, jax, jax.numpy as jnp
from vqvae2_jax import parallel
counts = {}
jax.monitoring.register_event_listener(
    lambda event, **_: counts.update({event: counts.get(event, 0) + 1}))
if sys.argv[2] == 'after':  # Programs compiled into another cache first.
  parallel.use_compilation_cache(sys.argv[1] + '_other')
  jax.jit(lambda x: x - 1)(jnp.ones(3)).block_until_ready()
print(parallel.use_compilation_cache(sys.argv[1]))
jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
print(counts.get('/jax/compilation_cache/cache_hits', 0),
      counts.get('/jax/compilation_cache/cache_misses', 0))
'''


@pytest.mark.parametrize('when', ['first', 'after'])
def test_compilation_cache_serves_the_next_process(tmp_path, when):
  cache = tmp_path / 'cache' / 'made'  # Made with its parents.

  def probe():
    done = subprocess.run(
        [sys.executable, '-c', _CACHE_PROBE, str(cache), when],
        capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split('\n')[-3:-1]

  # The first process compiles its programs (even these fast ones) and
  # writes them; the next reads every one back, also when programs were
  # compiled into another cache before.
  applied, counts = probe()
  hits, misses = map(int, counts.split())
  assert applied == 'True' and hits == 0 and misses >= 1
  assert os.listdir(cache)
  assert probe() == ['True', f'{misses} 0']


def test_compilation_cache_off_or_on_a_file():
  before = jax.config.jax_compilation_cache_dir
  assert not parallel.use_compilation_cache('')
  assert jax.config.jax_compilation_cache_dir == before
  with pytest.raises(ValueError, match=r'setup.py cannot be made.*Fix:'):
    parallel.use_compilation_cache(os.path.join(
        os.path.dirname(os.path.dirname(__file__)), 'setup.py'))
  assert jax.config.jax_compilation_cache_dir == before


def test_fsdp_shardings_split_large_arrays():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2),
                           parallel.DATA_AXES)
  abstract = {'big': jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
              'odd': jax.ShapeDtypeStruct((129, 129), jnp.float32),
              'small': jax.ShapeDtypeStruct((128,), jnp.float32)}
  shardings = parallel.state_shardings(abstract, mesh)
  # The largest dimension that the 'fsdp' axis (2 devices) divides.
  assert shardings['big'].spec == jax.sharding.PartitionSpec(
      None, None, None, 'fsdp')
  # Large, but no dimension divides: replicated, as are small arrays.
  assert shardings['odd'].spec == jax.sharding.PartitionSpec()
  assert shardings['small'].spec == jax.sharding.PartitionSpec()


def test_without_an_fsdp_axis_everything_is_replicated():
  mesh = parallel.create_mesh()
  abstract = {'big': jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)}
  assert parallel.state_shardings(abstract, mesh)['big'] == (
      parallel.replicated(mesh))


def test_abstract_with_shardings_carries_them():
  mesh = parallel.create_mesh()
  state = {'w': jnp.zeros((4, 2), jnp.bfloat16)}
  shardings = parallel.state_shardings(state, mesh)
  abstract = parallel.abstract_with_shardings(state, shardings)
  assert abstract['w'] == jax.ShapeDtypeStruct(
      (4, 2), jnp.bfloat16, sharding=parallel.replicated(mesh))
  assert abstract['w'].sharding == shardings['w']


def test_to_host_of_a_sharded_array():
  mesh = parallel.create_mesh()
  x = jax.device_put(np.arange(16.0).reshape(8, 2),
                     parallel.data_sharding(mesh))
  np.testing.assert_array_equal(parallel.to_host(x),
                                np.arange(16.0).reshape(8, 2))


# The default CPU layout (2 devices) on 2 cores, as `stages.run` sets it up:
# a jitted data-parallel step (its gradient sum is an all-reduce over the 2
# devices) called in a loop with the parameters donated. Each step takes a
# few milliseconds, so Python dispatches steps faster than they run and each
# device's limit of programs in flight fills, as in the real train loops.
_BUSY_LAYOUT_PROBE = r'''
import os, sys
cores = [int(c) for c in sys.argv[1].split(',')]
os.sched_setaffinity(0, cores)  # Before XLA counts the cores.
import jax, jax.numpy as jnp, numpy as np
from vqvae2_jax import parallel
assert parallel.split_host_cpu(2)
mesh = parallel.create_mesh()

def loss(w, x):
  for _ in range(4):
    x = jnp.tanh(x @ w)
  return jnp.mean(x ** 2)

def step(w, x):
  value, grad = jax.value_and_grad(loss)(w, x)
  return w - 0.01 * grad, value

replicated = parallel.replicated(mesh)
train_step = jax.jit(
    step, in_shardings=(replicated, parallel.data_sharding(mesh)),
    out_shardings=replicated, donate_argnums=0)
w = jax.device_put(np.eye(256, dtype=np.float32), replicated)
rng = np.random.default_rng(0)
for _ in range(int(sys.argv[2])):
  batch = parallel.shard_batch(rng.standard_normal((32, 256), np.float32),
                              mesh)
  w, value = train_step(w, batch)
print(jax.device_count(), os.environ.get('PJRT_NPROC'), float(value))
'''


def test_two_cpu_devices_finish_beside_busy_cores():
  """The data-parallel steps of the default layout on 2 busy cores finish.

  With XLA's default of one launch thread per core (PJRT_NPROC=2 given to
  this probe), it deadlocked in XLA:CPU's all-reduce in 7 of 7 runs; see
  `reserve_launch_threads`. XLA ends a stuck collective after the timeout
  set here, so a deadlock fails the test in about 20 s instead of hanging
  it.
  """
  if not hasattr(os, 'sched_setaffinity'):
    pytest.skip('needs Linux CPU affinity')
  cores = sorted(os.sched_getaffinity(0))[:2]
  if len(cores) < 2:
    pytest.skip('needs 2 cores')
  pin = ','.join(map(str, cores))
  # Every core of the probe kept busy by another process.
  busy = [subprocess.Popen(
      [sys.executable, '-c',
       f'import os; os.sched_setaffinity(0, [{pin}])\nwhile True: pass'])
          for _ in cores]
  env = {k: v for k, v in os.environ.items()
         if k not in parallel.PJRT_THREADS_ENV}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=(
      '--xla_cpu_collective_call_terminate_timeout_seconds=10 '
      '--xla_cpu_collective_call_warn_stuck_timeout_seconds=5'))
  try:
    done = subprocess.run(
        [sys.executable, '-c', _BUSY_LAYOUT_PROBE, pin, '1000'], env=env,
        capture_output=True, text=True, timeout=150)
  finally:
    for process in busy:
      process.kill()
      process.wait()
  assert done.returncode == 0, done.stderr[-3000:]
  devices, threads, _ = done.stdout.split('\n')[-2].split()
  assert (devices, threads) == ('2', '4')


@pytest.mark.parametrize('count,cores,environ,expected', [
    (2, 2, {}, 4),  # The default layout on 2 cores.
    (3, 4, {}, 6),
    (2, 4, {}, None),  # Enough cores: XLA's own pool is big enough.
    (1, 1, {}, None),  # One device has no collectives.
    (2, 2, {'PJRT_NPROC': '2'}, None),  # The user's setting is kept.
    (2, 2, {'NPROC': '3'}, None),
])
def test_reserve_launch_threads(monkeypatch, count, cores, environ, expected):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)),
                      raising=False)
  env = dict(environ)
  assert parallel.reserve_launch_threads(count, env) == expected
  if expected is None:
    assert env == environ
  else:
    assert env == {'PJRT_NPROC': str(expected)}

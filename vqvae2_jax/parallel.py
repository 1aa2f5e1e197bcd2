"""Device mesh, shardings, multi-host set-up and per-process JAX settings.

Every train step is a `jax.jit` over a `Mesh` with axes ('data', 'fsdp'):
batches are split over both axes (all devices take part in data
parallelism), parameters are replicated except large arrays on a mesh
whose 'fsdp' axis has more than one device (`state_shardings`, the FSDP
rule). The same code runs on 1 CPU, 8 fake CPU devices, a GPU or a pod.
"""

from collections.abc import Callable, Iterator, Mapping, MutableMapping
import contextlib
import math
import os
import signal
import threading
from typing import Any

from absl import logging
import jax
from jax._src import xla_bridge
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from vqvae2_jax import errors

DATA_AXES = ('data', 'fsdp')  # Batch dimension is split over both axes.
# Arrays smaller than this stay replicated even on an 'fsdp' mesh: splitting
# biases and small kernels costs more in communication than it saves.
_MIN_FSDP_SIZE = 2**14
PyTree = Any


# The explicit multi-process settings, as the local launcher
# (`vqvae2_jax.launch`) or a user's own script sets them for each process.
COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'


def distributed_settings(environ: Mapping[str, str] | None = None
                         ) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` arguments this process should use.

  Explicit settings come first: JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (what `vqvae2_jax.launch` sets).
  Otherwise a multi-host job is recognised by what cluster launchers set
  (SLURM_NTASKS > 1, several TPU_WORKER_HOSTNAMES, or a coordinator address
  alone), and JAX detects the rest itself.

  Args:
    environ: the environment to read; None reads `os.environ`.

  Returns:
    The keyword arguments of `jax.distributed.initialize` ({} lets JAX
    detect everything), or None for a single process.

  Raises:
    errors.ConfigError: the explicit settings are incomplete or invalid.
  """
  env = os.environ if environ is None else environ
  explicit = {k: env.get(k) for k in (COORDINATOR_ENV, NUM_PROCESSES_ENV,
                                      PROCESS_ID_ENV)}
  if explicit[NUM_PROCESSES_ENV] or explicit[PROCESS_ID_ENV]:
    try:
      num_processes = int(explicit[NUM_PROCESSES_ENV])
      process_id = int(explicit[PROCESS_ID_ENV])
    except (TypeError, ValueError):
      num_processes = process_id = -1
    if (not explicit[COORDINATOR_ENV] or num_processes < 1 or
        not 0 <= process_id < num_processes):
      raise errors.ConfigError(
          f'Incomplete multi-process settings: {COORDINATOR_ENV}='
          f'{explicit[COORDINATOR_ENV]!r}, {NUM_PROCESSES_ENV}='
          f'{explicit[NUM_PROCESSES_ENV]!r}, {PROCESS_ID_ENV}='
          f'{explicit[PROCESS_ID_ENV]!r}. Fix: set all three (host:port of '
          'process 0, the number of processes, and this process\'s id in '
          '0..n-1), or none of them.')
    if num_processes == 1:
      return None
    return {'coordinator_address': explicit[COORDINATOR_ENV],
            'num_processes': num_processes, 'process_id': process_id}
  multi_host = (
      bool(explicit[COORDINATOR_ENV])
      or int(env.get('SLURM_NTASKS', '1')) > 1
      or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
  return {} if multi_host else None


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` once, only on multi-process set-ups.

  What `distributed_settings` finds decides; a single process never
  initializes, so notebooks and tests are unaffected. CPU processes exchange
  data through gloo (XLA:CPU has no collectives across processes otherwise).
  Call it before anything else touches JAX's devices.
  """
  if getattr(maybe_initialize_distributed, '_done', False):
    return
  settings = distributed_settings()
  if settings is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**settings)
    logging.info('Initialized JAX distributed: process %d of %d.',
                 jax.process_index(), jax.process_count())
    if jax.default_backend() == 'cpu':
      connect_cpu_collectives()
  maybe_initialize_distributed._done = True


def connect_cpu_collectives() -> None:
  """Connects the CPU processes' device groups while the processes are in step.

  gloo connects a group of devices the first time a program communicates
  over it, and gives up when a peer has not arrived within 30 s (XLA's
  fixed limit): a process that compiles longer, prepares data alone or is
  starved on a busy machine failed the run ('Gloo context initialization
  failed: DEADLINE_EXCEEDED'; its peer then waited at JAX's shutdown barrier,
  or aborted). A connected group waits as long as XLA's collective timeout
  (minutes). Called right after `jax.distributed.initialize`, whose barrier
  leaves the processes in step, this connects the groups the stages use: all
  devices (the sums of the train and evaluation steps over the mesh), and
  each local device with its peers in the other processes (what
  `multihost_utils` barriers, broadcasts and gathers use).
  """
  mesh = Mesh(np.asarray(jax.devices()), ('devices',))
  ones = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P('devices')),
      np.ones(jax.local_device_count(), np.int32))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
  assert int(total.addressable_data(0)) == jax.device_count()
  multihost_utils.sync_global_devices('connect_cpu_collectives')


HOST_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def split_host_cpu(count: int) -> bool:
  """Makes JAX's CPU backend `count` devices, if JAX has not started yet.

  XLA:CPU runs one program's operations mostly one after another, each
  spread over the cores: the many small convolutions of a VQ-VAE leave cores
  idle. With one CPU device per core, the data-parallel train step runs one
  program per device side by side (on 2 cores, stage 1 of the Fashion-MNIST
  default trains 1.3x faster: experiments/peer_protocol.py). The result is
  that of a data-parallel run on `count` devices, the same on every CPU
  machine. Accelerator backends are unaffected.

  On a machine with fewer than 2 * `count` cores, XLA's CPU client gets
  more threads for launching programs (`reserve_launch_threads`): without
  them the data-parallel steps deadlocked in XLA:CPU's all-reduce on a busy
  machine. Devices made by XLA_FLAGS get none (set PJRT_NPROC=2n for n
  devices there).

  Args:
    count: CPU devices wanted (config.mesh.cpu_devices); 0 keeps JAX's
      default (one).

  Returns:
    True if the setting was applied. It is not when `count` is 0, when
    XLA_FLAGS already sets --xla_force_host_platform_device_count (the
    user's or the launcher's choice wins), or when JAX's backends have
    started already (a notebook or test that ran JAX code first; logged).
  """
  if count <= 0 or HOST_DEVICE_FLAG in os.environ.get('XLA_FLAGS', ''):
    # Also no `reserve_launch_threads`: the variable it sets would reach
    # every process started from this one (a test session's subprocesses).
    return False
  if xla_bridge.backends_are_initialized():
    if (jax.default_backend() == 'cpu' and
        jax.local_device_count() != count):
      logging.info('config.mesh.cpu_devices=%d not applied: JAX started '
                   'with %d CPU device(s) before the config was read (set it '
                   'before any JAX code runs, or XLA_FLAGS=%s=%d).', count,
                   jax.local_device_count(), HOST_DEVICE_FLAG, count)
    return False
  jax.config.update('jax_num_cpu_devices', int(count))
  reserve_launch_threads(int(count))
  return True


# How many threads XLA's CPU client starts for its launch pool (and its
# intra-op pool): the first of these set, else the cores this process may use.
PJRT_THREADS_ENV = ('PJRT_NPROC', 'NPROC')


def reserve_launch_threads(count: int,
                           environ: MutableMapping[str, str] | None = None
                           ) -> int | None:
  """Gives XLA's CPU client enough threads for `count` devices' collectives.

  XLA:CPU runs each device's share of a multi-device program from one thread
  pool, sized max(cores, devices). Both kinds of task in it can wait on
  another: a device's launch waits while that device already has its
  limit of programs in flight (32; 1 without asynchronous dispatch), and a
  running share waits at an all-reduce until every device's share arrives.
  With one thread per device (2 devices on 2 cores, the Fashion-MNIST
  default), one thread ran device 0's share of a train step, stuck in the
  all-reduce, and the other a launch for device 1, stuck on device 1's
  limit; device 1's share, queued behind them, never ran (gdb: one
  `InProcessCommunicator::AllReduce`, one `Semaphore::Acquire` in
  `ExecuteLaunch`, the main thread in `PjitFunction::Call`, the machine
  idle), and XLA ended the process after 40 s. Measured on 2 cores with
  two busy processes beside (tests/test_parallel.py): a data-parallel step
  that Python dispatches faster than it runs (256-wide matrices), so that
  the limit fills, deadlocked in 10 of 10 runs with 2 threads, 1 of 2 with
  3, none of 12 with 4; a step bound by its dispatch (64-wide) in 7 of 19
  runs with 2 threads, none of 7 with 3 or 4. Asynchronous dispatch off
  did not help (3 of 3 deadlocked). 2 * `count` threads hold every launch
  waiting at once beside every share of one collective (XLA runs one
  multi-device program at a time; launches come from one Python thread).

  XLA reads the setting when JAX's CPU backend starts, so this must run
  before; a value the user set (PJRT_NPROC or NPROC) is kept. It sizes
  XLA's intra-op pool too, on machines with fewer than 2 * `count` cores
  only: the Fashion-MNIST priors' state after 40 steps was bitwise the
  same with 2 and 4 threads on 2 cores.

  Args:
    count: CPU devices JAX will make.
    environ: the environment to change; None changes `os.environ` (what
      XLA reads).

  Returns:
    The thread count set, or None when nothing was set (one device, enough
    cores, or the user's own setting).
  """
  env = os.environ if environ is None else environ
  if count <= 1 or any(env.get(name) for name in PJRT_THREADS_ENV):
    return None
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux: what XLA counts there too.
    cores = os.cpu_count() or 1
  threads = 2 * count
  if cores >= threads:
    return None
  env[PJRT_THREADS_ENV[0]] = str(threads)
  return threads


def use_compilation_cache(directory: str) -> bool:
  """Keeps this process's compiled programs in `directory` for later ones.

  JAX's persistent compilation cache: a program compiled once (the samplers,
  the decoder, a train step) is read back by the next process that compiles
  the same program for the same devices, instead of compiled again. On an
  H200 the paper-size samplers took 8 to 15 s to compile, longer than
  sampling a 256x256 image with them (under 3 s). Every program is kept,
  however fast it compiled: the first image also waits for a dozen small
  ones (input checks, key folding, the decoder), and JAX's default keeps
  only those that took a second or more.

  The directory is trusted: a program read from it runs as this process.
  Share it only with people who may run code as you.

  Args:
    directory: where to keep the programs (made if missing); '' leaves
      JAX's setting as it is (off unless JAX_COMPILATION_CACHE_DIR says
      otherwise).

  Returns:
    Whether this call set the cache (False for '').

  Raises:
    errors.ConfigError: `directory` cannot be made or is not a directory.
  """
  if not directory:
    return False
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(
        f'The compilation cache directory {directory} cannot be made '
        f'({e.strerror or e}). Fix: pass a writable directory, or \'\' for '
        'no cache.') from e
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    # JAX opens its cache once, at the first compilation; forgetting it makes
    # the next compilation open this directory, even after earlier ones.
    compilation_cache.reset_cache()
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return True


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


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
  """Shardings for a (possibly abstract) state pytree on `mesh`.

  Everything is replicated, except on a mesh whose 'fsdp' axis has more than
  one device: there each large array is split along its largest dimension
  that the axis divides (FSDP). Adam's moments have the params' shapes, so
  they follow the same rule.

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the ('data', 'fsdp') mesh.

  Returns:
    A pytree of `NamedSharding`s with the structure of `abstract_state`.
  """
  fsdp = dict(mesh.shape).get('fsdp', 1)

  def sharding(x):
    shape = tuple(getattr(x, 'shape', ()))
    if fsdp > 1 and math.prod(shape) >= _MIN_FSDP_SIZE:
      for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
          spec = [None] * len(shape)
          spec[axis] = 'fsdp'
          return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(sharding, abstract_state)


def abstract_with_shardings(state_or_abstract: PyTree, shardings: PyTree
                            ) -> PyTree:
  """`jax.ShapeDtypeStruct`s that carry `shardings` (a restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state_or_abstract, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated or process-local array as numpy on this host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def primary_view(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a collective: all must call it).

  For a decision read from the shared filesystem ("does this checkpoint
  directory exist yet?") that leads to collectives or orbax barriers:
  processes that read it at different moments may see different answers
  (process 0 creating the directory in between), and then reach different
  barriers. Taking process 0's answer keeps them in step.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(
      np.asarray(bool(flag), np.int32)))


def all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: all must call it).

  For a step that may fail on one process only (each reads its own shards
  of a checkpoint): all then take the same branch.
  """
  if jax.process_count() == 1:
    return bool(ok)
  flags = multihost_utils.process_allgather(np.asarray(bool(ok), np.int32))
  return bool(np.all(flags))


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


# A preemption notice (SIGTERM) to a single process: set by the handler of
# `preemption_notices` or `preemption_watch`, read by `preempted`.
_NOTICE = threading.Event()
_RUN_WATCHES = []  # One entry per active `preemption_notices`.


def _take_notice(signum: int, frame: Any) -> None:
  del signum, frame
  _NOTICE.set()


@contextlib.contextmanager
def preemption_notices() -> Iterator[None]:
  """Catches SIGTERM for a whole run, so that every phase can honour it.

  The one mechanism behind a preemption notice in a single process: from
  the start of `stages.run` to its end, SIGTERM only sets a flag (it no
  longer kills the process). Training loops stop and checkpoint at their
  next step (`preemption_watch`), code extraction after its next complete
  shard, and the other phases (a stage's final evaluation, sampling, the
  evaluation report, export) finish what they write and the run stops
  before its next stage; each raises `errors.Preempted` (one line, exit 0).
  With several processes JAX catches SIGTERM from `jax.distributed
  .initialize` on and the training loops agree on a step with it; off the
  main thread nothing is installed.
  """
  if (jax.process_count() > 1 or
      threading.current_thread() is not threading.main_thread()):
    yield
    return
  # A notice belongs to the run it came during: cleared here and at its end.
  _NOTICE.clear()
  previous = signal.signal(signal.SIGTERM, _take_notice)
  _RUN_WATCHES.append(previous)
  try:
    yield
  finally:
    _RUN_WATCHES.pop()
    signal.signal(signal.SIGTERM, previous)
    _NOTICE.clear()


def preempted() -> bool:
  """Whether a preemption notice came to this (single) process in this run.

  Always False with several processes (there JAX holds the notice, and
  only `preemption_watch`'s sync point can agree on a step).
  """
  return jax.process_count() == 1 and _NOTICE.is_set()


@contextlib.contextmanager
def preemption_watch() -> Iterator[Callable[[int], bool]]:
  """Watches for a preemption notice (SIGTERM) while a training loop runs.

  Yields `reached(count) -> bool`, to be called by every process at every
  step with the steps taken so far in this run (1, 2, ...): True at the one
  step where all processes stop and save. With several processes the
  agreement is JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`): from
  `jax.distributed.initialize` on, JAX catches SIGTERM on any process, and
  the processes settle on the count after the furthest one reached (1 when
  the notice came before the first step). A single process stops at its
  next step; a notice that came at the last step (during the final
  evaluation) stays for `preempted` after the loop. Outside
  `preemption_notices` the loop catches SIGTERM itself meanwhile (the
  previous handler is put back afterwards).
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False  # Signal handlers live on the main thread only.
    return
  if _RUN_WATCHES:  # The run's handler is in place and its notice counts.
    yield lambda step: _NOTICE.is_set()
    return
  _NOTICE.clear()
  previous = signal.signal(signal.SIGTERM, _take_notice)
  try:
    yield lambda step: _NOTICE.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)

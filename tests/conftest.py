"""Test session set-up: 8 fake CPU devices for every test.

XLA reads its flags once, when the backend starts, so they are set here,
before any test module imports jax. Tests that want one device build their
mesh over `jax.devices()[:1]`.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ['JAX_PLATFORMS'] = 'cpu'
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# The suite's time is mostly XLA compiling small programs, not running them.
# Without LLVM's optimisations the CPU backend compiles them faster: the
# xdist run took 1532 s against 2047 s (the summed test times 2976 s against
# 3974 s; both beside the same training run on a 2-core machine). XLA's own
# (HLO) passes still run, so the programs compute the same operations; only
# their machine code is slower. The processes tests start inherit the flag.
# An optimisation level set by whoever runs the tests is kept.
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
# XLA:CPU's older emitters for fused loops compile these small programs in
# about half the time of its fusion emitters (a tiny prior's train step:
# 1.1 s against 2.1 s; two test files: 85 s of CPU against 118 s). The same
# HLO is computed either way. Only with LLVM's optimisations off: with them
# on, as a user runs, the fusion emitters compile and run faster (the
# default config's lower prior step: 8.1 s and 107 ms against 11.6 s and
# 128 ms), so the library leaves XLA's default alone. XLA aborts on a flag
# it does not know, and a later jaxlib may drop this one, so a child process
# tries it first; the answer is handed down to xdist's workers and the
# processes tests start.
_LOOP_EMITTERS = '--xla_cpu_use_fusion_emitters=false'


def _xla_accepts_loop_emitters() -> bool:
  tried = os.environ.get('VQVAE2_TESTS_LOOP_EMITTERS')
  if tried is None:
    done = subprocess.run(
        [sys.executable, '-c', 'import jax; jax.devices()'],
        env={**os.environ, 'XLA_FLAGS': _LOOP_EMITTERS,
             'JAX_PLATFORMS': 'cpu'},
        capture_output=True, timeout=300, check=False)
    tried = os.environ['VQVAE2_TESTS_LOOP_EMITTERS'] = str(
        int(done.returncode == 0))
  return tried == '1'


if ('--xla_cpu_use_fusion_emitters' not in _flags and
    _xla_accepts_loop_emitters()):
  _flags += ' ' + _LOOP_EMITTERS
os.environ['XLA_FLAGS'] = _flags.strip()
# Keep TensorFlow (tf.data) off any accelerator and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


def _session_dir(variable: str, prefix: str) -> tuple[str, bool]:
  """(the directory handed down in `variable`, False), or a fresh one made
  here and handed down to this process's children (True: remove it at the
  end of the session)."""
  handed_down = os.environ.get(variable)
  if handed_down:
    return handed_down, False
  os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
  return os.environ[variable], True


# One tfds data_dir for the whole session, fresh each run: Fashion-MNIST is
# prepared from the Debian files once (about a minute) and every test that
# reads the default data_dir finds it; nothing is written to ~/.
# A data_dir handed down in VQVAE2_TESTS_TFDS_DIR is used instead and left
# for whoever made it: scripts/test.sh shares one between its two pytest
# runs, and pytest-xdist's workers inherit the one their controller made
# (tfds_prepare's file lock lets one worker prepare while the other waits),
# so the minute is spent once, not once per process.
_TFDS_DIR, _OWN_TFDS_DIR = _session_dir('VQVAE2_TESTS_TFDS_DIR', 'vqvae2_tfds_')
os.environ['TFDS_DATA_DIR'] = _TFDS_DIR

# A persistent JAX compilation cache for the session, fresh each run: a
# program compiled once (the tiny config's train steps, samplers, decoder)
# is read back by later tests in the same process and by the processes the
# tests start (`python -m vqvae2_jax.main ...`, experiment scripts), which
# inherit it through JAX_COMPILATION_CACHE_DIR. Every program is kept, as
# `parallel.use_compilation_cache` does. Each test process (each xdist
# worker) has a directory of its own under one root: JAX writes an entry
# without a lock or a rename, so two processes must not write one directory
# at the same time. The processes a test starts run while it waits, and of a
# multi-process run's peers only process 0 writes (JAX's rule). The root is
# made and removed like the tfds data_dir above. Tests that count the cache's
# hits and misses pass a directory of their own (`use_compilation_cache`
# replaces this one), or none (experiments/first_image.py's 'off' run drops
# the variable).
_JAX_CACHE_ROOT, _OWN_JAX_CACHE = _session_dir('VQVAE2_TESTS_JAX_CACHE_DIR',
                                               'vqvae2_jax_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(
    _JAX_CACHE_ROOT, os.environ.get('PYTEST_XDIST_WORKER', 'main'))
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


# The files that take longest (their tests train workdirs, run notebooks or
# experiment scripts; `pytest --durations`), slowest first. pytest-xdist's
# workers (scripts/test.sh) hand them out before the rest, so that neither
# worker ends the run on one of them alone while the other idles. A name
# missing here only loses that head start.
_SLOW_FILES = (
    'tests/test_experiments.py',
    'tests/test_api.py',
    'tests/test_colabs.py',
    'tests/test_faults.py',
    'tests/test_peer_prior.py',
    'tests/models/test_vqvae.py',
    'tests/models/test_pixelcnn.py',
    'tests/test_hostmem.py',
    'tests/test_sampler_variants.py',
    'tests/test_stage1_scaling.py',
)


def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist, orders files: `_SLOW_FILES`, then by test count.

  The count order is xdist's own (its --loadscope-reorder), which
  scripts/test.sh turns off so that this order is the one used. Both
  workers collect the same items, so they agree on it. A run without
  xdist keeps pytest's order.
  """
  del config
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    return
  files = [item.nodeid.split('::')[0] for item in items]
  counts = collections.Counter(files)
  first = {}
  for index, name in enumerate(files):
    first.setdefault(name, index)

  def rank(index):
    name = files[index]
    slow = _SLOW_FILES.index(name) if name in _SLOW_FILES else len(_SLOW_FILES)
    return slow, -counts[name], first[name]

  order = sorted(range(len(items)), key=rank)
  items[:] = [items[i] for i in order]


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_TFDS_DIR:
    shutil.rmtree(_TFDS_DIR, ignore_errors=True)
  if _OWN_JAX_CACHE:
    shutil.rmtree(_JAX_CACHE_ROOT, ignore_errors=True)


# Shared fixtures. Imports stay inside them: jax must not load before the
# flags above are set.


def _save_checkpoint(stage_dir, step, state, fingerprint):
  """Writes `state` as checkpoint `step` of a stage, synchronously."""
  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import checkpoints
  from vqvae2_jax import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  checkpoints.save_now(workdir_lib.checkpoint_dir(stage_dir), step, state,
                       fingerprint)


@pytest.fixture(scope='session')
def stage2_config():
  """fashion_mnist.py:tiny on 96 training and 40 held-out images, shards of 32.

  Shared by the session: copy it (`copy_and_resolve_references`) before
  changing it.
  """
  # The smoke config of experiments/prior_families.py, whose test gives it
  # `codes_workdir` as its base: one helper, so the two cannot drift apart.
  from experiments import prior_families  # pylint: disable=g-import-not-at-top
  return prior_families.smoke_config()


@pytest.fixture(scope='session')
def stage2_workdir(tmp_path_factory, stage2_config):
  """A workdir of `stage2_config` with finished vqvae/, codes/, prior_<i>/.

  (path, {mode: the stage's result}). Trained once per session (stage 1,
  codes, both priors) and shared read-only by the modules that need a
  finished run (test_faults.py): copy it (`shutil.copytree`) before
  changing or adding to it. Tests that only need codes take the cheaper
  `codes_workdir`.
  """
  from vqvae2_jax import stages  # pylint: disable=g-import-not-at-top
  config = stage2_config.copy_and_resolve_references()
  workdir = str(tmp_path_factory.mktemp('stage2_workdir') / 'finished')
  results = {mode: stages.run(mode, config, workdir)[mode]
             for mode in ('vqvae', 'codes', 'prior')}
  return workdir, results


@pytest.fixture(scope='session')
def save_vqvae_checkpoint():
  """A function that writes an untrained VQ-VAE as a stage-1 checkpoint.

  `save(config, workdir, *, seed=0, step=1)` writes checkpoint `step` of
  workdir/vqvae; different `seed`s give different weights (the initial
  params scaled by 1 + seed / 20), so their codes carry different
  provenance. The initial state is built once per model fingerprint.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from vqvae2_jax import builders
  from vqvae2_jax import parallel
  from vqvae2_jax import workdir as workdir_lib
  from vqvae2_jax.train import vqvae_trainer
  # pylint: enable=g-import-not-at-top

  initial_states = {}  # Model fingerprint -> initial stage-1 state.

  def initial_state(config):
    key = json.dumps(builders.vqvae_fingerprint(config), sort_keys=True)
    if key not in initial_states:  # Compiling the init once saves seconds.
      progs = vqvae_trainer.programs(config, parallel.create_mesh(config.mesh))
      initial_states[key] = progs.init(jax.random.PRNGKey(0))
    return initial_states[key]

  def save(config, workdir, *, seed=0, step=1):
    state = initial_state(config)
    params = jax.tree.map(lambda x: x * (1.0 + seed / 20.0), state.params)
    state = state.replace(step=jnp.asarray(step, jnp.int32), params=params)
    _save_checkpoint(workdir_lib.Workdir(workdir).vqvae, step, state,
                     builders.vqvae_fingerprint(config))

  return save


@pytest.fixture(scope='session')
def codes_workdir(tmp_path_factory, stage2_config, save_vqvae_checkpoint):
  """A workdir of `stage2_config` with an untrained vqvae/, its codes/ and
  config.json, no priors.

  For tests that need codes, not a trained stage 1 (test_peer_prior.py,
  test_experiments.py): cheaper than `stage2_workdir`, which pytest-xdist
  would otherwise train again on each worker running one of them. Shared
  read-only: copy it before changing it.
  """
  from vqvae2_jax import stages  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('codes_workdir')
  config = stage2_config.copy_and_resolve_references()
  save_vqvae_checkpoint(config, str(workdir))
  stages.run('codes', config, str(workdir))
  assert (workdir / 'config.json').is_file()
  return workdir


@pytest.fixture(scope='session')
def save_classifier_checkpoint():
  """A function that writes an untrained domain classifier as a checkpoint.

  `save(config, workdir, mesh, *, step, seed=1)` returns the saved state.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from vqvae2_jax import builders
  from vqvae2_jax import workdir as workdir_lib
  from vqvae2_jax.train import classifier_trainer
  # pylint: enable=g-import-not-at-top

  def save(config, workdir, mesh, *, step, seed=1):
    state = classifier_trainer.programs(config, mesh).init(
        jax.random.PRNGKey(seed))
    _save_checkpoint(workdir_lib.Workdir(workdir).classifier, step, state,
                     builders.classifier_fingerprint(config))
    return state

  return save


@pytest.fixture
def forbid_random_init(monkeypatch):
  """`forbid(trainer)`: the trainer module's programs' random init may then
  only be traced (as `train_state.restore_target`'s `jax.eval_shape` does):
  run on a key, it fails the test. For stages that start from given weights.
  """
  # pylint: disable-next=g-import-not-at-top
  import jax

  def forbid(trainer):
    programs = trainer.programs

    def guarded_programs(*args, **kwargs):
      progs = programs(*args, **kwargs)

      def init(rng):
        if not isinstance(rng, jax.core.Tracer):
          raise AssertionError('a random init ran for weights that are '
                               'then replaced')
        # Traced: the plain function (a jit with compiler options may not
        # be nested).
        return progs.init.__wrapped__(rng)

      return progs._replace(init=init)

    monkeypatch.setattr(trainer, 'programs', guarded_programs)

  return forbid


@pytest.fixture
def tiny_judge(tmp_path):
  """A random judge of a few hundred parameters, saved with its digest.

  Returns a `judges.JudgeSpec` for Fashion-MNIST's images whose file is in
  `tmp_path`: tests put it in place of the shipped judge
  (`monkeypatch.setitem(judges.JUDGES, 'fashion_mnist', spec)`) and never
  depend on the shipped one's training.
  """
  # pylint: disable=g-import-not-at-top
  import dataclasses
  import jax
  import jax.numpy as jnp
  from vqvae2_jax.evaluation import judges
  # pylint: enable=g-import-not-at-top
  spec = dataclasses.replace(
      judges.JUDGES['fashion_mnist'], filename=str(tmp_path / 'tiny.msgpack'),
      sha256='', widths=(4, 8), convs_per_stage=(1, 1), test_accuracy=0.1)
  variables = spec.module().init(jax.random.PRNGKey(0),
                                 jnp.zeros((1, 32, 32, 1)))
  return dataclasses.replace(spec, sha256=judges.save(variables,
                                                      spec.filename))

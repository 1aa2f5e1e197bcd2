"""Faults a user meets (issues 16, 28): read-only workdirs, full disks, damage.

A finished tiny run (VQ-VAE, codes, priors) is made read-only as a user
would: `chmod -R a-w` as a normal user; as root, where permissions do not
stop writes, a read-only bind mount of it. Its finished stages must run
again reading only, and sampling into it must fail before any sampling,
naming the path. A disk that fills up during code extraction is one
message, and the shards already written stay for the rerun.

A damaged newest checkpoint (each kind of damage seen) is passed over for
the newest intact one: training resumes from it, setting the damaged step
aside, and later stages load it; every checkpoint damaged is one line.
"""

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.train import test_common as toy  # The toy stage of run_training.
from vqvae2_jax import builders
from vqvae2_jax import checkpoints
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import loading
from vqvae2_jax import sampling
from vqvae2_jax import stages
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.train import extract


def _tree(directory):
  """{relative path: (size, mtime_ns)} of every file and directory."""
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(root, name)
      info = os.stat(path)
      out[os.path.relpath(path, directory)] = (
          info.st_size if stat.S_ISREG(info.st_mode) else 0, info.st_mtime_ns)
  return out


@contextlib.contextmanager
def _read_only(directory):
  """Yields a read-only path showing `directory` (see the module docstring).

  Root without the right to mount gets the same checks another way (see
  the fallback below); the test never skips.
  """
  directory = str(directory)
  if os.geteuid() != 0:
    subprocess.run(['chmod', '-R', 'a-w', directory], check=True)
    try:
      yield directory
    finally:
      subprocess.run(['chmod', '-R', 'u+w', directory], check=True)
    return
  view = directory + '_read_only'
  os.makedirs(view)
  try:
    mounted = subprocess.run(['mount', '--bind', directory, view],
                             capture_output=True).returncode == 0
  except OSError:  # No mount command.
    mounted = False
  if not mounted:
    # Root without the right to mount (a container): writes cannot be
    # refused, so they are detected instead (every file's size and mtime
    # are compared afterwards), and samples/ is blocked by a regular file,
    # which no user can create a directory over.
    os.rmdir(view)
    info = os.stat(directory)
    blocker = os.path.join(directory, 'samples')
    with open(blocker, 'w'):
      pass
    try:
      yield directory
    finally:
      os.remove(blocker)
      os.utime(directory, ns=(info.st_atime_ns, info.st_mtime_ns))
    return
  try:
    subprocess.run(['mount', '-o', 'remount,ro,bind', view], check=True)
    with pytest.raises(OSError) as info:  # The view really is read-only.
      open(os.path.join(view, 'probe'), 'w').close()
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    yield view
  finally:
    subprocess.run(['umount', '--lazy', view], check=True)


@pytest.fixture(scope='module')
def config(stage2_config):
  return stage2_config.copy_and_resolve_references()


@pytest.fixture(scope='module')
def finished(tmp_path_factory, config):
  """A workdir with finished vqvae/, codes/ and prior_<i>/: (path, results)."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  results = {mode: stages.run(mode, config, workdir)[mode]
             for mode in ('vqvae', 'codes', 'prior')}
  return workdir, results


def test_finished_stages_run_again_in_a_read_only_workdir(
    finished, config, tmp_path, monkeypatch):
  workdir, results = finished
  copy = str(tmp_path / 'shared')
  shutil.copytree(workdir, copy)
  before = _tree(copy)
  sampled = []
  monkeypatch.setattr(sampling, 'sample_hierarchy',
                      lambda *a, **k: sampled.append(1))
  with _read_only(copy) as view:
    again = {mode: stages.run(mode, config, view)[mode]
             for mode in ('vqvae', 'codes', 'prior')}
    # Sampling writes: it fails at once, naming the path, before sampling.
    with pytest.raises(errors.WorkdirError) as info:
      stages.run('sample', config, view)
  assert again['vqvae'] == results['vqvae']
  assert again['prior'] == results['prior']
  assert again['codes']['vqvae_step'] == results['codes']['vqvae_step']
  message = str(info.value)
  assert message.startswith(f'Cannot write samples to {view}/samples')
  assert 'Fix: ' in message
  assert not sampled
  assert _tree(copy) == before  # Nothing written, nothing touched.


def test_a_disk_that_fills_during_code_extraction(finished, config, tmp_path,
                                                  monkeypatch):
  workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  shutil.rmtree(workdir_lib.Workdir(copy).codes)
  write_shard, written = codes_lib.write_shard, []

  def full_after_two(path, records):
    if len(written) == 2:
      # As numpy's write of a real full disk; atomic_write cleans up.
      files.atomic_write(path, lambda f: _raise_enospc())
    write_shard(path, records)
    written.append(path)

  monkeypatch.setattr(codes_lib, 'write_shard', full_after_two)
  with pytest.raises(errors.WorkdirError) as info:
    extract.extract_codes(config, copy)
  codes = workdir_lib.Workdir(copy).codes
  assert str(info.value).startswith(f'The disk is full writing to {codes}')
  assert ('the 2 complete code shard(s) are kept and a rerun extracts only '
          'the rest. Fix: free space') in str(info.value)
  names = sorted(os.listdir(os.path.join(codes, 'train')))
  assert names == ['00000-of-00003.npy', '00001-of-00003.npy']  # No .tmp.
  # Space freed: the rerun writes only the missing shards and the result
  # equals the uninterrupted extraction's.
  monkeypatch.setattr(codes_lib, 'write_shard', write_shard)
  written_again = []
  monkeypatch.setattr(codes_lib, 'write_shard', lambda path, records: (
      written_again.append(os.path.basename(path)),
      write_shard(path, records)))
  extract.extract_codes(config, copy)
  assert written_again == ['00002-of-00003.npy', '00000-of-00002.npy',
                           '00001-of-00002.npy']
  reference = workdir_lib.Workdir(workdir).codes
  for role, name in [('train', '00002-of-00003.npy'),
                     ('eval', '00001-of-00002.npy')]:
    with open(os.path.join(codes, role, name), 'rb') as a, open(
        os.path.join(reference, role, name), 'rb') as b:
      assert a.read() == b.read()


def _raise_enospc():
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_recognised_through_orbax_and_tensorstore():
  assert files.is_disk_full(OSError(errno.ENOSPC, 'No space left on device'))
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database: Failed '
      "to write 4096 bytes to file 5: No space left on device "
      "[os_error_code='28']")
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError('Save Finalize thread failed.') from e
  except RuntimeError as wrapped:
    assert files.is_disk_full(wrapped)
  assert not files.is_disk_full(OSError(errno.EACCES, 'Permission denied'))
  assert not files.is_disk_full(ValueError('RESOURCE_EXHAUSTED: out of memory'))


# Damaged checkpoints (issue 28): each kind of damage that stopped a run with
# a tensorstore traceback, done to the newest step of a stage.


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _truncate_data_files(step_dir):
  data = [os.path.join(root, name)
          for root, _, names in os.walk(os.path.join(step_dir, 'state'))
          if os.path.basename(root) == 'd' for name in names]
  assert data
  for path in data:
    _truncate(path)


def _empty_fingerprint(step_dir):
  with open(os.path.join(step_dir, 'fingerprint', 'metadata'), 'w'):
    pass


_DAMAGE = {
    'truncated data file': _truncate_data_files,
    'removed _METADATA': lambda d: os.remove(
        os.path.join(d, 'state', '_METADATA')),
    'truncated manifest.ocdbt': lambda d: _truncate(
        os.path.join(d, 'state', 'manifest.ocdbt')),
    'empty fingerprint': _empty_fingerprint,
}


def _files(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def _warnings(caplog):
  """The warnings a console shows (orbax's routine ones are not)."""
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and
          not console._ROUTINE.search(r.getMessage())]


@pytest.fixture(scope='module')
def toy_uninterrupted(tmp_path_factory):
  """The toy stage's result trained to step 6 in one run."""
  return toy._run(tmp_path_factory.mktemp('toy') / 'whole', 6, [], [])


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_training_resumes_from_the_newest_intact_checkpoint(
    damage, toy_uninterrupted, tmp_path, caplog):
  directory = tmp_path / 'toy'
  toy._run(directory, 4, [], [], keep=2)
  ckpts = directory / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['2', '4']
  _DAMAGE[damage](str(ckpts / '4'))
  damaged = _files(ckpts / '4')
  calls = []
  with caplog.at_level(logging.WARNING):
    resumed = toy._run(directory, 6, calls, [], keep=2)
    gc.collect()  # asyncio reports unawaited failed reads when collected.
  # Restored step 2, not initialised, and trained on as if never damaged.
  assert toy._real_inits(calls) == 0
  assert resumed['step'] == 6
  assert resumed['eval/error'] == toy_uninterrupted['eval/error']
  assert resumed['train/loss'] == toy_uninterrupted['train/loss']
  # One warning line, naming the damaged step and where it is kept.
  (warning,) = _warnings(caplog)
  assert '\n' not in warning
  assert warning.startswith(f'Checkpoint step(s) 4 in {ckpts} are damaged')
  assert 'resuming from step 2 instead' in warning
  assert warning.endswith('Kept for inspection as 4.damaged-1.')
  # The damaged files are kept as they were, beside the new checkpoints.
  assert sorted(os.listdir(ckpts)) == ['4', '4.damaged-1', '6']
  assert _files(ckpts / '4.damaged-1') == damaged
  # Those new checkpoints read back: a longer run resumes from step 6.
  calls = []
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    longer = toy._run(directory, 8, calls, [], keep=2)
  assert toy._real_inits(calls) == 0 and longer['step'] == 8
  assert not _warnings(caplog)
  assert sorted(os.listdir(ckpts)) == ['4.damaged-1', '6', '8']


def test_a_finished_stage_with_a_damaged_last_checkpoint_trains_it_again(
    toy_uninterrupted, tmp_path, caplog):
  directory = tmp_path / 'toy'
  toy._run(directory, 6, [], [], keep=2)
  ckpts = directory / 'checkpoints'
  _empty_fingerprint(str(ckpts / '6'))
  calls = []
  with caplog.at_level(logging.WARNING):
    again = toy._run(directory, 6, calls, [], keep=2)
  # Not taken for finished: resumed from step 4 and trained step 6 again.
  assert toy._real_inits(calls) == 0
  assert again['eval/error'] == toy_uninterrupted['eval/error']
  (warning,) = _warnings(caplog)
  assert 'resuming from step 4 instead' in warning
  assert sorted(os.listdir(ckpts)) == ['4', '6', '6.damaged-1']


def test_training_with_every_checkpoint_damaged_is_one_line(tmp_path):
  directory = tmp_path / 'toy'
  toy._run(directory, 4, [], [], keep=2)
  ckpts = directory / 'checkpoints'
  _truncate_data_files(str(ckpts / '2'))
  _empty_fingerprint(str(ckpts / '4'))
  before = _files(ckpts)
  calls = []
  with pytest.raises(errors.NoIntactCheckpointError) as info:
    toy._run(directory, 6, calls, [], keep=2)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(
      f'No checkpoint in {ckpts} reads back: step(s) 4, 2 are damaged')
  assert 'Fix: ' in message
  assert toy._real_inits(calls) == 0  # Not started again from scratch.
  assert _files(ckpts) == before  # Nothing moved, nothing deleted.


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_later_stages_load_the_newest_intact_checkpoint(
    damage, config, save_vqvae_checkpoint, tmp_path, caplog):
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir, step=1)
  save_vqvae_checkpoint(config, workdir, seed=1, step=2)
  ckpts = workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).vqvae)
  _DAMAGE[damage](os.path.join(ckpts, '2'))
  before = _files(ckpts)
  fingerprint = builders.vqvae_fingerprint(config)
  checkpoints.check_directory(ckpts, fingerprint)  # A trainer's first check.
  with caplog.at_level(logging.WARNING):
    _, variables, step = loading.load_vqvae(config, workdir)
  assert step == 1
  (warning,) = [w for w in _warnings(caplog) if 'damaged' in w]
  assert '\n' not in warning
  assert warning.startswith(
      f'Checkpoint step(s) 2 in {ckpts} are damaged (step 2: ')
  assert warning.endswith('); using step 1 instead.')
  assert _files(ckpts) == before  # A reader moves nothing.
  # Every process would choose the same: the same files, the same step.
  assert loading.load_vqvae(config, workdir)[2] == 1
  del variables


def test_later_stages_with_every_checkpoint_damaged_is_one_line(
    config, save_vqvae_checkpoint, tmp_path):
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir, step=1)
  save_vqvae_checkpoint(config, workdir, seed=1, step=2)
  ckpts = workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).vqvae)
  _empty_fingerprint(os.path.join(ckpts, '1'))
  _empty_fingerprint(os.path.join(ckpts, '2'))
  fingerprint = builders.vqvae_fingerprint(config)
  for load in (lambda: checkpoints.check_directory(ckpts, fingerprint),
               lambda: loading.load_vqvae(config, workdir)):
    with pytest.raises(errors.NoIntactCheckpointError) as info:
      load()
    assert '\n' not in str(info.value)
    assert str(info.value).startswith(
        f'No checkpoint in {ckpts} reads back: step(s) 2, 1 are damaged')


# A refused run and workdir/config.json (issue 28): the recorded config
# describes the checkpoints, so only a config they accept replaces it.


def test_a_refused_run_leaves_config_json_as_it_was(
    config, save_vqvae_checkpoint, tmp_path):
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir, step=1)
  stages._record_config(config, workdir)  # As the run that trained it did.
  path = workdir_lib.Workdir(workdir).config_json
  with open(path, 'rb') as f:
    recorded = f.read()
  other = config.copy_and_resolve_references()
  other.model.num_hiddens *= 2  # Another model.
  with pytest.raises(ValueError, match='different model config'):
    stages.run('vqvae', other, workdir)
  with open(path, 'rb') as f:
    assert f.read() == recorded
  # A config the checkpoints accept (a training setting changed) is
  # recorded as before.
  accepted = config.copy_and_resolve_references()
  accepted.vqvae_train.learning_rate *= 2
  stages._record_config(accepted, workdir)
  with open(path, 'rb') as f:
    assert f.read() == accepted.to_json(indent=1, sort_keys=True).encode()


@pytest.mark.multiprocess
def test_every_process_resumes_from_the_same_intact_checkpoint(tmp_path):
  # 2 processes x 2 CPU devices (tests/multiprocess_damaged.py): a sharded
  # array's slices are read by different processes.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  directory = str(tmp_path / 'checkpoints')
  logs = tmp_path / 'logs'  # process_<i>.log: each process's whole output.
  done = subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.launch', '--processes=2',
       '--devices_per_process=2', '--module=tests.multiprocess_damaged',
       f'--output_dir={logs}', '--', directory],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
      text=True, timeout=300)
  output = {i: (logs / f'process_{i}.log').read_text() for i in (0, 1)}
  assert done.returncode == 0, (done.stdout + done.stderr)[-2000:] + str(
      {i: text[-2000:] for i, text in output.items()})
  for i, text in output.items():
    (line,) = [row for row in text.splitlines() if row.startswith('RESULT ')]
    result = json.loads(line[len('RESULT '):])
    assert result['process'] == i
    assert result['restored_from'] == [1]  # The older step, on both.
    # Step 2 was saved again beside the damaged one; keep_checkpoints
    # deleted step 1, never the damaged one.
    assert result['listing'] == ['2', '2.damaged-1', '3']
    assert result['steps'] == [2, 3]
  # absl's lines start with their level's letter: W(arning), I(nfo).
  warnings = [line for text in output.values() for line in text.splitlines()
              if 'are damaged' in line and line.startswith('W')]
  assert len(warnings) == 1, warnings  # Process 0 speaks for both.
  assert 'Kept for inspection as 2.damaged-1.' in warnings[0]

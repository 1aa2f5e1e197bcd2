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

An export or a code shard whose bytes changed is refused in one line naming
it (their SHA-256 digests are recorded when written), and --mode=codes
extracts a damaged shard again. A SIGTERM during code extraction, a stage's
final evaluation or sampling (sent by the process to itself at that point,
tests/sigterm_main.py) is one line and exit 0, with nothing half-written,
and the rerun continues. A full disk while writing samples, an export or the
evaluation report is one line naming the path and the bytes, and loses
nothing. A finished workdir on read-only storage runs --mode=all again,
its evaluation report read rather than computed.
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

from tests import files_util
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
def _read_only(directory, block_samples=True):
  """Yields a read-only path showing `directory` (see the module docstring).

  Root without the right to mount gets the same checks another way (see
  the fallback below; `block_samples=False` leaves the samples/ of a
  finished run readable there); the test never skips.
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
    if not block_samples:
      yield directory
      return
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
def finished(stage2_workdir):
  """A workdir with finished vqvae/, codes/ and prior_<i>/ of `config`:
  (path, results). The session's (conftest.py): copy it before changing it.
  """
  return stage2_workdir


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
  # 72 records of 84 bytes (a label, 4x4 and 8x8 uint8 codes) in 3 shards.
  assert '(No space left on device; about 6.4 kB (6432 bytes) still to ' \
      'write)' in str(info.value)
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
  damaged = files_util.read_tree(ckpts / '4')
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
  assert files_util.read_tree(ckpts / '4.damaged-1') == damaged
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
  before = files_util.read_tree(ckpts)
  calls = []
  with pytest.raises(errors.NoIntactCheckpointError) as info:
    toy._run(directory, 6, calls, [], keep=2)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(
      f'No checkpoint in {ckpts} reads back: step(s) 4, 2 are damaged')
  assert 'Fix: ' in message
  assert toy._real_inits(calls) == 0  # Not started again from scratch.
  # Nothing moved, nothing deleted.
  assert files_util.read_tree(ckpts) == before


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_later_stages_load_the_newest_intact_checkpoint(
    damage, config, save_vqvae_checkpoint, tmp_path, caplog):
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir, step=1)
  save_vqvae_checkpoint(config, workdir, seed=1, step=2)
  ckpts = workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).vqvae)
  _DAMAGE[damage](os.path.join(ckpts, '2'))
  before = files_util.read_tree(ckpts)
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
  assert files_util.read_tree(ckpts) == before  # A reader moves nothing.
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
    config, save_vqvae_checkpoint, tmp_path, caplog):
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
  accepted.prior.code_weight = (0.5, 0.75)
  accepted.sampling.temperature = 0.9  # Not a training setting.
  # The absl logger's own level too: an earlier test may have raised it.
  with caplog.at_level(logging.INFO, logger='absl'):
    stages._record_config(accepted, workdir)
  with open(path, 'rb') as f:
    assert f.read() == accepted.to_json(indent=1, sort_keys=True).encode()
  # ... and the training settings that changed are named, since a stage
  # that resumes trains on with them (the fingerprint does not hold them).
  said = [r.getMessage() for r in caplog.records
          if getattr(r, 'vqvae2_console', False)]
  lr = config.vqvae_train.learning_rate
  assert said == [
      f"Training settings differ from this workdir's last run ({path}); a "
      'stage that resumes trains on with the new ones: prior.code_weight: '
      f'[] -> [0.5, 0.75]; vqvae_train.learning_rate: {lr} -> {2 * lr}']
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    stages._record_config(accepted, workdir)  # The same again: nothing.
    sampling_only = accepted.copy_and_resolve_references()
    sampling_only.sampling.top_k = 3
    stages._record_config(sampling_only, workdir)
  assert not [r for r in caplog.records
              if getattr(r, 'vqvae2_console', False)]
  # Past 8 changes the line counts the rest.
  many = sampling_only.copy_and_resolve_references()
  for field in ('learning_rate', 'warmup_steps', 'num_train_steps',
                'checkpoint_every', 'log_every', 'eval_every',
                'keep_checkpoints', 'grad_clip_norm', 'batch_size',
                'eval_batch_size'):
    many.vqvae_train[field] *= 2
  with caplog.at_level(logging.INFO, logger='absl'):
    stages._record_config(many, workdir)
  (line,) = [r.getMessage() for r in caplog.records
             if getattr(r, 'vqvae2_console', False)]
  assert line.count('vqvae_train.') == 8 and line.endswith('; and 2 more')


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


# Digests (issue 28): an export's parts and every code shard are checked
# against the SHA-256 recorded when they were written.


@pytest.fixture(scope='module')
def exported(finished, config, tmp_path_factory):
  """The finished workdir exported to one file: (path, its bytes)."""
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('export') / 'model.msgpack')
  api.Pipeline.load(finished[0], config).export(path)
  with open(path, 'rb') as f:
    return path, f.read()


def test_an_export_with_a_flipped_byte_in_its_prior_weights_is_refused(
    exported, tmp_path):
  # pylint: disable=g-import-not-at-top
  from flax import serialization
  import jax
  import numpy as np
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  # pylint: enable=g-import-not-at-top
  path, data = exported
  payload = serialization.msgpack_restore(data)
  assert sorted(json.loads(payload['digests'])) == [
      'config', 'prior_fingerprints', 'priors/0', 'priors/1', 'steps',
      'vqvae', 'vqvae_digest', 'vqvae_fingerprint']
  # The largest weight of the lower prior, found in the file's bytes.
  leaf = max((np.asarray(x) for x in
              jax.tree.leaves(payload['priors']['1'])), key=lambda x: x.size)
  at = data.find(leaf.tobytes())
  assert at > 0 and data.find(leaf.tobytes(), at + 1) < 0
  damaged = bytearray(data)
  damaged[at + leaf.nbytes // 2] ^= 0x40  # One exponent bit of one weight.
  copy = str(tmp_path / 'damaged.msgpack')
  with open(copy, 'wb') as f:
    f.write(damaged)
  with pytest.raises(api.ExportDamagedError) as info:
    api.Pipeline.load(copy)
  message = str(info.value)
  assert isinstance(info.value, errors.UserError)
  assert '\n' not in message
  assert message.startswith(
      f'{copy} is damaged: its level 1 prior weights differ from the SHA-256 '
      'recorded when it was exported. Fix: ')
  with open(path, 'rb') as f:
    assert f.read() == data  # The intact file is untouched and loads.
  assert api.Pipeline.load(path).steps['prior_1'] > 0


def test_an_export_loads_from_one_read_bit_for_bit(exported, monkeypatch):
  """Loading reads the file once and never serialises it again (issue 29)."""
  # pylint: disable=g-import-not-at-top
  from flax import serialization
  import jax
  import numpy as np
  from vqvae2_jax import api
  # pylint: enable=g-import-not-at-top
  path, data = exported
  payload = serialization.msgpack_restore(data)
  # The digests of the file's bytes are the ones of the payload serialised.
  # pylint: disable=protected-access
  digests = api._file_digests(files.read_msgpack(path, 2)[1])
  assert digests == api._export_digests(payload) == json.loads(
      payload['digests'])
  # pylint: enable=protected-access

  def refused(*args, **kwargs):
    raise AssertionError('the export was (de)serialised by flax again')
  monkeypatch.setattr(serialization, 'msgpack_restore', refused)
  monkeypatch.setattr(serialization, 'msgpack_serialize', refused)
  reads = []
  read = files.read_msgpack
  monkeypatch.setattr(files, 'read_msgpack',
                      lambda *args, **kwargs: reads.append(args) or read(
                          *args, **kwargs))
  loaded = api.Pipeline.load(path)
  assert len(reads) == 1
  want = [payload['vqvae']] + [payload['priors'][str(level)]
                               for level in range(len(payload['priors']))]
  got = [loaded.vqvae_variables] + [v for _, v in loaded.priors]
  assert len(got) == len(want) == 3
  for a, b in zip(got, want):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      x = np.asarray(x)
      assert (x.dtype, x.shape) == (y.dtype, y.shape)
      assert x.tobytes() == y.tobytes()  # Bit for bit.


def test_an_export_with_a_flipped_byte_in_any_part_is_refused(exported,
                                                              tmp_path):
  # pylint: disable=g-import-not-at-top
  from flax import serialization
  import jax
  import numpy as np
  from vqvae2_jax import api
  # pylint: enable=g-import-not-at-top
  path, data = exported
  payload = serialization.msgpack_restore(data)
  largest = max((np.asarray(x) for x in jax.tree.leaves(payload['vqvae'])),
                key=lambda x: x.size).tobytes()
  config = payload['config'].encode()
  for what, at in (('VQ-VAE weights', data.find(largest) + len(largest) // 3),
                   ('config', data.find(config) + len(config) // 2),
                   ('level 0 prior weights, level 1 prior weights', None)):
    damaged = bytearray(data)
    if at is None:  # The last byte of each prior's largest weight.
      for level in ('0', '1'):
        leaf = max((np.asarray(x) for x in jax.tree.leaves(
            payload['priors'][level])), key=lambda x: x.size).tobytes()
        damaged[data.find(leaf) + len(leaf) - 1] ^= 1
    else:
      assert at > 0
      damaged[at] ^= 1
    copy = tmp_path / 'damaged.msgpack'
    copy.write_bytes(damaged)
    with pytest.raises(api.ExportDamagedError) as info:
      api.Pipeline.load(str(copy))
    assert str(info.value).startswith(
        f'{copy} is damaged: its {what} differ from the SHA-256 recorded '
        'when it was exported. Fix: '), (what, str(info.value))
  # A file cut short anywhere is refused in one line, never a traceback of
  # the reader's.
  for end in (1, 100, len(data) // 2, len(data) - 1):
    copy.write_bytes(data[:end])
    with pytest.raises(api.PipelineInputError) as info:
      api.Pipeline.load(str(copy))
    assert str(info.value) == (
        f'{copy} is not an exported pipeline (ValueError). Fix: pass a '
        'workdir, or a file written by --mode=export.')


def test_an_export_of_before_digests_loads_with_one_warning(
    exported, tmp_path, caplog):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  path, data = exported
  payload = serialization.msgpack_restore(data)
  del payload['digests']
  old = str(tmp_path / 'old.msgpack')
  with open(old, 'wb') as f:
    f.write(serialization.msgpack_serialize(payload))
  with caplog.at_level(logging.WARNING):
    loaded = api.Pipeline.load(old)
  assert loaded.steps == api.Pipeline.load(path).steps
  (warning,) = [w for w in _warnings(caplog) if old in w]
  assert warning.startswith(f'{old} has no digests')
  assert '\n' not in warning


def _flip_last_byte(path):
  with open(path, 'r+b') as f:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))


def test_codes_mode_extracts_a_damaged_shard_again(finished, config,
                                                   tmp_path, caplog):
  workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  codes = workdir_lib.Workdir(copy).codes
  path = codes_lib.shard_path(codes, 'train', 1, 3)
  _flip_last_byte(path)
  # The prior stage reading it is refused in one line naming the file.
  with pytest.raises(codes_lib.CodeShardDamagedError) as info:
    stages.run('prior', config, copy)
  assert '\n' not in str(info.value)
  assert str(info.value).startswith(f'Code shard {path} is damaged')
  # --mode=codes says so and extracts that shard again, not "nothing to do".
  with caplog.at_level(logging.WARNING):
    result = stages.run('codes', config, copy)['codes']
  assert result['extract_time_s'] > 0
  assert any(w.startswith(f'Code shard {path} is damaged')
             for w in _warnings(caplog))
  again = files_util.read_tree(codes)
  assert again.pop('log.txt')  # This run's log; the rest as extracted first.
  reference = files_util.read_tree(workdir_lib.Workdir(workdir).codes)
  reference.pop('log.txt', None)
  assert again == reference


# SIGTERM in every phase (issue 28): a preemption notice is one line and
# exit 0 wherever it comes; what is written is whole, and a rerun goes on.

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command line of the `config` fixture (conftest.stage2_config).
_STAGE2_FLAGS = ['--config=configs/fashion_mnist.py:tiny',
                 '--config.data.train_split=train[:96]',
                 '--config.data.eval_split=test[:40]',
                 '--config.vqvae_train.eval_batch_size=16',
                 '--config.prior.codes_per_shard=32',
                 '--config.prior.eval_batch_size=16']


def _signalled_run(phase, workdir, mode):
  """Runs --mode=`mode` with SIGTERM at `phase` (tests/sigterm_main.py)."""
  done = subprocess.run(
      [sys.executable, '-m', 'tests.sigterm_main', phase, *_STAGE2_FLAGS,
       f'--workdir={workdir}', f'--mode={mode}'],
      cwd=_ROOT, env=dict(os.environ, PYTHONPATH=_ROOT), capture_output=True,
      text=True, timeout=600)
  output = done.stdout + done.stderr
  assert done.returncode == 0, output[-3000:]
  (line,) = [l for l in output.splitlines() if 'preemption notice' in l]
  return line


def test_sigterm_during_code_extraction(finished, config, tmp_path):
  workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  codes = workdir_lib.Workdir(copy).codes
  shutil.rmtree(codes)
  line = _signalled_run('codes', copy, 'codes')
  assert line.endswith(
      f'codes: stopped by a preemption notice (SIGTERM); the complete code '
      f'shards in {codes} are kept and a rerun extracts only the rest. Run '
      'the same command again to continue.')
  # The first shard is whole and recorded; nothing else, nothing half.
  assert sorted(files_util.read_tree(codes)) == [
      'digests.json', 'plan.json', 'train/00000-of-00003.npy']
  reference = files_util.read_tree(workdir_lib.Workdir(workdir).codes)
  assert (files_util.read_tree(codes)['train/00000-of-00003.npy'] ==
          reference['train/00000-of-00003.npy'])
  stages.run('codes', config, copy)  # The rerun ends as if never stopped.
  again = files_util.read_tree(codes)
  again.pop('log.txt')
  reference.pop('log.txt', None)
  assert again == reference


def test_sigterm_during_a_stages_final_evaluation(finished, config, tmp_path):
  workdir, results = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  # Killed after its last checkpoint, before metrics.json: the next run
  # evaluates the stage again, and the notice comes during that evaluation.
  metrics = os.path.join(workdir_lib.Workdir(copy).prior(1), 'metrics.json')
  os.remove(metrics)
  line = _signalled_run('prior_eval', copy, 'all')
  after = stages.modes_of_all(config)[
      stages.modes_of_all(config).index('prior') + 1]
  assert line.endswith(
      f'prior: finished; stopped by a preemption notice (SIGTERM) before '
      f'{after}. Run the same command again to continue from {after}.')
  assert not os.path.exists(os.path.join(copy, 'samples'))  # Not started.
  # The evaluation finished and was recorded with the figures of the run
  # that trained; the next run takes the stage for finished.
  with open(metrics) as f:
    recorded = json.load(f)
  want = results['prior']['level_1']
  for key in ('step', 'eval/bits_per_code', 'train/loss'):
    assert recorded[key] == want[key]
  again = stages.run('prior', config, copy)['prior']
  assert again['level_1'] == recorded


def test_sigterm_during_sampling(finished, config, tmp_path):
  workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  before = files_util.read_tree(copy)
  line = _signalled_run('sample', copy, 'sample')
  # Stopped before the second batch (8 maps: one per device).
  assert ('sample: stopped by a preemption notice (SIGTERM) after 8 of 10 '
          in line)
  assert line.endswith('Run the same command again to sample them.')
  after = files_util.read_tree(copy)
  after.pop('config.json', None)
  before.pop('config.json', None)
  assert after == before  # Nothing half-written, nothing touched.




@pytest.fixture(scope='module')
def eval_signalled(finished, tmp_path_factory):
  """A copy of `finished` that ran --mode=all with a SIGTERM as its
  evaluation report started: (path, the notice's line).

  Shared by the module (its whole report and its samples save the read-only
  test below computing them again): copy it before changing it.
  """
  workdir, _ = finished
  copy = str(tmp_path_factory.mktemp('eval_signalled') / 'run')
  shutil.copytree(workdir, copy)
  line = _signalled_run('eval', copy, 'all')  # Samples, then the notice.
  return copy, line


def test_sigterm_during_the_evaluation_report(eval_signalled, config,
                                              tmp_path):
  signalled, line = eval_signalled
  copy = str(tmp_path / 'run')
  shutil.copytree(signalled, copy)
  assert line.endswith(
      'eval: finished; stopped by a preemption notice (SIGTERM) before '
      'export. Run the same command again to continue from export.')
  report = files.read_json(os.path.join(copy, 'eval', 'report.json'))
  assert report['inputs']  # Whole, and marked done.
  assert not os.path.exists(os.path.join(copy, 'export'))
  # The rerun continues: the report is read, the export written.
  results = stages.run('all', config, copy)
  assert results['eval'] == report
  assert os.path.getsize(results['export']['path']) > 0

# A finished workdir on read-only storage (issue 28): evaluation reads its
# report instead of computing it again, so --mode=all succeeds.


def test_all_on_a_finished_read_only_workdir_reads_its_report(
    eval_signalled, config, tmp_path, monkeypatch):
  # pylint: disable-next=g-import-not-at-top
  from vqvae2_jax.evaluation import run as eval_run
  workdir, _ = eval_signalled  # Sampled and evaluated (the report is whole).
  copy = str(tmp_path / 'done')
  shutil.copytree(workdir, copy)
  results = stages.run('all', config, copy)  # The export: now finished.
  report = files.read_json(os.path.join(copy, 'eval', 'report.json'))
  assert report['inputs'] == eval_run.report_inputs(config, copy)
  before = _tree(copy)
  computed = []

  def not_again(*args, **kwargs):
    computed.append(1)
    raise AssertionError('The report was computed again.')

  monkeypatch.setattr(eval_run, '_reconstruction_pass', not_again)
  with _read_only(copy, block_samples=False) as view:
    again = stages.run('all', config, view)
  assert not computed
  assert again['eval'] == report == files.normalise_json(results['eval'])
  for key in ('bytes', 'steps'):  # The file found there, not written again.
    assert again['export'][key] == results['export'][key]
  assert _tree(copy) == before  # Nothing written, nothing touched.
  # Asked for, or after a stage changed, the report is computed again.
  forced = config.copy_and_resolve_references()
  forced.eval.force = True
  for run_config in (forced, config):
    with pytest.raises(AssertionError, match='computed again'):
      stages.run('eval', run_config, copy)
    metrics = os.path.join(workdir_lib.Workdir(copy).prior(0), 'metrics.json')
    recorded = files.read_json(metrics)
    files.write_json(metrics, {**recorded, 'step': recorded['step'] + 1})
  assert len(computed) == 2
  # A full disk as the report is written: one line, both files as before.
  files.write_json(metrics, recorded)
  monkeypatch.undo()
  eval_dir = os.path.join(copy, 'eval')
  kept = files_util.read_tree(eval_dir)
  monkeypatch.setattr(files, 'atomic_write', _full_after(10))
  with pytest.raises(errors.WorkdirError) as info:
    stages.run('eval', forced, copy)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f'The disk is full writing to {eval_dir} ')
  assert 'bytes) still to write); report.json was not written' in message
  assert files_util.read_tree(eval_dir) == kept



# A full disk while writing samples or an export (issue 28): one line naming
# the path and the bytes, no partial file, nothing earlier lost.


def _full_after(nbytes):
  """An `atomic_write` whose disk fills after `nbytes` bytes."""
  real = files.atomic_write

  def write(path, write_fn):
    real(path, lambda f: (f.write(b'x' * nbytes), _raise_enospc()))

  return write


def test_a_disk_that_fills_while_exporting(exported, config, finished,
                                           tmp_path, monkeypatch):
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  _, data = exported
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'older.msgpack').write_bytes(b'an earlier export')
  pipe = api.Pipeline.load(finished[0], config)
  monkeypatch.setattr(files, 'atomic_write', _full_after(1000))
  path = str(out / 'model.msgpack')
  with pytest.raises(errors.WorkdirError) as info:
    pipe.export(path)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f'The disk is full writing to {out} ')
  assert f'({len(data)} bytes) still to write); {path} was not written' in (
      message)
  assert 'Fix: free space' in message
  assert sorted(os.listdir(out)) == ['older.msgpack']  # No partial file.
  assert (out / 'older.msgpack').read_bytes() == b'an earlier export'


def test_a_disk_that_fills_while_writing_samples(finished, config, tmp_path,
                                                 monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  workdir, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  earlier = os.path.join(copy, 'samples', 'earlier')
  os.makedirs(earlier)
  with open(os.path.join(earlier, 'meta.json'), 'w') as f:
    f.write('{}')
  savez = np.savez

  def full(file, **arrays):
    with open(file, 'wb') as f:
      f.write(b'x' * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)

  monkeypatch.setattr(np, 'savez', full)
  with pytest.raises(errors.WorkdirError) as info:
    stages.run('sample', config, copy)
  message = str(info.value)
  samples = os.path.join(copy, 'samples')
  assert '\n' not in message
  assert message.startswith(f'The disk is full writing to {samples} at ')
  assert 'bytes) still to write); the sample run ' in message
  assert 'Fix: free space' in message
  assert os.listdir(samples) == ['earlier']  # No partial run, none lost.
  monkeypatch.setattr(np, 'savez', savez)
  meta = stages.run('sample', config, copy)['sample']  # Space freed.
  assert os.path.exists(os.path.join(meta['dir'], 'codes.npz'))


def test_sigterm_during_training_under_the_runs_notice(toy_uninterrupted,
                                                       tmp_path):
  # One mechanism: inside `preemption_notices` (as stages.run sets it up)
  # the training loop stops at its next step and checkpoints it; a notice
  # at the last step lets the stage finish and stays for the next stage.
  import signal  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import parallel  # pylint: disable=g-import-not-at-top

  def notice_at(at):
    def batches(start):
      for step, batch in enumerate(toy._batches(start), start + 1):
        if step == at:
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch
    return batches

  directory = tmp_path / 'toy'
  with parallel.preemption_notices():
    with pytest.raises(errors.Preempted) as info:
      toy._run(directory, 6, [], [], keep=2, batches=notice_at(3))
  assert info.value.step == 3
  assert str(info.value).startswith('toy: stopped by a preemption notice '
                                    '(SIGTERM) at step 3 of 6; checkpoint '
                                    'step 3 is saved')
  with parallel.preemption_notices():
    finished = toy._run(directory, 6, [], [], keep=2, batches=notice_at(6))
    assert parallel.preempted()  # For stages.run: stop before the next.
  assert not parallel.preempted()  # A notice belongs to its run.
  assert finished['step'] == 6
  assert finished['eval/error'] == toy_uninterrupted['eval/error']

"""Extracted codes: the format (atomic shards, manifest, provenance) in
`data.codes`; the batches over it are in test_code_iterators.py."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest

from vqvae2_jax import errors
from vqvae2_jax.data import codes

_SHAPES = ((2, 3), (4, 6))  # Non-square on purpose.
_K = (16, 300)  # uint8 and uint16 codes.
_VQVAE = {'step': 7, 'fingerprint': {'model.num_embeddings': 16},
          'digest': 'abc'}


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  levels = [rng.integers(0, k, (n, *s)) for s, k in zip(_SHAPES, _K)]
  return levels, rng.integers(0, 10, n)


def _plan(n_train=23, n_eval=9, shard_size=5, vqvae=_VQVAE):
  return codes.make_plan(
      vqvae=vqvae, level_shapes=_SHAPES, num_embeddings=_K, num_classes=10,
      splits={'train': {'source': 'train', 'num_examples': n_train,
                        'shard_size': shard_size},
              'eval': {'source': 'test', 'num_examples': n_eval,
                       'shard_size': shard_size}})


def _write_all(codes_dir, plan, data):
  todo = codes.prepare_directory(codes_dir, plan)
  for role, info in plan['splits'].items():
    levels, labels = data[role]
    size, n = info['shard_size'], info['num_shards']
    for i in todo[role]:
      sl = slice(i * size, (i + 1) * size)
      codes.write_shard(codes.shard_path(codes_dir, role, i, n),
                        codes.make_records([l[sl] for l in levels],
                                           labels[sl], _K))
  codes.finalize(codes_dir, plan)


@pytest.fixture
def written(tmp_path):
  codes_dir = str(tmp_path / 'codes')
  data = {'train': _examples(23, 0), 'eval': _examples(9, 1)}
  _write_all(codes_dir, _plan(), data)
  return codes_dir, data


def test_round_trip_and_dtypes(written):
  codes_dir, data = written
  dataset = codes.CodeDataset(codes_dir, vqvae=_VQVAE)
  assert dataset.level_shapes == list(_SHAPES)
  split = dataset.split('train')
  assert split.num_examples == 23
  assert split.num_shards == 5
  assert split.shard(0).dtype['level_0'].base == np.uint8
  assert split.shard(0).dtype['level_1'].base == np.uint16
  assert split.shard(4).shape == (3,)  # 23 = 4 * 5 + 3.
  indices = np.array([22, 0, 5, 5, 13])
  batch = split.read(indices, levels=(0, 1))
  levels, labels = data['train']
  for got, want in zip(batch['codes'], levels):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want[indices])
  np.testing.assert_array_equal(batch['label'], labels[indices])
  only_top = split.read(indices, levels=(0,))
  assert len(only_top['codes']) == 1


def test_out_of_range_codes_are_refused():
  levels, labels = _examples(3)
  levels[1][0, 0, 0] = _K[1]
  with pytest.raises(ValueError, match='Level 1'):
    codes.make_records(levels, labels, _K)


def test_incomplete_extraction_is_not_read(tmp_path):
  codes_dir = str(tmp_path / 'codes')
  plan = _plan()
  todo = codes.prepare_directory(codes_dir, plan)
  assert todo == {'train': [0, 1, 2, 3, 4], 'eval': [0, 1]}
  with pytest.raises(FileNotFoundError, match='did not finish.*--mode=codes'):
    codes.CodeDataset(codes_dir, vqvae=_VQVAE)
  with pytest.raises(RuntimeError, match='lacks shards'):
    codes.finalize(codes_dir, plan)


def test_rerun_keeps_finished_shards_and_drops_temporaries(written):
  codes_dir, _ = written
  plan = _plan()
  done = codes.shard_path(codes_dir, 'train', 1, 5)
  os.remove(codes.shard_path(codes_dir, 'train', 3, 5))
  tmp = codes.shard_path(codes_dir, 'train', 3, 5) + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(b'half a shard')
  mtime = os.stat(done).st_mtime_ns
  todo = codes.prepare_directory(codes_dir, plan)
  assert todo == {'train': [3], 'eval': []}
  assert not os.path.exists(tmp)
  assert os.stat(done).st_mtime_ns == mtime
  # The manifest of the same plan stays: the complete shards still are.
  assert os.path.exists(os.path.join(codes_dir, codes.MANIFEST))


def test_another_plan_wipes_old_shards_and_manifest(written):
  codes_dir, _ = written
  new_plan = _plan(vqvae={**_VQVAE, 'step': 8})
  todo = codes.prepare_directory(codes_dir, new_plan)
  assert todo == {'train': [0, 1, 2, 3, 4], 'eval': [0, 1]}
  assert not os.path.exists(os.path.join(codes_dir, codes.MANIFEST))
  assert os.listdir(os.path.join(codes_dir, 'train')) == []


@pytest.mark.parametrize('change,what', [
    ({'step': 9}, 'step: codes 7, checkpoint 9'),
    ({'digest': 'other'}, r'weights \(digest\)'),
    ({'fingerprint': {'model.num_embeddings': 32}},
     r"config fields \['model.num_embeddings'\]"),
])
def test_codes_from_another_vqvae_are_refused(written, change, what):
  codes_dir, _ = written
  with pytest.raises(codes.CodesMismatchError,
                     match=f'different VQ-VAE.*{what}.*re-run --mode=codes'):
    codes.CodeDataset(codes_dir, vqvae={**_VQVAE, **change})


def test_truncated_shard_is_reported(written):
  codes_dir, data = written
  levels, labels = data['train']
  codes.write_shard(codes.shard_path(codes_dir, 'train', 0, 5),
                    codes.make_records([l[:4] for l in levels], labels[:4], _K))
  dataset = codes.CodeDataset(codes_dir, vqvae=_VQVAE)
  with pytest.raises(ValueError, match='00000-of-00005.*run --mode=codes'):
    dataset.split('train')



def _flip_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) - 1)  # In the codes, past the header.
    last = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([last[0] ^ 1]))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path):
  open(path, 'wb').close()


_SHARD_DAMAGE = {'flipped byte': _flip_byte, 'truncated': _truncate,
                 'empty': _empty, 'removed': os.remove}


def test_digests_are_recorded_as_shards_are_written(written):
  codes_dir, _ = written
  recorded = codes.read_digests(codes_dir)
  names = [f'{role}/{codes.shard_name(i, n)}'
           for role, n in (('train', 5), ('eval', 2)) for i in range(n)]
  assert sorted(recorded) == sorted(names)
  for name in names:
    with open(os.path.join(codes_dir, name), 'rb') as f:
      assert recorded[name] == hashlib.sha256(f.read()).hexdigest()
  assert codes.is_complete(codes_dir, _plan())


@pytest.mark.parametrize('damage', sorted(_SHARD_DAMAGE))
def test_a_damaged_shard_is_refused_in_one_line(written, damage):
  codes_dir, _ = written
  path = codes.shard_path(codes_dir, 'train', 2, 5)
  _SHARD_DAMAGE[damage](path)
  dataset = codes.CodeDataset(codes_dir, vqvae=_VQVAE)
  with pytest.raises(codes.CodeShardDamagedError) as info:
    dataset.split('train')
  message = str(info.value)
  assert isinstance(info.value, errors.UserError)
  assert '\n' not in message
  assert message.startswith(f'Code shard {path} ')
  assert message.endswith('it extracts the damaged shard again.')
  assert 'Fix: run --mode=codes' in message
  dataset.split('eval')  # The intact split reads.


@pytest.mark.parametrize('damage', sorted(_SHARD_DAMAGE))
def test_a_damaged_shard_is_extracted_again(written, damage, caplog):
  codes_dir, data = written
  plan = _plan()
  path = codes.shard_path(codes_dir, 'train', 2, 5)
  with open(path, 'rb') as f:
    intact = f.read()
  _SHARD_DAMAGE[damage](path)
  with caplog.at_level(logging.WARNING):
    assert not codes.is_complete(codes_dir, plan)  # Not "nothing to do".
  if damage != 'removed':
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.WARNING]
    assert warning.startswith(f'Code shard {path} is damaged')
  assert codes.prepare_directory(codes_dir, plan) == {'train': [2],
                                                      'eval': []}
  assert not os.path.exists(path)
  _write_all(codes_dir, plan, data)  # Writes shard 2 only, then finalizes.
  with open(path, 'rb') as f:
    assert f.read() == intact
  assert codes.is_complete(codes_dir, plan)
  codes.CodeDataset(codes_dir, vqvae=_VQVAE).split('train')


def test_a_shard_whose_digest_was_not_recorded_is_written_again(written):
  codes_dir, _ = written
  recorded = codes.read_digests(codes_dir)
  del recorded['eval/00001-of-00002.npy']  # Killed between rename and record.
  with open(os.path.join(codes_dir, codes.DIGESTS), 'w') as f:
    json.dump(recorded, f)
  assert codes.prepare_directory(codes_dir, _plan()) == {'train': [],
                                                         'eval': [1]}
  with pytest.raises(RuntimeError, match='lacks shards'):
    codes.finalize(codes_dir, _plan())


def test_a_damaged_digests_file_verifies_nothing(written):
  codes_dir, _ = written
  with open(os.path.join(codes_dir, codes.DIGESTS), 'w') as f:
    f.write('{"train/00000-of-00005.npy": ')  # Cut short.
  with pytest.raises(codes.CodeShardDamagedError, match='no recorded digest'):
    codes.CodeDataset(codes_dir, vqvae=_VQVAE).split('train')
  assert codes.prepare_directory(codes_dir, _plan()) == {
      'train': [0, 1, 2, 3, 4], 'eval': [0, 1]}

def test_codes_of_before_digests_are_read_with_one_warning(written, caplog):
  codes_dir, _ = written
  os.remove(os.path.join(codes_dir, codes.DIGESTS))
  codes._WARNED_UNVERIFIED.clear()
  with caplog.at_level(logging.WARNING):
    assert codes.is_complete(codes_dir, _plan())
    dataset = codes.CodeDataset(codes_dir, vqvae=_VQVAE)
    dataset.split('train')
    dataset.split('eval')
  (warning,) = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING]
  assert warning.startswith(f'Codes in {codes_dir} have no digests.json')
  assert '\n' not in warning


def test_json_files_keep_their_bytes(written):
  """plan.json and manifest.json: sorted keys, 2-space indent, final newline
  (the bytes of extractions made before files.py took over the writing)."""
  codes_dir, _ = written
  plan = _plan()
  want = json.dumps(plan, indent=2, sort_keys=True) + '\n'
  for name in (codes.PLAN, codes.MANIFEST):
    with open(os.path.join(codes_dir, name), 'rb') as f:
      assert f.read() == want.encode()
  assert plan['splits']['train']['num_shards'] == 5
  assert plan['level_shapes'] == [[2, 3], [4, 6]]  # Tuples become lists.


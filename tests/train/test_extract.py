"""Code extraction (--mode=codes): content, atomic resume, provenance."""

import os
import shutil

import jax
import numpy as np
import pytest

from tests import files_util
from vqvae2_jax import builders
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.train import extract


class _Killed(Exception):
  pass


@pytest.fixture(scope='module')
def config(stage2_config):
  return stage2_config


@pytest.fixture(scope='module')
def reference(tmp_path_factory, config, save_vqvae_checkpoint):
  """An uninterrupted extraction: (workdir, {relative path: bytes})."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  save_vqvae_checkpoint(config, workdir)
  result = extract.extract_codes(config, workdir)
  assert result['vqvae_step'] == 1
  assert result['num_examples_train'] == 96
  assert result['num_examples_eval'] == 40
  return workdir, files_util.read_tree(workdir_lib.Workdir(workdir).codes)


def test_codes_are_the_encoders_codes_of_each_split(config, reference):
  workdir, files = reference
  assert sorted(files) == [
      'digests.json', 'eval/00000-of-00002.npy', 'eval/00001-of-00002.npy',
      'manifest.json', 'plan.json', 'train/00000-of-00003.npy',
      'train/00001-of-00003.npy', 'train/00002-of-00003.npy']
  mesh = parallel.create_mesh(config.mesh)
  model, variables, _ = loading.load_vqvae(config, workdir, mesh)
  dataset = codes_lib.CodeDataset(
      workdir_lib.Workdir(workdir).codes,
      vqvae=loading.current_vqvae_provenance(config, workdir, mesh))
  assert dataset.level_shapes == [(4, 4), (8, 8)]
  assert dataset.level_shapes == builders.level_shapes(config)
  for role, split in (('train', config.data.train_split),
                      ('eval', config.data.eval_split)):
    images, labels = [], []
    for batch in input_pipeline.create_eval_iterator(
        config.data, split=split, global_batch_size=16, mesh=mesh):
      mask = np.asarray(batch['mask'])
      images.append(np.asarray(batch['image'])[mask])
      labels.append(np.asarray(batch['label'])[mask])
    images, labels = np.concatenate(images), np.concatenate(labels)
    want = jax.device_get(jax.jit(
        lambda v, x: model.apply(v, x, method=model.encode))(variables, images))
    got = dataset.split(role).read(np.arange(len(images)), (0, 1))
    np.testing.assert_array_equal(got['label'], labels)
    for g, w in zip(got['codes'], want):
      np.testing.assert_array_equal(g, w)


def test_killed_extraction_resumes_to_identical_files(config, reference,
                                                      tmp_path, monkeypatch,
                                                      save_vqvae_checkpoint):
  _, want = reference
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir)
  real_write = codes_lib.write_shard
  written = []

  def write_then_die(path, records):
    if written:
      raise _Killed()
    real_write(path, records)
    written.append(path)

  monkeypatch.setattr(codes_lib, 'write_shard', write_then_die)
  with pytest.raises(_Killed):
    extract.extract_codes(config, workdir)
  codes_dir = workdir_lib.Workdir(workdir).codes
  partial = files_util.read_tree(codes_dir)
  assert sorted(partial) == ['digests.json', 'plan.json',
                             'train/00000-of-00003.npy']
  with pytest.raises(FileNotFoundError, match='did not finish'):
    codes_lib.read_manifest(codes_dir)

  # The rerun writes only the missing shards.
  written.clear()
  monkeypatch.setattr(codes_lib, 'write_shard',
                      lambda p, r: (written.append(p), real_write(p, r)))
  extract.extract_codes(config, workdir)
  assert [os.path.relpath(p, codes_dir) for p in written] == [
      'train/00001-of-00003.npy', 'train/00002-of-00003.npy',
      'eval/00000-of-00002.npy', 'eval/00001-of-00002.npy']
  assert files_util.read_tree(codes_dir) == want

  # A complete extraction is not redone.
  written.clear()
  extract.extract_codes(config, workdir)
  assert not written
  assert files_util.read_tree(codes_dir) == want


def test_codes_from_a_different_vqvae_are_refused(config, tmp_path,
                                                  save_vqvae_checkpoint):
  workdir = str(tmp_path)
  save_vqvae_checkpoint(config, workdir, seed=0, step=1)
  extract.extract_codes(config, workdir)
  codes_dir = workdir_lib.Workdir(workdir).codes
  # Stage 1 goes on (here: other weights at a later step).
  save_vqvae_checkpoint(config, workdir, seed=1, step=2)
  current = loading.current_vqvae_provenance(config, workdir)
  with pytest.raises(codes_lib.CodesMismatchError,
                     match='step: codes 1, checkpoint 2.*re-run --mode=codes'):
    codes_lib.CodeDataset(codes_dir, vqvae=current)
  # Same step, other weights: the digest tells them apart.
  other = str(tmp_path / 'other')
  save_vqvae_checkpoint(config, other, seed=1, step=1)
  with pytest.raises(codes_lib.CodesMismatchError, match=r'weights \(digest\)'):
    codes_lib.CodeDataset(
        codes_dir, vqvae=loading.current_vqvae_provenance(config, other))
  # Re-running --mode=codes extracts again with the current VQ-VAE.
  assert extract.extract_codes(config, workdir)['vqvae_step'] == 2
  codes_lib.CodeDataset(codes_dir, vqvae=current)


def test_missing_stage1_checkpoint_says_what_to_run(config, tmp_path):
  with pytest.raises(FileNotFoundError, match='--mode=vqvae'):
    extract.extract_codes(config, str(tmp_path))


def test_a_finished_extraction_is_only_read(config, reference, tmp_path,
                                            monkeypatch):
  workdir, files = reference
  copy = tmp_path / 'finished'
  shutil.copytree(workdir, copy)
  codes = workdir_lib.Workdir(copy).codes
  before = {p: os.stat(os.path.join(codes, p)).st_mtime_ns for p in files}

  def no_writes(*args, **kwargs):
    raise AssertionError('a finished extraction wrote a file')
  monkeypatch.setattr(extract.files, 'ensure_writable', no_writes)
  monkeypatch.setattr(codes_lib.files, 'write_json', no_writes)
  result = extract.extract_codes(config, str(copy))
  assert result['vqvae_step'] == 1 and result['num_examples_train'] == 96
  assert {p: os.stat(os.path.join(codes, p)).st_mtime_ns
          for p in files} == before
  assert files_util.read_tree(codes) == files

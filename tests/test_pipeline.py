"""The whole pipeline from the command line on a tiny config: --mode=all,
then sampling again (skipped: nothing is overwritten) and with other
controls (a new directory beside the first), in this process to save the
start-up of a new one."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist
from vqvae2_jax import stages

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = ['--config=configs/fashion_mnist.py:tiny',
         # Small splits keep code extraction to a few batches.
         '--config.data.train_split=train[:256]',
         '--config.data.eval_split=test[:64]',
         '--config.vqvae_train.eval_batch_size=32',
         '--config.prior.eval_batch_size=32']


def _tiny_config(**sampling):
  config = fashion_mnist.get_config('tiny')
  for arg in _TINY[1:]:
    path, value = arg[len('--config.'):].split('=')
    section, name = path.split('.')
    config[section][name] = type(config[section][name])(value)
  config.sampling.update(sampling)
  return config


def _sample(workdir, seed=0, **sampling):
  config = _tiny_config(**sampling)
  config.seed = seed
  return stages.run('sample', config, str(workdir))['sample']


def _main(workdir, *args):
  result = subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.main', *_TINY,
       f'--workdir={workdir}', *args],
      cwd=_ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pipeline')
  _main(workdir, '--mode=all')
  return workdir


def _sample_dirs(workdir):
  return sorted((workdir / 'samples').iterdir())


def test_all_writes_every_stage(workdir):
  for name in ('vqvae', 'codes', 'prior_0', 'prior_1', 'samples',
               'classifier', 'eval'):
    assert (workdir / name).is_dir(), name
  assert json.loads((workdir / 'vqvae' / 'metrics.json').read_text())['step'] == 6
  for level in (0, 1):
    metrics = json.loads(
        (workdir / f'prior_{level}' / 'metrics.json').read_text())
    assert metrics['step'] == 6


def test_sample_outputs(workdir):
  (run,) = _sample_dirs(workdir)
  meta = json.loads((run / 'meta.json').read_text())
  assert meta['vqvae_step'] == 6 and meta['prior_steps'] == [6, 6]
  assert meta['conditional'] and meta['num_samples'] == 10
  codes = np.load(run / 'codes.npz')
  assert codes['codes_0'].shape == (10, 4, 4)
  assert codes['codes_1'].shape == (10, 8, 8)
  np.testing.assert_array_equal(codes['labels'], np.arange(10))
  for level in (0, 1):
    assert codes[f'codes_{level}'].min() >= 0
    assert codes[f'codes_{level}'].max() < 16
  with Image.open(run / 'samples.png') as grid:
    # One row per class, num_samples_per_class=1 column, 2-pixel borders.
    assert grid.size == (1 * 34 + 2, 10 * 34 + 2)
  with Image.open(run / 'levels.png') as grid:
    # Rows: every level, then the top level alone; 8 samples per row.
    assert grid.size == (8 * 34 + 2, 2 * 34 + 2)


def test_sample_again_skips_and_other_controls_write_beside(workdir):
  (first,) = _sample_dirs(workdir)
  before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
  _sample(workdir)
  assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
  _sample(workdir, top_k=1)
  _sample(workdir, conditional=False)
  runs = _sample_dirs(workdir)
  assert len(runs) == 3 and first in runs
  assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
  (greedy,) = [r for r in runs if '_k1_' in r.name]
  # The unconditional run has 8 maps (num_samples_per_class) and no labels.
  (uncond,) = [r for r in runs if r.name.endswith('_uncond')]
  uncond_codes = np.load(uncond / 'codes.npz')
  assert 'labels' not in uncond_codes
  per_class = _tiny_config().sampling.num_samples_per_class
  assert uncond_codes['codes_1'].shape[0] == per_class
  # top_k=1 is greedy decoding: another sampling seed gives the same codes.
  _sample(workdir, seed=7, top_k=1)
  (greedy7,) = [r for r in _sample_dirs(workdir) if 'seed7' in r.name]
  for name in ('codes_0', 'codes_1', 'labels'):
    np.testing.assert_array_equal(np.load(greedy / 'codes.npz')[name],
                                  np.load(greedy7 / 'codes.npz')[name])


def test_codes_and_sample_load_after_training_knobs_change(workdir, tmp_path):
  # Settings that shape the optimizer state or the prior's train state
  # (clipping, Polyak averaging) changed after training: the later stages
  # read the variables only, so they still run, with the same weights.
  trained = _tiny_config(top_k=2)
  assert trained.vqvae_train.grad_clip_norm > 0
  assert trained.prior.grad_clip_norm > 0 and trained.prior.polyak_decay > 0
  changed = _tiny_config(top_k=2)
  changed.vqvae_train.grad_clip_norm = 0.0
  changed.prior.grad_clip_norm = 0.0
  changed.prior.polyak_decay = 0.0
  metas = {}
  for name, config in (('trained', trained), ('changed', changed)):
    copy = tmp_path / name
    shutil.copytree(workdir, copy)
    assert stages.run('codes', config, str(copy))['codes']['vqvae_step'] == 6
    metas[name] = stages.run('sample', config, str(copy))['sample']
    assert metas[name]['prior_steps'] == [6, 6]
  # The Polyak weights the checkpoints hold (sampling.use_polyak) in both.
  got = np.load(os.path.join(metas['changed']['dir'], 'codes.npz'))
  want = np.load(os.path.join(metas['trained']['dir'], 'codes.npz'))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_eval_report(workdir):
  report = json.loads((workdir / 'eval' / 'report.json').read_text())
  # The eval reused --mode=sample's run (10 samples, one per class).
  (run,) = [r for r in _sample_dirs(workdir)
            if r.name.endswith('_seed0_t1_k0_p1_n10')]
  assert report['samples']['sample_run'] == str(run)
  assert report['held_out_examples'] == 64
  assert report['samples']['num_examples'] == 10
  assert report['real_vs_real']['num_examples'] == 10
  recon = report['reconstructions']
  assert recon['num_examples'] == 64
  # The 28x28 centre is scored too (its arithmetic: test_reconstruction.py).
  assert recon['mse01_area'] > 0 and np.isfinite(recon['psnr_area'])
  np.testing.assert_allclose(recon['psnr_area'],
                             -10 * np.log10(recon['mse01_area']), rtol=1e-6)
  for section in ('samples', 'real_vs_real'):
    for key in ('fid', 'kid', 'inception_score', 'precision', 'recall'):
      assert report[section][key] is not None, (section, key)
  assert 0.0 <= report['samples']['class_agreement'] <= 1.0
  assert set(report['priors']) == {'level_0', 'level_1'}
  text = (workdir / 'eval' / 'report.md').read_text()
  assert 'real-vs-real floor' in text and 'PSNR, original area' in text


def test_eval_with_cas(workdir, tmp_path):
  copy = tmp_path / 'cas'
  shutil.copytree(workdir, copy)
  config = _tiny_config()
  config.eval.cas = True
  config.eval.cas_samples_per_class = 2
  report = stages.run('eval', config, str(copy))['eval']
  cas = report['cas']
  assert cas['samples']['train_examples'] == 20
  assert cas['reconstructions']['train_examples'] == 20
  assert cas['real']['accuracy'] == json.loads(
      (copy / 'classifier' / 'metrics.json').read_text())['eval/accuracy']
  for row in cas.values():
    assert 0.0 <= row['accuracy'] <= row['top5_accuracy'] <= 1.0
  assert (copy / 'eval' / 'cas_samples' / 'metrics.json').exists()

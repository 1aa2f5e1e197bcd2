"""The whole pipeline from the command line on a tiny config: --mode=all,
then sampling again (skipped: nothing is overwritten) and with other
controls (a new directory beside the first), in this process to save the
start-up of a new one."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist
from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import errors
from vqvae2_jax import generate
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax import stages
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.evaluation import judges
from vqvae2_jax.evaluation import run as eval_run

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = ['--config=configs/fashion_mnist.py:tiny',
         # Small splits keep code extraction to a few batches.
         '--config.data.train_split=train[:256]',
         '--config.data.eval_split=test[:64]',
         '--config.vqvae_train.eval_batch_size=32',
         '--config.prior.eval_batch_size=32',
         # The domain classifier as the ruler, so that --mode=all trains it
         # for the rejection and CAS tests below; the judge's eval is
         # test_eval_with_the_judge's.
         '--config.eval.features=classifier']


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


_ALL = {}  # The --mode=all run of the fixture below.


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pipeline')
  _ALL['result'] = _main(workdir, '--mode=all')
  return workdir


def test_all_prints_a_short_console(workdir):
  result = _ALL['result']
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 60, '\n'.join(lines)
  # Each stage: its header, progress, results; then the summary table.
  for expected in ('[1/7] vqvae', 'Exported pipeline: ', 'VQ-VAE: 6 steps of batch 8',
                   'VQ-VAE: step 6/6 (100%)', 'Prior level 1: step 6 in',
                   'Codes: 64 eval, 256 train', 'Wrote 10 samples to',
                   'Classifier: step 6 in', 'Report: ', 'Done in'):
    assert any(expected in line for line in lines), (expected, lines)
  assert not any('orbax' in line or 'checkpoint_manager' in line
                 or 'oneDNN' in line for line in lines), lines
  # The full log of each stage that did work is in its directory.
  log = (workdir / 'vqvae' / 'log.txt').read_text()
  assert 'checkpoint' in log and 'VQ-VAE: step 2/6' in log
  assert len(log.splitlines()) > len(lines)
  for stage_log, expected in (
      (workdir / 'codes' / 'log.txt', 'Codes: 64 eval, 256 train'),
      (_sample_dirs(workdir)[0] / 'log.txt', 'Wrote 10 samples'),
      (workdir / 'eval' / 'log.txt', 'Eval report in')):
    assert expected in stage_log.read_text(), stage_log


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


def test_sample_with_a_contrast_writes_its_own_run(workdir, tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  plain = _sample(copy)
  contrasted = _sample(copy, contrast=(0.0, 3.0))
  assert '_c0-3_' in os.path.basename(contrasted['dir'])
  assert list(contrasted['contrast']) == [0.0, 3.0]
  assert list(plain['contrast']) == [0.0, 0.0]
  plain_codes = np.load(os.path.join(plain['dir'], 'codes.npz'))
  codes = np.load(os.path.join(contrasted['dir'], 'codes.npz'))
  # The top level drew as without; the bottom level drew otherwise.
  np.testing.assert_array_equal(codes['codes_0'], plain_codes['codes_0'])
  assert not np.array_equal(codes['codes_1'], plain_codes['codes_1'])
  # A discount likewise: its own run, recorded, the bottom level only.
  discounted = _sample(copy, discount=(0.0, 4.0))
  assert '_ds0-4_' in os.path.basename(discounted['dir'])
  assert discounted['discount_rule'] == 'squared'
  assert list(discounted['discount']) == [0.0, 4.0]
  assert list(plain['discount']) == [0.0, 0.0]
  codes = np.load(os.path.join(discounted['dir'], 'codes.npz'))
  np.testing.assert_array_equal(codes['codes_0'], plain_codes['codes_0'])
  assert not np.array_equal(codes['codes_1'], plain_codes['codes_1'])


def test_sample_with_a_guidance_per_level_guides_only_those_levels(
    workdir, tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  plain = _sample(copy)
  guided = _sample(copy, guidance=1.0, guidance_per_level=(1.0, 2.0))
  assert '_g1-2_' in os.path.basename(guided['dir'])
  assert list(guided['guidance']) == [1.0, 2.0]
  plain_codes = np.load(os.path.join(plain['dir'], 'codes.npz'))
  guided_codes = np.load(os.path.join(guided['dir'], 'codes.npz'))
  # The top level drew as unguided; the bottom followed its scale.
  np.testing.assert_array_equal(guided_codes['codes_0'],
                                plain_codes['codes_0'])
  assert not np.array_equal(guided_codes['codes_1'], plain_codes['codes_1'])


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
  runs = sorted(p.name for p in (copy / 'eval').glob('cas_samples_*'))
  assert len(runs) == 1
  assert (copy / 'eval' / runs[0] / 'metrics.json').exists()
  # Other sampling settings: another sample run, its own CAS classifier;
  # the first one's is kept, not refused as another config's.
  config.sampling.temperature = 0.9
  again = stages.run('eval', config, str(copy))['eval']['cas']
  assert again['samples']['train_examples'] == 20
  assert len(list((copy / 'eval').glob('cas_samples_*'))) == 2
  assert (copy / 'eval' / runs[0] / 'metrics.json').exists()


def test_eval_with_the_judge(workdir, tmp_path, monkeypatch, tiny_judge,
                             capsys):
  copy = tmp_path / 'judged'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'classifier')  # The judge's eval needs none.
  monkeypatch.setitem(judges.JUDGES, 'fashion_mnist', tiny_judge)
  config = _tiny_config()
  config.eval.features = 'judge'
  report = stages.run('eval', config, str(copy))['eval']
  assert report['judge_sha256'] == tiny_judge.sha256
  assert report['features'] == 'judge (pooled, 8-d)'
  assert 'classifier_step' not in report
  for section in ('samples', 'real_vs_real'):
    for key in ('fid', 'kid', 'inception_score', 'precision', 'recall'):
      assert np.isfinite(report[section][key]), (section, key)
  assert 0.0 <= report['samples']['class_agreement'] <= 1.0
  # Another ruler than the fixture's (the domain classifier's features).
  before = json.loads((workdir / 'eval' / 'report.json').read_text())
  assert before['samples']['fid'] != report['samples']['fid']
  text = (copy / 'eval' / 'report.md').read_text()
  assert tiny_judge.sha256 in text and 'Ruler of the sample metrics' in text
  # Pipeline.evaluate: the report's sample and floor figures, from the
  # workdir and from its exported file (the same samples, the same ruler).
  (exported,) = (copy / 'export').glob('*.msgpack')
  from_file = api.Pipeline.load(str(exported))
  from_workdir = api.Pipeline.load(str(copy), config)
  capsys.readouterr()
  evaluated = (from_workdir.evaluate(10),
               from_file.evaluate(10, features='judge'))
  # From Python too, each shows its progress (`console.python_console`).
  assert capsys.readouterr().err.count('Evaluate: sample 10/10 (100%)') == 2
  for got in evaluated:
    assert got['judge_sha256'] == tiny_judge.sha256
    assert got['held_out_examples'] == report['held_out_examples'] == 64
    assert got['samples']['guidance'] == 1.0 and got['samples']['conditional']
    for section in ('samples', 'real_vs_real'):
      for key in ('num_examples', 'fid', 'kid', 'inception_score',
                  'precision', 'recall'):
        np.testing.assert_allclose(got[section][key], report[section][key],
                                   rtol=1e-6, err_msg=f'{section} {key}')
    assert got['samples']['class_agreement'] == (
        report['samples']['class_agreement'])
  # Other controls draw other samples; the floor stays.
  guided = from_workdir.evaluate(10, guidance=3.0, key=1)
  assert guided['samples']['guidance'] == 3.0
  assert guided['samples']['fid'] != report['samples']['fid']
  assert guided['real_vs_real']['fid'] == got['real_vs_real']['fid']
  # 20 and 13 samples: both draw two of each class, the report's run of 20
  # (13 keep the first of each class and three of the second, as the
  # report's 13 would): its codes in its order (the Inception Score's
  # splits follow the order).
  more = config.copy_and_resolve_references()
  more.eval.num_samples = 20
  want = stages.run('eval', more, str(copy))['eval']['samples']
  assert want['num_examples'] == 20
  drawn = np.load(os.path.join(want['sample_run'], 'codes.npz'))
  features, _ = eval_run.feature_fn(config, str(copy), from_workdir.mesh)
  for n, keep in ((20, np.arange(20)),
                  (13, eval_run.balanced_subset(2, 10, 13))):
    _, labels, codes = eval_run.pipeline_samples(
        from_workdir, n, features, rng=jax.random.PRNGKey(config.seed),
        temperature=1.0, top_k=0, top_p=1.0, guidance=1.0)
    np.testing.assert_array_equal(labels, drawn['labels'][keep])
    assert sorted(np.bincount(labels, minlength=10)) == (
        [1] * 7 + [2] * 3 if n == 13 else [2] * 10)
    for level, got_codes in enumerate(codes):
      np.testing.assert_array_equal(got_codes, drawn[f'codes_{level}'][keep])
  # The file's own ruler (the fixture's domain classifier) needs a workdir.
  with pytest.raises(errors.ConfigError, match="features='judge'"):
    from_file.evaluate(10)
  with pytest.raises(errors.ConfigError, match='Fix: one of auto'):
    from_file.evaluate(10, features='pixels')
  with pytest.raises(api.PipelineInputError, match='num_samples is 0'):
    from_file.evaluate(0)
  # --mode=eval in a workdir holding only the exported file: the report of
  # the trained workdir, the priors' held-out bits measured from the file.
  only = tmp_path / 'export_only'
  (only / 'export').mkdir(parents=True)
  shutil.copy(exported, only / 'export')
  alone = stages.run('eval', config, str(only))['eval']
  assert alone['inputs']['exported_pipeline']['file'] == exported.name
  assert alone['vqvae_step'] == report['vqvae_step']
  for section in ('reconstructions', 'samples', 'real_vs_real'):
    for key, value in report[section].items():
      if isinstance(value, float):
        np.testing.assert_allclose(alone[section][key], value, rtol=1e-6,
                                   err_msg=f'{section} {key}')
  for level, row in report['priors'].items():
    assert alone['priors'][level]['step'] == row['step']
    assert alone['priors'][level]['train_bits_per_code'] is None
    np.testing.assert_allclose(alone['priors'][level]['held_out_bits_per_code'],
                               row['held_out_bits_per_code'], rtol=1e-6)
  assert 'Priors (bits per code)' in (only / 'eval' / 'report.md').read_text()
  # A file that is not the recorded one is refused before any work.
  data = bytearray(open(tiny_judge.path, 'rb').read())
  data[-1] ^= 1
  with open(tiny_judge.path, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(judges.JudgeFileError, match='Fix: '):
    stages.run('eval', config, str(copy))


def _sum_of_top_codes(images, codes, labels):
  del images, labels
  return codes[0].reshape(len(codes[0]), -1).sum(axis=-1).astype(np.float64)



def test_evaluate_against_a_saved_real_features_file(workdir, tmp_path,
                                                     monkeypatch, tiny_judge):
  monkeypatch.setitem(judges.JUDGES, 'fashion_mnist', tiny_judge)
  config = _tiny_config()
  config.eval.features = 'judge'
  config.eval.batch_size = 24  # The 64 held-out images in 3 batches.
  pipe = api.Pipeline.load(str(workdir), config)
  out = tmp_path / 'real'
  path = out / 'real.npz'
  header = pipe.write_real_features(path, 30)
  assert header['judge_sha256'] == tiny_judge.sha256
  assert (header['held_out_examples'], header['floor_examples']) == (64, 30)
  # The figures the images give, bit for bit: the floor cut inside its
  # first batch (10) and its second (26), as the data's own pass cuts it.
  for n in (10, 26):
    from_data = pipe.evaluate(n, key=2)
    from_file = pipe.evaluate(n, key=2, real_features=path)
    del from_data['seconds'], from_file['seconds']
    assert from_file == from_data, n
    assert from_file['real_vs_real']['num_examples'] == n
  # Refused, saying what to do: more samples than the floor holds, another
  # ruler, a damaged or missing file.
  with pytest.raises(errors.UserError, match='floor of 30 training images.*'
                     'Fix: write it again with num_samples=31'):
    pipe.evaluate(31, real_features=path)
  with pytest.raises(errors.UserError, match="features: file 'judge"):
    pipe.evaluate(10, real_features=path, features='classifier')
  damaged = out / 'damaged.npz'
  damaged.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(errors.UserError, match='not a readable real-features'):
    pipe.evaluate(10, real_features=damaged)
  with pytest.raises(errors.UserError, match='No real-features file'):
    pipe.evaluate(10, real_features=out / 'none.npz')
  with pytest.raises(api.PipelineInputError, match='num_samples is 0'):
    pipe.write_real_features(path, 0)
  # A write that fails leaves the file before it whole.
  before = path.read_bytes()
  monkeypatch.setattr(eval_run, 'floor_stats', _fail)
  with pytest.raises(RuntimeError, match='stopped'):
    pipe.write_real_features(path, 30)
  assert path.read_bytes() == before
  assert sorted(os.listdir(out)) == ['damaged.npz', 'real.npz']


def _fail(*args, **kwargs):
  del args, kwargs
  raise RuntimeError('stopped')

def test_keep_one_is_the_plain_sampler(workdir, tmp_path):
  copy = tmp_path / 'plain'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'classifier')  # keep = 1 needs no classifier.
  config = _tiny_config(num_samples_per_class=2, batch_size=32)
  meta = generate.sample_and_save(config, str(copy))
  assert meta['rejection_keep'] == 1.0
  assert '_keep' not in os.path.basename(meta['dir'])
  assert 'acceptance_rate' not in meta
  # The sampler itself, called once with the run's key and labels.
  mesh = parallel.create_mesh(config.mesh)
  vqvae, vq_variables, _ = loading.load_vqvae(config, str(copy), mesh)
  provenance = loading.vqvae_provenance(config, vq_variables, 6)
  priors = [loading.load_prior(config, str(copy), level, vqvae=provenance,
                               mesh=mesh)[:2] for level in (0, 1)]
  labels = np.zeros((24,), np.int32)  # 20 maps padded to the mesh's 8.
  labels[:20] = np.repeat(np.arange(10), 2)
  want = sampling.sample_hierarchy(
      priors, builders.level_shapes(config), batch_size=24, labels=labels,
      rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 0), mesh=mesh)
  got = np.load(os.path.join(meta['dir'], 'codes.npz'))
  for level in (0, 1):
    np.testing.assert_array_equal(got[f'codes_{level}'],
                                  np.asarray(want[level])[:20])
  np.testing.assert_array_equal(got['labels'], labels[:20])


def test_rejection_keeps_the_top_scoring_candidates(workdir, tmp_path,
                                                    monkeypatch):
  copy = tmp_path / 'reject'
  shutil.copytree(workdir, copy)
  # Every candidate: a plain run of 4 per class with the same key, labels
  # and batches is the candidate stream of keep = 0.25 with 1 per class.
  plain = generate.sample_and_save(
      _tiny_config(num_samples_per_class=4, batch_size=8), str(copy))
  candidates = np.load(os.path.join(plain['dir'], 'codes.npz'))
  scores = _sum_of_top_codes(None, [candidates['codes_0']], None)
  want = [np.flatnonzero(candidates['labels'] == c)[
      np.argsort(-scores[candidates['labels'] == c], kind='stable')[0]]
          for c in range(10)]

  config = _tiny_config(num_samples_per_class=1, batch_size=8,
                        rejection_keep=0.25)
  results = {}
  for devices in ('all', 'one'):
    if devices == 'one':
      create_mesh = parallel.create_mesh
      monkeypatch.setattr(
          parallel, 'create_mesh',
          lambda mesh_config=None, devices=None: create_mesh(
              mesh_config, jax.devices()[:1]))
      shutil.rmtree(os.path.join(copy, 'samples', os.path.basename(
          results['all']['dir'])))
    results[devices] = meta = generate.sample_and_save(
        config, str(copy), scorer=_sum_of_top_codes)
    assert meta['dir'].endswith('_n10_keep0.25')
    assert meta['acceptance_rate'] == 0.25 and meta['num_candidates'] == 40
    assert meta['classifier'] is None
    got = dict(np.load(os.path.join(meta['dir'], 'codes.npz')))
    for level in (0, 1):
      np.testing.assert_array_equal(got[f'codes_{level}'],
                                    candidates[f'codes_{level}'][want])
    np.testing.assert_array_equal(got['labels'], np.arange(10))
    np.testing.assert_allclose(meta['scores'], scores[want])
    results[devices]['codes'] = got
  for name in ('codes_0', 'codes_1'):
    np.testing.assert_array_equal(results['all']['codes'][name],
                                  results['one']['codes'][name])


def test_rejection_with_the_domain_classifier(workdir, tmp_path):
  copy = tmp_path / 'classifier'
  shutil.copytree(workdir, copy)
  config = _tiny_config(num_samples_per_class=2, rejection_keep=0.5)
  meta = stages.run('sample', config, str(copy))['sample']
  assert meta['classifier']['step'] == 6
  assert meta['classifier']['fingerprint']['data.name'] == 'fashion_mnist'
  assert meta['acceptance_rate'] == 0.5 and len(meta['scores']) == 20
  assert all(0.0 <= s <= 1.0 for s in meta['scores'])
  run = copy / 'samples' / os.path.basename(meta['dir'])
  with Image.open(run / 'samples.png') as kept, \
      Image.open(run / 'samples_without_rejection.png') as before, \
      Image.open(run / 'comparison.png') as both:
    assert kept.size == before.size == (2 * 34 + 2, 10 * 34 + 2)
    assert both.size == (2 * kept.size[0] + 8, kept.size[1])

  # Without a classifier, keep < 1 fails before sampling, naming the mode.
  shutil.rmtree(copy / 'classifier')
  config.seed = 3
  with pytest.raises(FileNotFoundError, match='--mode=classifier'):
    stages.run('sample', config, str(copy))
  assert not [p for p in (copy / 'samples').iterdir() if 'seed3' in p.name]


def test_samples_grid_shows_at_most_ten_per_class(workdir, tmp_path):
  copy = tmp_path / 'many'
  shutil.copytree(workdir, copy)
  # The tiny config's batch of 8 (15 batches): the samplers the tests above
  # compiled, none compiled for another batch size.
  meta = _sample(copy, num_samples_per_class=12)
  assert len(np.load(os.path.join(meta['dir'], 'codes.npz'))['labels']) == 120
  with Image.open(os.path.join(meta['dir'], 'samples.png')) as grid:
    assert grid.size == (10 * 34 + 2, 10 * 34 + 2)


def test_sampling_into_an_unwritable_workdir_fails_before_sampling(
    workdir, tmp_path, monkeypatch):
  copy = tmp_path / 'unwritable'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'samples')
  (copy / 'samples').write_text('not a directory')  # Unwritable, even as root.
  sampled = []
  monkeypatch.setattr(sampling, 'sample_hierarchy',
                      lambda *a, **k: sampled.append(1))
  with pytest.raises(errors.WorkdirError) as info:
    stages.run('sample', _tiny_config(), str(copy))
  assert str(copy / 'samples') in str(info.value)
  assert 'Fix:' in str(info.value)
  assert not sampled


# The Python API on the same trained workdir.


@pytest.fixture(scope='module')
def pipe(workdir):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  return Pipeline.load(str(workdir), _tiny_config())


def _test_images(n=5):
  config = _tiny_config()
  batch = next(iter(input_pipeline.create_eval_iterator(
      config.data, global_batch_size=8,
      mesh=parallel.create_mesh(config.mesh))))
  return np.asarray(batch['image'])[:n], np.asarray(batch['label'])[:n]


def test_api_encode_decode_reconstruct(pipe):
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  images, _ = _test_images()  # 5 images: padded to the 8 devices inside.
  codes = pipe.encode(images)
  assert [c.shape for c in codes] == [(5, 4, 4), (5, 8, 8)]
  assert all(c.dtype == np.int32 for c in codes)
  recon = pipe.reconstruct(images)
  np.testing.assert_array_equal(pipe.decode(codes), recon)
  # What the model computes on the whole batch at once.
  direct, aux = pipe.vqvae.apply(pipe.vqvae_variables, images, train=False)
  np.testing.assert_allclose(recon, direct, rtol=1e-5, atol=1e-5)
  for mine, theirs in zip(codes, aux['codes']):
    np.testing.assert_array_equal(mine, theirs)
  # uint8 images, and the 28x28 originals padded as the input pipeline does.
  as_uint8 = api.to_uint8(images)
  for other in (as_uint8, as_uint8[:, 2:30, 2:30], as_uint8[..., 0]):
    for mine, theirs in zip(pipe.encode(other), codes):
      np.testing.assert_array_equal(mine, theirs)
  assert pipe.steps == {'vqvae': 6, 'prior_0': 6, 'prior_1': 6}


def test_api_samples_are_deterministic_per_key(pipe):
  images, codes = pipe.sample(labels=[0, 3, 9], key=7)
  assert images.shape == (3, 32, 32, 1) and images.dtype == np.float32
  again, again_codes = pipe.sample(labels=[0, 3, 9], key=7)
  np.testing.assert_array_equal(images, again)
  for a, b in zip(codes, again_codes):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(pipe.decode(codes), images)
  other, _ = pipe.sample(labels=[0, 3, 9], key=8)
  assert not np.array_equal(other, images)
  unconditional, filtered = pipe.sample(n=2, key=7, temperature=0.8,
                                        top_p=0.9)
  assert unconditional.shape == (2, 32, 32, 1)
  # No temperature, top_k or top_p given: the config's, as --mode=sample
  # and evaluate draw.
  _, hotter = pipe.sample(labels=[0, 3, 9], key=7, temperature=1.7)
  assert not np.array_equal(hotter[1], codes[1])
  _assert_config_samples(pipe, 'temperature', 1.7, [0, 3, 9], hotter)
  _, top_two = pipe.sample(labels=[0, 3, 9], key=7, top_k=2)
  assert not np.array_equal(top_two[1], codes[1])
  _assert_config_samples(pipe, 'top_k', 2, [0, 3, 9], top_two)
  # Each gated block's step in one Pallas kernel: the same draws.
  _assert_config_samples(pipe, 'step_kernel', 'pallas', [0, 3, 9], codes)
  _, unfiltered = pipe.sample(n=2, key=7, temperature=0.8)
  assert not np.array_equal(unfiltered[1], filtered[1])
  try:
    pipe.config.sampling.top_p = 0.9
    _, by_config = pipe.sample(n=2, key=7, temperature=0.8)
  finally:
    pipe.config.sampling.top_p = 1.0
  for a, b in zip(by_config, filtered):
    np.testing.assert_array_equal(a, b)
  # Guidance: off at 1.0; 0.0 is the unconditional path at every level.
  _, guided = pipe.sample(labels=[0, 3, 9], key=7, guidance=1.0)
  for a, b in zip(guided, codes):
    np.testing.assert_array_equal(a, b)
  _, at_zero = pipe.sample(labels=[0, 3, 9], key=7, guidance=0.0)
  _, no_labels = pipe.sample(n=3, key=7)
  for a, b in zip(at_zero, no_labels):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='Fix: pass labels'):
    pipe.sample(n=2, key=7, guidance=2.0)
  # One scale per level, top first: each level as its scale alone draws it.
  _, top_only = pipe.sample(labels=[0, 3, 9], key=7, guidance=(0.0, 1.0))
  np.testing.assert_array_equal(top_only[0], no_labels[0])
  assert not np.array_equal(top_only[1], no_labels[1])
  _, bottom_only = pipe.sample(labels=[0, 3, 9], key=7, guidance=[1.0, 0.0])
  np.testing.assert_array_equal(bottom_only[0], codes[0])
  assert not np.array_equal(bottom_only[1], codes[1])
  with pytest.raises(ValueError, match='guidance is 1:2, but no labels'):
    pipe.sample(n=2, key=7, guidance=(1.0, 2.0))
  # No guidance given: the config's (as --mode=sample draws), with labels;
  # without labels the plain unconditional path.
  saved = pipe.config.sampling.guidance
  try:
    pipe.config.sampling.guidance = 0.0
    _, by_config = pipe.sample(labels=[0, 3, 9], key=7)
    for a, b in zip(by_config, no_labels):
      np.testing.assert_array_equal(a, b)
    pipe.sample(n=2, key=7)  # Not refused: guidance needs labels.
    pipe.config.sampling.guidance_per_level = (0.0, 1.0)  # Wins over it.
    _, by_level = pipe.sample(labels=[0, 3, 9], key=7)
    for a, b in zip(by_level, top_only):
      np.testing.assert_array_equal(a, b)
  finally:
    pipe.config.sampling.guidance = saved
    pipe.config.sampling.guidance_per_level = ()


def test_api_contrast_divides_by_stage_ones_code_frequencies(pipe):
  frequencies = pipe.code_frequencies()
  k = pipe.priors[1][0].num_embeddings
  assert len(frequencies) == 2
  for level, f in enumerate(frequencies):
    assert f.shape == (k,) and abs(f.sum() - 1) < 1e-9 and f.min() >= 0
    counts = np.asarray(pipe.vqvae_variables['vq_stats'][
        f'quantizers_{level}']['cluster_size'], np.float64)
    np.testing.assert_allclose(f, counts / counts.sum())
  bias = pipe.code_bias((0.0, 0.5))
  assert bias[0] is None
  np.testing.assert_allclose(
      bias[1], -0.5 * np.log(np.maximum(frequencies[1], 0.01 / k)),
      rtol=1e-5)
  assert pipe.code_bias(0.0) == [None, None]
  assert all(b is not None for b in pipe.code_bias(0.5))
  with pytest.raises(ValueError, match='names 3 levels'):
    pipe.code_bias((0.0, 0.5, 0.5))
  labels = [0, 3, 9, 4]
  _, codes = pipe.sample(labels=labels, key=7)
  _, off = pipe.sample(labels=labels, key=7, contrast=0.0)
  for a, b in zip(off, codes):
    np.testing.assert_array_equal(a, b)
  # The bottom level drawn with its bias, given the top level drawn without.
  _, got = pipe.sample(labels=labels, key=7, contrast=(0.0, 2.0))
  np.testing.assert_array_equal(got[0], codes[0])
  assert not np.array_equal(got[1], codes[1])
  model, variables = pipe.priors[1]
  np.testing.assert_array_equal(got[1], np.asarray(sampling.sample_level(
      model, variables, shape=codes[1].shape, cond_codes=(got[0],),
      labels=np.asarray(labels, np.int32),
      rng=jax.random.fold_in(jax.random.PRNGKey(7), 1),
      code_bias=pipe.code_bias((0.0, 2.0))[1]))[:4])
  # No contrast given: the config's.
  _assert_config_samples(pipe, 'contrast', (0.0, 2.0), labels, got)


def _assert_config_samples(pipe, field, value, labels, want):
  """With config.sampling.<field> set to `value` (then put back),
  `pipe.sample(labels, key=7)` draws the codes `want`."""
  saved = pipe.config.sampling[field]
  try:
    pipe.config.sampling[field] = value
    _, by_config = pipe.sample(labels=labels, key=7)
    for a, b in zip(by_config, want):
      np.testing.assert_array_equal(a, b)
  finally:
    pipe.config.sampling[field] = saved


def test_api_discount_takes_stage_ones_code_frequencies_off(pipe):
  frequencies = pipe.code_frequencies()
  discount = pipe.code_discount((0.0, 3.0))
  assert discount[0] is None
  np.testing.assert_allclose(discount[1], 3.0 * frequencies[1], rtol=1e-6)
  assert pipe.code_discount(0.0) == [None, None]
  with pytest.raises(ValueError, match='names 3 levels'):
    pipe.code_discount((0.0, 3.0, 3.0))
  labels = [0, 3, 9, 4]
  _, codes = pipe.sample(labels=labels, key=7)
  _, got = pipe.sample(labels=labels, key=7, discount=(0.0, 3.0))
  np.testing.assert_array_equal(got[0], codes[0])
  assert not np.array_equal(got[1], codes[1])
  # As the sampler draws it on the pipeline's mesh (the batch padded to
  # split over it): a discount's draws can depend on the device split at
  # float rounding (`sampling.discount_logits`), a bias's cannot.
  padded = np.asarray(labels * 2, np.int32)
  with_mesh = sampling.sample_hierarchy(
      pipe.priors, pipe.level_shapes, batch_size=len(padded), labels=padded,
      rng=jax.random.PRNGKey(7), mesh=pipe.mesh, code_discount=discount)
  assert pipe.mesh.size == len(padded)
  for a, b in zip(got, with_mesh):
    np.testing.assert_array_equal(a, np.asarray(b)[:4])
  # No discount given: the config's.
  _assert_config_samples(pipe, 'discount', (0.0, 3.0), labels, got)


def test_api_log_prob_is_the_priors_held_out_cross_entropy(pipe, workdir):
  from vqvae2_jax.data import codes as codes_lib  # pylint: disable=g-import-not-at-top
  held_out = codes_lib.CodeDataset(str(workdir / 'codes'), None).split('eval')
  data = held_out.read(np.arange(held_out.num_examples), (0, 1))
  codes, labels = data['codes'], data['label']
  for given, key in ((labels, 'eval/bits_per_code'),
                     (None, 'eval/bits_per_code_uncond')):
    bits = pipe.log_prob_codes(codes, given)  # [levels, n]
    for level in (0, 1):
      metrics = json.loads((workdir / f'prior_{level}' / 'metrics.json')
                           .read_text())
      per_code = bits[level].sum() / codes[level].size
      np.testing.assert_allclose(per_code, metrics[key], rtol=1e-5)
  # From images: the sum over levels of their codes' bits.
  images, image_labels = _test_images()
  np.testing.assert_allclose(
      pipe.log_prob(images, image_labels),
      pipe.log_prob_codes(pipe.encode(images), image_labels).sum(axis=0))


@pytest.mark.parametrize('call, message', [
    (lambda p, x: p.encode(x[..., :1].repeat(3, -1)), r'\[n, 32, 32, 1\]'),
    (lambda p, x: p.encode(x * 255.0), r'not \[-1, 1\]\. Fix: pass uint8'),
    (lambda p, x: p.encode(x[:, :16, :16]),
     r"16x16, smaller than the model's 32x32 \(they are not upscaled\)\. "
     r'Fix: pad or resize them to 32x32 \(or pass the 28x28 originals'),
    (lambda p, x: p.encode(np.zeros((1, 1, 1, 1), np.uint8)),
     r"Images are 1x1, smaller than the model's 32x32"),
    (lambda p, x: p.log_prob(np.zeros((1, 30, 30, 1), np.uint8)),
     r"Images are 30x30, smaller than the model's 32x32"),
    (lambda p, x: p.encode(np.zeros((1, 64, 64, 1), np.uint8)),
     r"Images are 64x64, not the model's 32x32\. Fix: resize or crop them "
     r'to 32x32'),
    (lambda p, x: p.encode([x[0], x[1, :28, :28]]),
     r'Images do not stack into one array \(.*\)\. Fix: pass one array '
     r'\[n, 32, 32, 1\]'),
    (lambda p, x: p.encode(x.astype(np.int64)),
     r'dtype int64\. Fix: .*pixel_range=\(low, high\)'),
    (lambda p, x: p.encode(np.where(np.arange(2)[:, None, None, None] == 1,
                                    np.nan, x)),
     r'Images hold 1024 NaN or infinite pixel value\(s\), the first in '
     r'image 1\. Fix: replace them'),
    (lambda p, x: p.log_prob(np.where(x > 0.5, np.inf, x)),
     r'NaN or infinite pixel value\(s\), the first in image 0\. Fix'),
    (lambda p, x: p.encode((x + 1.0) / 2.0),
     r'span \[0, 1\], no pixel below 0: they look like \[0, 1\] data, and '
     r'the model takes \[-1, 1\]\. Fix: pass pixel_range=\(0, 1\)'),
    (lambda p, x: p.log_prob((x + 1.0) / 2.0), r'look like \[0, 1\] data'),
    (lambda p, x: p.encode(x * 1.1), r'span \[-1\.1, 1\.1\], not \[-1, 1\]'),
    (lambda p, x: p.encode((x + 1.0) * 127.5),
     r'span \[0, 255\], not \[-1, 1\]\. Fix: .*pixel_range=\(0, 255\)'),
    (lambda p, x: p.encode((x + 1.0) * 127.5, pixel_range=(0, 1)),
     r'Images span \[0, 255\], not \[0, 1\]\. Fix'),
    (lambda p, x: p.encode(x, pixel_range=(1, 0)),
     r'pixel_range is \(1, 0\)\. Fix: pass \(low, high\) with low < high'),
    (lambda p, x: p.encode(x, pixel_range=np.zeros((3, 3))),
     r'pixel_range is array\(\[\[0\., 0\., 0\.\], \[0\.'),
    (lambda p, x: p.decode([np.zeros((2, 2, 2), np.int32)]),
     r'Got 1 code maps\. Fix'),
    (lambda p, x: p.decode([np.zeros((2, 4, 4), np.int32),
                            np.full((2, 8, 8), 16, np.int32)]),
     r'level 1 must be integers in \[0, 16\)\. Fix'),
    (lambda p, x: p.decode([np.zeros((2, 4, 4), np.int32),
                            np.zeros((2, 4, 4), np.int32)]),
     r'level 1 have shape \(2, 4, 4\)\. Fix: pass \[n, 8, 8\]'),
    (lambda p, x: p.sample(labels=[10]),
     r'outside \[0, 9\]\. Fix: use class indices 0\.\.9, or labels=None'),
    (lambda p, x: p.sample(), r'n is None\. Fix'),
    (lambda p, x: p.sample(n=1.5),
     r'n is 1\.5\. Fix: pass an integer n >= 1'),
    (lambda p, x: p.sample(n=-1), r'n is -1\. Fix: pass an integer n >= 1'),
    (lambda p, x: p.sample(n=True), r'n is True\. Fix'),
    (lambda p, x: p.sample(n=2, key='a'),
     r"key is 'a' \(str\)\. Fix: pass an integer seed \(64 bits at most\) "
     r'or one key from jax\.random\.key\(seed\)'),
    (lambda p, x: p.sample(n=2, key=1.5), r'key is 1\.5 \(float\)\. Fix'),
    (lambda p, x: p.sample(n=2, key=2**70), r'key is 1180591620717411303424 '),
    (lambda p, x: p.sample(n=2, key=jax.random.split(jax.random.PRNGKey(0))),
     r'key is Array\(\[\[.*\(ArrayImpl\)\. Fix'),
    (lambda p, x: p.log_prob(x, labels=[0]),
     r'labels has shape \(1,\)\. Fix: pass one label per image'),
    (lambda p, x: p.log_prob(x, labels=[0.0, 1.0]),
     r'labels have dtype float64\. Fix: pass integer'),
])
def test_api_bad_inputs_say_how_to_fix_them(pipe, call, message):
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  images, _ = _test_images(2)
  with pytest.raises(api.PipelineInputError, match=message) as info:
    call(pipe, images)
  # One line that names the fix, as main prints a UserError.
  assert isinstance(info.value, errors.UserError)
  text = str(info.value)
  assert '\n' not in text and '. Fix: ' in text and text.endswith('.'), text


def test_api_pixel_ranges_and_integer_like_arguments(pipe):
  images, labels = _test_images(2)  # Floats in [-1, 1], black at -1.
  codes = pipe.encode(images)
  # The range said: [0, 1] and [0, 255] floats, any integer dtype, and
  # [-1, 1] floats without a pixel below 0 give the codes of those pixels.
  grey = np.maximum(images, 0.0)  # [-1, 1] images, every pixel >= 0.
  _, grey_aux = pipe.vqvae.apply(pipe.vqvae_variables, grey, train=False)
  for given, pixel_range, want in (
      ((images + 1.0) / 2.0, (0, 1), codes),
      ((images + 1.0) * 127.5, (0.0, 255.0), codes),
      (np.rint((images + 1.0) * 127.5).astype(np.int32), (0, 255), codes),
      (grey, (-1, 1), grey_aux['codes'])):
    for mine, theirs in zip(pipe.encode(given, pixel_range=pixel_range),
                            want):
      np.testing.assert_array_equal(mine, theirs)
  np.testing.assert_array_equal(
      pipe.log_prob((images + 1.0) / 2.0, labels, pixel_range=(0, 1)),
      pipe.log_prob(images, labels))
  # A decoder's small overshoot is taken as it is.
  for mine, theirs in zip(pipe.encode(images * 1.04),
                          pipe.encode(images * 1.04, pixel_range=(-1, 1))):
    np.testing.assert_array_equal(mine, theirs)
  # numpy and 0-d integers for n and the seed are the Python ints; a key
  # is used as it is.
  want, want_codes = pipe.sample(n=2, key=3)
  for n, key in ((np.int32(2), np.int64(3)), (np.array(2), jax.numpy.int32(3)),
                 (2, jax.random.PRNGKey(3)), (2, jax.random.key(3))):
    got, got_codes = pipe.sample(n=n, key=key)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(got_codes, want_codes):
      np.testing.assert_array_equal(a, b)


def test_tensorboard_has_the_image_grids(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  def tags(directory):
    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={'tensors': 0})
    acc.Reload()
    return set(acc.Tags()['tensors'])

  assert {'images/reconstructions', 'eval/psnr_area',
          'train/loss'} <= tags(workdir / 'vqvae')
  assert {'samples', 'levels'} <= tags(_sample_dirs(workdir)[0])


def test_export_loads_without_the_workdir_and_samples_the_same(pipe, workdir,
                                                                tmp_path):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  exported, = (workdir / 'export').glob('*.msgpack')  # Made by --mode=all.
  assert exported.name == 'fashion_mnist_vqvae6_prior6-6.msgpack'
  moved = tmp_path / 'model.msgpack'
  shutil.copy(exported, moved)
  loaded = Pipeline.load(str(moved))
  assert loaded.steps == pipe.steps
  images, codes = pipe.sample(labels=[1, 2], key=5)
  images2, codes2 = loaded.sample(labels=[1, 2], key=5)
  np.testing.assert_array_equal(images, images2)
  for a, b in zip(codes, codes2):
    np.testing.assert_array_equal(a, b)
  test_images, labels = _test_images(3)
  np.testing.assert_array_equal(loaded.log_prob(test_images, labels),
                                pipe.log_prob(test_images, labels))
  # The precision argument reaches the priors (the file's own config says
  # 'default'; on a CPU every setting computes in float32).
  assert loaded.priors[0][0].precision == 'default'
  highest = Pipeline.load(str(moved), precision='highest')
  assert {m.precision for m, _ in highest.priors} == {'highest'}
  assert highest.config.prior.precision == 'highest'
  _, codes3 = highest.sample(labels=[1, 2], key=5)
  for a, b in zip(codes, codes3):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(errors.ConfigError, match='prior.precision'):
    Pipeline.load(str(moved), precision='fastest')
  # A damaged or foreign file is refused with a fix.
  damaged = tmp_path / 'damaged.msgpack'
  damaged.write_bytes(moved.read_bytes()[:1000])
  with pytest.raises(api.PipelineInputError, match='Fix:'):
    Pipeline.load(str(damaged))
  with pytest.raises(api.PipelineInputError, match='own config'):
    Pipeline.load(str(moved), _tiny_config())


def test_a_float16_export_halves_the_priors_and_loads_them_in_float32(
    pipe, workdir, tmp_path):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  full, half = tmp_path / 'full.msgpack', tmp_path / 'half.msgpack'
  pipe.export(str(full))
  pipe.export(str(half), prior_dtype='float16')
  prior_bytes = sum(np.asarray(x).nbytes for _, v in pipe.priors
                    for x in jax.tree.leaves(v))
  saved = full.stat().st_size - half.stat().st_size
  assert abs(saved - prior_bytes / 2) < 0.01 * prior_bytes, (
      saved, prior_bytes)
  loaded = Pipeline.load(str(half))
  for (_, ours), (_, theirs) in zip(pipe.priors, loaded.priors):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      assert b.dtype == np.float32  # Computed as trained, rounded.
      np.testing.assert_array_equal(
          np.asarray(b), np.asarray(a).astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(  # The VQ-VAE is stored as trained.
      jax.tree.leaves(loaded.vqvae_variables)[0],
      jax.tree.leaves(pipe.vqvae_variables)[0])
  test_images, labels = _test_images(3)
  np.testing.assert_allclose(loaded.log_prob(test_images, labels),
                             pipe.log_prob(test_images, labels), rtol=1e-3)
  assert not np.array_equal(loaded.log_prob(test_images, labels),
                            pipe.log_prob(test_images, labels))
  # Refusals: an unknown dtype (nothing written), a weight float16 cannot
  # hold, and a file whose recorded dtype was rewritten.
  with pytest.raises(api.PipelineInputError, match="prior_dtype is 'int8'"):
    pipe.export(str(tmp_path / 'no.msgpack'), prior_dtype='int8')
  assert not (tmp_path / 'no.msgpack').exists()
  with pytest.raises(api.PipelineInputError, match="prior_dtype='float32'"):
    api._stored_prior({'w': jax.numpy.array([1e5])}, 'float16')  # pylint: disable=protected-access
  odd = _rewritten_export(half, tmp_path / 'odd.msgpack', prior_dtype='x')
  with pytest.raises(api.ExportDamagedError, match="stored as 'x'"):
    Pipeline.load(str(odd))
  # --mode=export: config.prior.export_dtype names the file.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  config = _tiny_config()
  config.prior.export_dtype = 'float16'
  result = api.export_workdir(config, str(copy))
  assert os.path.basename(result['path']) == (
      'fashion_mnist_vqvae6_prior6-6_float16.msgpack')
  assert abs(result['bytes'] - half.stat().st_size) < 1000  # Configs differ.


def test_a_pretrained_name_loads_its_checked_file(pipe, workdir, tmp_path,
                                                 monkeypatch):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import files  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import pretrained  # pylint: disable=g-import-not-at-top
  exported, = (workdir / 'export').glob('*.msgpack')
  copy = tmp_path / 'shipped.msgpack'
  shutil.copy(exported, copy)
  spec = pretrained.PretrainedSpec(
      name='tiny_shipped', filename=str(copy),
      sha256=files.sha256_file(str(copy)), command='--mode=export',
      class_agreement=0.1, num_samples=2,
      sampling={'contrast': (0.0, 2.0)})
  monkeypatch.setitem(pretrained.PRETRAINED, 'tiny_shipped', spec)
  monkeypatch.chdir(tmp_path)  # No file or directory of that name here.
  loaded = Pipeline.load('tiny_shipped')
  assert loaded.steps == pipe.steps
  # By name it samples at the spec's settings; by its path, at the file's.
  assert tuple(loaded.config.sampling.contrast) == (0.0, 2.0)
  as_exported = Pipeline.load(str(copy))
  assert tuple(as_exported.config.sampling.get('contrast', ())) == ()
  _, codes = pipe.sample(labels=[3], key=1, contrast=(0.0, 2.0))
  _, codes2 = loaded.sample(labels=[3], key=1)
  _, plain = as_exported.sample(labels=[3], key=1)
  for a, b in zip(codes, codes2):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(codes[-1], plain[-1])
  # A setting the config refuses is refused on load, naming the field.
  monkeypatch.setitem(pretrained.PRETRAINED, 'tiny_shipped',
                      dataclasses.replace(spec, sampling={'contrast': (-1.0,)}))
  with pytest.raises(errors.ConfigError, match='sampling.contrast'):
    Pipeline.load('tiny_shipped')
  monkeypatch.setitem(pretrained.PRETRAINED, 'tiny_shipped', spec)
  # A file that is not the pinned one is refused before it is read.
  with open(copy, 'ab') as f:
    f.write(b'\0')
  with pytest.raises(pretrained.PretrainedFileError, match='sha256'):
    Pipeline.load('tiny_shipped')


def _rewritten_export(source, target, digests=True, **parts):
  """A copy of an exported file with `parts` replaced (digests made anew)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  payload = serialization.msgpack_restore(source.read_bytes())
  payload.update(parts)
  payload.pop('digests')
  if digests:
    payload['digests'] = json.dumps(api._export_digests(payload),  # pylint: disable=protected-access
                                    sort_keys=True)
  target.write_bytes(serialization.msgpack_serialize(payload))
  return target


def test_export_with_a_config_that_is_not_json_is_one_line(workdir,
                                                            tmp_path):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  exported, = (workdir / 'export').glob('*.msgpack')
  # Damaged before its digests were taken (or in a file of before digests):
  # the digests agree, the JSON does not parse.
  for name, digests, parts, problem in (
      ('cut.msgpack', True, {'config': '{"model": {"num_emb'},
       "its 'config' part is not JSON \\(JSONDecodeError\\)"),
      ('old.msgpack', False, {'config': 'not json'},
       "its 'config' part is not JSON \\(JSONDecodeError\\)"),
      ('list.msgpack', True, {'config': '[1, 2]'},
       "its 'config' part is a JSON list, not a dict"),
      ('steps.msgpack', True, {'steps': '{'},
       "its 'steps' part is not JSON \\(JSONDecodeError\\)")):
    path = _rewritten_export(exported, tmp_path / name, digests, **parts)
    with pytest.raises(api.ExportDamagedError) as info:
      Pipeline.load(str(path))
    text = str(info.value)
    assert re.fullmatch(
        f'{re.escape(str(path))} is damaged: {problem}\\. Fix: export it '
        'again \\(--mode=export\\) or copy it again from its source\\.',
        text), text
  # A workdir's config.json that is not a JSON object: one line naming it.
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(errors.ConfigError) as info:
    Pipeline.load(str(tmp_path))
  assert str(info.value).startswith(
      f'{tmp_path / "config.json"} is damaged (not the JSON object a run '
      'writes). Fix: pass the config it was trained with')
  assert '\n' not in str(info.value)


def test_sample_mode_works_from_an_exported_file_alone(workdir, tmp_path):
  exported, = (workdir / 'export').glob('*.msgpack')
  fresh = tmp_path / 'downloaded'
  os.makedirs(fresh / 'export')
  shutil.copy(exported, fresh / 'export' / exported.name)
  meta = _sample(fresh)  # No checkpoints in `fresh`: the file is used.
  trained = _sample(workdir)  # The same run name, from the checkpoints.
  assert os.path.basename(meta['dir']) == os.path.basename(trained['dir'])
  a = np.load(os.path.join(meta['dir'], 'codes.npz'))
  b = np.load(os.path.join(trained['dir'], 'codes.npz'))
  for key in b.files:
    np.testing.assert_array_equal(a[key], b[key])
  # Another model config than the file's is refused with a fix.
  other = tmp_path / 'other'
  shutil.copytree(fresh / 'export', other / 'export')
  config = _tiny_config()
  config.model.num_embeddings = 32
  with pytest.raises(errors.ConfigError, match='another model config.*Fix'):
    stages.run('sample', config, str(other))


def test_workdir_records_its_config_for_the_api(pipe, workdir, tmp_path):
  from vqvae2_jax import Pipeline  # pylint: disable=g-import-not-at-top
  recorded = json.loads((workdir / 'config.json').read_text())
  assert recorded['model']['num_embeddings'] == 16  # The tiny config's.
  loaded = Pipeline.load(str(workdir))  # No config: config.json.
  assert loaded.steps == pipe.steps
  images, _ = _test_images(2)
  for a, b in zip(loaded.encode(images), pipe.encode(images)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(errors.ConfigError, match='no config.json.*Fix'):
    Pipeline.load(str(tmp_path))

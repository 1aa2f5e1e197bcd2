"""--mode=eval's own functions: the sample metrics, the prior rows, the report.

The whole evaluation of a trained workdir runs in test_pipeline.py.
"""

import json
import os

import numpy as np
import pytest

from configs import fashion_mnist
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run


def _stats(seed, n=40, d=3, classes=4):
  rng = np.random.default_rng(seed)
  stats = metrics_lib.FeatureStats(max_features=n)
  logits = rng.normal(size=(n, classes))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  stats.add(rng.normal(size=(n, d)), probs)
  return stats


def test_sample_metrics_are_the_metrics_of_the_features():
  config = fashion_mnist.get_config('tiny')
  config.eval.kid_subsets, config.eval.kid_subset_size = 3, 10
  real, fake = _stats(0), _stats(1)
  requested = np.arange(40) % 4
  out = run.sample_metrics(config, real, fake, requested)
  assert out['num_examples'] == 40
  assert out['fid'] == metrics_lib.fid(real, fake)
  kid = metrics_lib.kid(real.features, fake.features, num_subsets=3,
                        subset_size=10, seed=config.seed)
  assert (out['kid'], out['kid_std']) == (kid.mean, kid.std)
  pr = metrics_lib.precision_recall(real.features, fake.features,
                                    k=config.eval.precision_recall_k)
  assert (out['precision'], out['recall']) == (pr.precision, pr.recall)
  assert out['class_agreement'] == metrics_lib.class_agreement(fake.probs,
                                                               requested)
  assert 'class_agreement' not in run.sample_metrics(config, real, fake, None)
  # The samples against themselves: no distance.
  assert run.sample_metrics(config, real, real, None)['fid'] == (
      pytest.approx(0.0, abs=1e-6))


def _write_prior_metrics(workdir, level, **metrics):
  directory = os.path.join(workdir, f'prior_{level}')
  os.makedirs(directory)
  with open(os.path.join(directory, 'metrics.json'), 'w') as f:
    json.dump(metrics, f)


def test_prior_rows_read_each_levels_metrics(tmp_path):
  config = fashion_mnist.get_config('tiny')
  workdir = str(tmp_path)
  _write_prior_metrics(workdir, 0, **{
      'eval/bits_per_code': 2.5, 'eval_train/bits_per_code': 2.25,
      'baseline/uniform_bits_per_code': 4.0, 'step': 6})
  with pytest.raises(FileNotFoundError,
                     match='No finished prior of level 1.*Fix: run '
                     '--mode=prior'):
    run._prior_rows(config, workdir)  # pylint: disable=protected-access
  _write_prior_metrics(workdir, 1, step=6)
  rows = run._prior_rows(config, workdir)  # pylint: disable=protected-access
  assert rows['level_0'] == {'held_out_bits_per_code': 2.5,
                             'train_bits_per_code': 2.25,
                             'uniform_bits_per_code': 4.0, 'step': 6}
  assert rows['level_1']['held_out_bits_per_code'] is None


def _report(**changes):
  figures = {'fid': 12.5, 'kid': 0.01, 'kid_std': 0.001,
             'inception_score': 3.25, 'precision': 0.5, 'recall': 0.25,
             'num_examples': 10}
  report = {
      'workdir': '/w', 'vqvae_step': 6, 'features': 'the judge',
      'held_out_split': 'test[:40]', 'held_out_examples': 40,
      'reconstructions': {'mse': 0.01, 'psnr': 26.0, 'mse01_area': 0.004,
                          'psnr_area': 24.0, 'used_fraction_level0': 0.5,
                          'perplexity_level0': 7.5, 'rfid': 30.0},
      'priors': {'level_0': {'held_out_bits_per_code': 2.5,
                             'train_bits_per_code': None,
                             'uniform_bits_per_code': 4.0}},
      'samples': {**figures, 'class_agreement': 0.75, 'temperature': 1.0,
                  'top_k': 0, 'top_p': 1.0, 'conditional': True,
                  'sample_run': '/w/samples/t1.0'},
      'real_vs_real': {**figures, 'fid': 2.0, 'split': 'train'},
      'seconds': 3.0}
  report.update(changes)
  return report


def test_report_markdown_tables():
  text = run.report_markdown(_report())
  assert text.startswith('# Evaluation report\n')
  assert '| PSNR, original area (dB) | 24 |' in text
  assert '| level 0: codes used / perplexity | 50.0% / 7.5 |' in text
  assert '| level 1:' not in text
  assert '| level_0 | 2.5 | - | 4 |' in text  # A missing figure is '-'.
  assert '| FID | 12.5 | 2 |' in text
  assert '| class agreement | 0.75 | - |' in text
  assert 'class-conditional (classes balanced) (`t1.0`)' in text
  assert 'Classification Accuracy Score' not in text
  with_cas = run.report_markdown(_report(cas={'samples': {
      'train_examples': 100, 'accuracy': 0.8125, 'top5_accuracy': 0.96875}}))
  assert '| samples | 100 | 0.8125 | 0.9688 |' in with_cas
  assert 'guidance' not in text
  guided = _report()
  guided['samples']['guidance'] = [1.3, 2.0]  # Per level, as JSON reads it.
  assert 'top-p 1.0, guidance 1.3:2, class-conditional' in (
      run.report_markdown(guided))


def test_report_inputs_name_guidance_only_when_on(tmp_path):
  """Reports written before the guidance fields stay current at their
  defaults; a guidance per level is another report."""
  config = fashion_mnist.get_config('tiny')
  digest = lambda: run.report_inputs(config, str(tmp_path))['config_sha256']
  plain = digest()
  del config.sampling['guidance_per_level']
  del config.sampling['guidance']
  assert digest() == plain
  config.sampling.guidance_per_level = (1.3, 2.0)
  assert digest() != plain
  config.sampling.guidance_per_level = ()
  del config.sampling['contrast']
  assert digest() == plain
  config.sampling.contrast = (0.0, 0.5)
  assert digest() != plain
  config.sampling.contrast = ()
  del config.sampling['discount']
  assert digest() == plain
  config.sampling.discount = (0.0, 4.0)
  assert digest() != plain


def test_summary_lines_give_the_figures_beside_their_floor():
  lines = run.summary_lines(_report(), '/w/eval')
  assert lines[0] == ('Samples: FID 12.5 (floor 2), KID 0.01 (floor 0.01), '
                      'IS 3.25 (floor 3.25), precision 0.5 (floor 0.5), '
                      'recall 0.25 (floor 0.25), class agreement 0.75')
  assert lines[1] == ('Reconstructions: PSNR 26, PSNR original area 24, '
                      'rFID 30')
  assert lines[-1] == 'Report: /w/eval/report.md'
  assert run.summary_lines({}, '/w/eval') == ['Report: /w/eval/report.md']

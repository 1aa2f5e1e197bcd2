"""A workdir whose priors are of two kinds: a transformer on the top level, a
gated PixelCNN below, through --mode=prior, sample, eval and export, and the
Pipeline on the workdir and on the exported file."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import errors
from vqvae2_jax import stages
from vqvae2_jax.evaluation import judges
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.models import transformer

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def mixed(stage2_config, stage2_workdir, tmp_path_factory):
  """(config, workdir): the finished stage-2 workdir, its top prior
  retrained as a transformer (the PixelCNN of level 1 kept)."""
  config = stage2_config.copy_and_resolve_references()
  config.prior.level_0.kind = 'transformer'
  workdir = str(tmp_path_factory.mktemp('kinds') / 'mixed')
  shutil.copytree(stage2_workdir[0], workdir)
  shutil.rmtree(os.path.join(workdir, 'prior_0'))
  result = stages.run('prior', config, workdir)['prior']
  return config, workdir, result


def test_prior_mode_trains_the_transformer_and_keeps_the_pixelcnn(mixed):
  config, workdir, result = mixed
  assert isinstance(builders.build_prior(config, 0),
                    transformer.TransformerPrior)
  assert isinstance(builders.build_prior(config, 1), pixelcnn.PixelCNNPrior)
  with open(os.path.join(workdir, 'prior_0', 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['step'] == config.prior.num_train_steps
  assert 0 < result['level_0']['eval/bits_per_code'] < 10
  # A PixelCNN's fingerprint has no kind (older checkpoints still match); a
  # transformer's names it.
  vqvae = {'step': 1, 'digest': 'x'}
  assert 'prior.level_1.kind' not in builders.prior_fingerprint(config, 1,
                                                                vqvae)
  assert builders.prior_fingerprint(config, 0, vqvae)[
      'prior.level_0.kind'] == 'transformer'


def test_sample_eval_and_pipeline_on_mixed_kinds(mixed, monkeypatch,
                                                 tiny_judge):
  config, workdir, _ = mixed
  sample = stages.run('sample', config, workdir)['sample']
  assert sample['num_samples'] == 10
  monkeypatch.setitem(judges.JUDGES, 'fashion_mnist', tiny_judge)
  config = config.copy_and_resolve_references()
  config.eval.features = 'judge'
  report = stages.run('eval', config, workdir)['eval']
  assert np.isfinite(report['samples']['fid'])

  pipe = api.Pipeline.load(workdir)  # The recorded config.json.
  assert isinstance(pipe.priors[0][0], transformer.TransformerPrior)
  images, codes = pipe.sample(labels=[1, 3], key=2)
  assert images.shape == (2, 32, 32, 1)
  assert [c.shape for c in codes] == [(2, 4, 4), (2, 8, 8)]
  bits = pipe.log_prob_codes(codes, labels=[1, 3])
  assert bits.shape == (2, 2) and np.all(np.isfinite(bits)) and np.all(
      bits > 0)
  assert np.all(np.isfinite(pipe.log_prob(images)))

  # --mode=export from the command line, the kind given as a flag; the
  # file alone samples what the workdir samples.
  result = subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.main',
       '--config=configs/fashion_mnist.py:tiny',
       '--config.data.train_split=train[:96]',
       '--config.data.eval_split=test[:40]',
       '--config.prior.level_0.kind=transformer',
       f'--workdir={workdir}', '--mode=export'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  exported, = os.listdir(os.path.join(workdir, 'export'))
  loaded = api.Pipeline.load(os.path.join(workdir, 'export', exported))
  assert isinstance(loaded.priors[0][0], transformer.TransformerPrior)
  again, again_codes = loaded.sample(labels=[1, 3], key=2)
  for a, b in zip(again_codes, codes):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(again, images, atol=1e-6)


def test_a_pixelcnn_checkpoint_is_refused_as_a_transformer(stage2_config,
                                                           stage2_workdir,
                                                           tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(stage2_workdir[0], workdir)
  config = stage2_config.copy_and_resolve_references()
  config.prior.level_0.kind = 'transformer'
  with pytest.raises(errors.CheckpointMismatchError, match='Fix:'):
    api.Pipeline.load(workdir, config)

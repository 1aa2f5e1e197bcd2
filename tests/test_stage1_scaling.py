"""experiments/stage1_scaling.py: stage-1 variants measured by the judge."""

import json

from absl import app
import pytest


def test_study_trains_measures_and_resumes(tmp_path, monkeypatch, tiny_judge,
                                           stage2_config):
  # pylint: disable=g-import-not-at-top
  from experiments import stage1_scaling
  from vqvae2_jax.evaluation import judges
  # pylint: enable=g-import-not-at-top
  monkeypatch.setitem(judges.JUDGES, 'fashion_mnist', tiny_judge)
  config = stage2_config.copy_and_resolve_references()
  config.vqvae_train.num_train_steps = 2
  out = tmp_path / 'out'
  todo = {'bottom16': {'model.downsample_factors': [8, 2]}}
  rows = stage1_scaling.run_study(config, str(out), todo, num_train=32)
  assert list(rows) == ['bottom16']
  r = rows['bottom16']['result']
  # The change reached the model: the bottom map is 16x16, not 8x8.
  assert tuple(config.model.downsample_factors) == (8, 4)
  assert r['latent_shapes'] == [[4, 4], [16, 16]]
  assert rows['bottom16']['recipe']['model.downsample_factors'] == [8, 2]
  assert r['steps'] == 2 and r['train_minutes'] > 0
  recon = r['reconstructions']
  assert recon['num_examples'] == 40 and 0 <= recon['recall'] <= 1
  assert 0 <= recon['class_agreement'] <= 1
  assert r['real_vs_real']['num_examples'] == 32
  assert len(r['used_fraction']) == len(r['perplexity']) == 2
  # The variant trained in its own workdir.
  assert (out / 'bottom16' / 'vqvae' / 'metrics.json').is_file()
  saved = json.loads((out / 'stage1_scaling.json').read_text())
  assert saved == rows

  # A rerun measures nothing again.
  def must_not_run(*args):
    raise AssertionError(f'ran again: {args}')
  again = stage1_scaling.run_study(config, str(out), todo, num_train=32,
                                   run_fn=must_not_run)
  assert again == rows

  # The same name with another recipe is refused with a fix.
  with pytest.raises(app.UsageError, match='another stage-1 recipe.*Fix'):
    stage1_scaling.run_study(
        config, str(out), {'bottom16': {'model.downsample_factors': [8, 1]}},
        num_train=32, run_fn=must_not_run)

  table = stage1_scaling.format_table(rows)
  assert '| bottom16 | 4x4, 16x16 | 2 |' in table
  assert 'Real-vs-real floor (32 training images' in table


def test_changes_keep_a_tuple_field_a_tuple(stage2_config):
  from experiments import prior_scaling  # pylint: disable=g-import-not-at-top
  name, changes = prior_scaling.parse_set(
      'b:model.downsample_factors=[8,2],vqvae_train.num_train_steps=9000')
  config = prior_scaling.apply_changes(stage2_config, changes)
  assert name == 'b'
  assert config.model.downsample_factors == (8, 2)
  assert config.vqvae_train.num_train_steps == 9000
  assert stage2_config.model.downsample_factors == (8, 4)  # A copy changed.

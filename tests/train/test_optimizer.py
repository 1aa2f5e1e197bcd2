"""The optimizer's schedule and the settings key of a config section."""

import pytest

from vqvae2_jax.train import optimizer


def test_settings_key_is_hashable_sorted_and_typed(stage2_config):
  key = optimizer.settings_key(stage2_config.prior, optimizer.OPTIMIZER_FIELDS)
  assert [name for name, _ in key] == sorted(optimizer.OPTIMIZER_FIELDS)
  assert hash(key) == hash(optimizer.settings_key(
      stage2_config.prior.copy_and_resolve_references(),
      optimizer.OPTIMIZER_FIELDS))
  settings = dict(key)
  assert settings['warmup_steps'] == stage2_config.prior.warmup_steps
  assert isinstance(settings['learning_rate'], float)
  assert isinstance(settings['cosine_decay'], bool)
  # The keyword arguments of `create_optimizer`, as the trainers pass them.
  _, schedule = optimizer.create_optimizer(**settings)
  assert float(schedule(0)) == (
      0.0 if settings['warmup_steps'] else settings['learning_rate'])
  other = stage2_config.prior.copy_and_resolve_references()
  other.learning_rate = 2 * stage2_config.prior.learning_rate
  assert optimizer.settings_key(other, optimizer.OPTIMIZER_FIELDS) != key


def test_learning_rate_schedule():
  schedule = optimizer.create_learning_rate_schedule(
      learning_rate=1.0, warmup_steps=10, num_train_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)
  flat = optimizer.create_learning_rate_schedule(
      learning_rate=1.0, warmup_steps=10, num_train_steps=110,
      cosine_decay=False)
  assert float(flat(100)) == 1.0

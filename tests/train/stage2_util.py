"""Helpers of the stage-2 tests: a tiny config and a stage-1 checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from configs import tiny
from vqvae2_jax import checkpoints
from vqvae2_jax import parallel
from vqvae2_jax.train import common
from vqvae2_jax.train import vqvae_trainer


def tiny_stage2_config() -> ml_collections.ConfigDict:
  """configs/tiny.py on 96 training and 40 held-out images, shards of 32."""
  config = tiny.get_config()
  config.data.train_split = 'train[:96]'
  config.data.eval_split = 'test[:40]'
  config.vqvae_train.eval_batch_size = 16
  config.prior.codes_per_shard = 32
  config.prior.eval_batch_size = 16
  return config


_INITIAL_STATES = {}  # Model fingerprint -> initial stage-1 state.


def _initial_state(config):
  key = json.dumps(vqvae_trainer.model_fingerprint(config), sort_keys=True)
  if key not in _INITIAL_STATES:  # Compiling the init once saves seconds.
    model = vqvae_trainer.build_vqvae(config)
    tx, _ = vqvae_trainer.create_optimizer(config)
    size = config.data.image_size
    init_fn = vqvae_trainer.make_init_fn(model, tx,
                                         (size, size, config.data.channels))
    _INITIAL_STATES[key], _ = common.create_sharded_state(
        init_fn, parallel.create_mesh(config.mesh), jax.random.PRNGKey(0))
  return _INITIAL_STATES[key]


def save_vqvae_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                          seed: int = 0, step: int = 1) -> None:
  """Writes an untrained VQ-VAE as stage-1 checkpoint `step`.

  Different `seed`s give different weights (the initial params scaled by
  1 + seed / 20), so their codes carry different provenance.
  """
  state = _initial_state(config)
  params = jax.tree.map(lambda x: x * (1.0 + seed / 20.0), state.params)
  state = state.replace(step=jnp.asarray(step, jnp.int32), params=params)
  manager = checkpoints.create_manager(
      os.path.join(workdir, 'vqvae', 'checkpoints'), async_save=False)
  try:
    checkpoints.save(manager, step, state,
                     vqvae_trainer.model_fingerprint(config))
    manager.wait_until_finished()
  finally:
    manager.close()

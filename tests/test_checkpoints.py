"""orbax checkpoints: fingerprints, whole-state and variables-only restores."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax import checkpoints
from vqvae2_jax import parallel
from vqvae2_jax.train import optimizer
from vqvae2_jax.train import train_state


def test_fingerprint_error_names_fields_and_fix():
  with pytest.raises(ValueError) as e:
    checkpoints.check_fingerprint({'a': [8, 4], 'b': 1}, {'a': (8, 4), 'b': 2},
                                  '/ck')
  assert 'b: checkpoint 1, config 2' in str(e.value)
  assert 'a:' not in str(e.value)
  assert '--workdir' in str(e.value)
  checkpoints.check_fingerprint({'a': [8, 4]}, {'a': (8, 4)}, '/ck')
  with pytest.raises(ValueError, match='no config fingerprint.*Fix:'):
    checkpoints.check_fingerprint(None, {'a': 1}, '/ck')


def _state(clip: bool, polyak: bool) -> train_state.TrainState:
  """A small state whose optimizer state's structure depends on `clip`."""
  tx, _ = optimizer.create_optimizer(learning_rate=0.1, warmup_steps=0,
                                     num_train_steps=10,
                                     grad_clip_norm=1.0 if clip else 0.0)
  params = {'dense': {'kernel': jnp.arange(6.0).reshape(2, 3),
                      'bias': jnp.ones(3)}}
  extra = {'vq_stats': {'counts': jnp.full((4,), 2.0)}}
  state = train_state.TrainState(step=jnp.asarray(7, jnp.int32),
                                 params=params, opt_state=tx.init(params),
                                 extra=extra, rng=jax.random.PRNGKey(1))
  return state, (jax.tree.map(lambda x: -x, params) if polyak else None)


def _save(directory, state, polyak=None):
  # A dict mirrors a train state's fields (dataclass fields are dict keys
  # in the saved tree) and lets `polyak` be absent (None) or present.
  tree = {'step': state.step, 'params': state.params,
          'opt_state': state.opt_state, 'extra': state.extra,
          'rng': state.rng, 'polyak': polyak}
  manager = checkpoints.create_manager(str(directory), async_save=False)
  try:
    checkpoints.save(manager, 7, tree, {'model': 'm'})
    manager.wait_until_finished()
  finally:
    manager.close()


def _abstract(tree, mesh):
  abstract = jax.eval_shape(lambda: tree)
  return parallel.abstract_with_shardings(
      abstract, parallel.state_shardings(abstract, mesh))


@pytest.mark.parametrize('polyak', [False, True])
def test_restore_subtrees_reads_only_what_it_names(tmp_path, polyak):
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  saved, saved_polyak = _state(clip=True, polyak=polyak)
  _save(tmp_path, saved, saved_polyak)
  # Now without clipping: the full state would no longer match the saved one.
  current, _ = _state(clip=False, polyak=False)
  assert (jax.tree.structure(current.opt_state)
          != jax.tree.structure(saved.opt_state))
  manager = checkpoints.create_manager(str(tmp_path), read_only=True)
  try:
    step = checkpoints.latest_checked_step(manager, {'model': 'm'})
    assert step == 7
    with pytest.raises(ValueError, match='model: checkpoint'):
      checkpoints.latest_checked_step(manager, {'model': 'other'})
    structure = checkpoints.saved_structure(manager, step)
    assert {'step', 'params', 'opt_state', 'extra', 'rng'} <= set(structure)
    assert (structure['polyak'] is not None) == polyak
    target = {'params': _abstract(current.params, mesh),
              'extra': _abstract(current.extra, mesh)}
    if polyak:
      target['polyak'] = _abstract(current.params, mesh)
    restored = checkpoints.restore_subtrees(manager, step, target)
  finally:
    manager.close()
  assert sorted(restored) == sorted(target)
  want = {'params': saved.params, 'extra': saved.extra}
  if polyak:
    want['polyak'] = saved_polyak
  for name, tree in want.items():
    for got, expected in zip(jax.tree.leaves(restored[name]),
                             jax.tree.leaves(tree), strict=True):
      np.testing.assert_array_equal(got, expected)
  assert (restored['params']['dense']['kernel'].sharding
          == target['params']['dense']['kernel'].sharding)


def test_check_directory_refuses_other_fingerprint(tmp_path):
  checkpoints.check_directory(str(tmp_path / 'missing'), {'model': 'm'})
  saved, _ = _state(clip=False, polyak=False)
  _save(tmp_path, saved)
  checkpoints.check_directory(str(tmp_path), {'model': 'm'})
  with pytest.raises(ValueError, match="model: checkpoint 'm', config 'n'"):
    checkpoints.check_directory(str(tmp_path), {'model': 'n'})


def test_prune_keeps_the_newest(tmp_path):
  # A kill after a save and before orbax deleted the oldest step leaves more
  # than `keep_checkpoints`; a rerun prunes them.
  tree = {'w': jnp.ones(2)}
  with checkpoints.create_manager(str(tmp_path), max_to_keep=None,
                                  async_save=False) as manager:
    for step in (2, 4, 6):
      checkpoints.save(manager, step, tree, {'model': 'm'})
    checkpoints.prune(manager, None)  # Keeps all.
    assert sorted(manager.all_steps()) == [2, 4, 6]
    checkpoints.prune(manager, 2)
    assert sorted(manager.all_steps()) == [4, 6]


def test_reports_of_abandoned_reads_are_hidden_from_the_start(
    tmp_path, caplog):
  # asyncio may report a damaged step's abandoned reads while its failure
  # is still on the way to `restore_newest_intact` (a CI run saw one).
  # Those reports are hidden; a report about a step that read back, made
  # after the restore, is not.
  asyncio_logger = logging.getLogger('asyncio')
  with checkpoints.create_manager(str(tmp_path), max_to_keep=None,
                                  async_save=False) as manager:
    for step in (2, 4):
      checkpoints.save(manager, step, {'w': jnp.ones(2)}, {'model': 'm'})

    def restore(step):
      asyncio_logger.error('Task exception was never retrieved: reading '
                           '"%s/%d/state/d/x"', tmp_path, step)
      if step == 4:
        raise ValueError(f'OUT_OF_RANGE: {tmp_path}/4/state/d/x')
      return step

    with caplog.at_level(logging.WARNING):
      assert checkpoints.restore_newest_intact(
          manager, {'model': 'm'}, restore) == (2, 2)
      asyncio_logger.error('Task exception was never retrieved: reading '
                           '"%s/%d/state/d/y"', tmp_path, 4)
      asyncio_logger.error('Task exception was never retrieved: reading '
                           '"%s/%d/state/d/y"', tmp_path, 2)
  reports = [r.getMessage() for r in caplog.records if r.name == 'asyncio']
  assert reports == [f'Task exception was never retrieved: reading '
                     f'"{tmp_path}/2/state/d/y"']

"""The train state and its programs over a mesh (on test_common's toy stage)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.train import test_common as toy  # The toy stage of run_training.
from vqvae2_jax import parallel
from vqvae2_jax.train import train_state


def test_restore_target_is_abstract_with_shardings():
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  calls = []
  # pylint: disable-next=protected-access
  target = train_state.restore_target(toy._toy_programs(mesh, calls))
  assert calls == [True]  # Traced by `jax.eval_shape`, never run.
  assert isinstance(target.params['w'], jax.ShapeDtypeStruct)
  assert target.params['w'].shape == (2,)
  assert target.params['w'].sharding == parallel.replicated(mesh)


def test_state_bytes_are_the_initial_state_arrays():
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  programs = toy._toy_programs(mesh, [])  # pylint: disable=protected-access
  state = programs.init(jax.random.PRNGKey(0))
  assert train_state.state_bytes(programs) == sum(
      x.nbytes for x in jax.tree.leaves(state))

  class Broken:
    def init(self, rng):
      raise ValueError(rng)

  assert train_state.state_bytes(Broken()) is None  # Said without a figure.


def test_step_rng_is_fresh_each_step_and_fixed_by_the_step():
  state = train_state.TrainState(step=jnp.asarray(3, jnp.int32), params={},
                                 opt_state=(), extra={},
                                 rng=jax.random.PRNGKey(5))
  again = state.replace(step=jnp.asarray(3, jnp.int32))
  later = state.replace(step=jnp.asarray(4, jnp.int32))
  np.testing.assert_array_equal(state.step_rng(), again.step_rng())
  assert not np.array_equal(state.step_rng(), later.step_rng())
  assert state.variables() == {'params': {}}


def test_from_weights_places_given_weights_with_a_fresh_optimizer():
  mesh = parallel.create_mesh(devices=jax.devices())
  tx = optax.adam(0.1)

  def state_fn(params, extra, rng):
    return train_state.TrainState(step=jnp.zeros((), jnp.int32),
                                  params=params, opt_state=tx.init(params),
                                  extra=extra, rng=rng)

  def init_fn(rng):
    return state_fn({'w': jax.random.normal(rng, (8, 3))},
                    {'stats': {'n': jnp.zeros(2)}}, rng)

  _, shardings = train_state.sharded_init(init_fn, mesh,
                                          jax.random.PRNGKey(0))
  from_weights = train_state.jit_from_weights(state_fn, shardings)
  w = np.arange(24, dtype=np.float32).reshape(8, 3)
  n = np.asarray([2.0, 3.0], np.float32)
  state = from_weights({'params': {'w': w}, 'stats': {'n': n}},
                       jax.random.PRNGKey(7), 12)
  assert int(state.step) == 12
  np.testing.assert_array_equal(state.params['w'], w)
  np.testing.assert_array_equal(state.extra['stats']['n'], n)
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(7))
  fresh = tx.init({'w': jnp.asarray(w)})
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh)
  # Every array where the stage's programs expect it.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings),
                       strict=True):
    assert got.sharding == want

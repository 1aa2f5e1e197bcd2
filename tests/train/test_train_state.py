"""The train state and its programs over a mesh (on test_common's toy stage)."""

import jax
import jax.numpy as jnp
import numpy as np

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

"""The train state of every stage, and its programs over a mesh.

`TrainState` is what a step carries; `sharded_init` jits a stage's init so
that it writes the state straight into its shardings (`jax.eval_shape` ->
`parallel.state_shardings` -> `jax.jit(init, out_shardings=...)`);
`jit_train_step` jits a step over the mesh; `restore_target` is the abstract
state a checkpoint restores into. Nothing here knows which model it trains.
"""

from collections.abc import Callable
import math
from typing import Any, Protocol

import flax
import jax
from jax.sharding import Mesh
import numpy as np

from vqvae2_jax import parallel

PyTree = Any


# XLA:CPU compiler options for functions that run once (initialisation).
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


class TrainState(flax.struct.PyTreeNode):
  """Everything a stage's training carries from one step to the next.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: the 'params' collection.
    opt_state: the optax state of `params`.
    extra: other mutable variable collections, by name (e.g. the codebook
      statistics {'vq_stats': ...}); {} when the model has none.
    rng: uint32 [2] base key; a step's randomness is `fold_in(rng, step)`, so
      a resumed run draws the same numbers as an uninterrupted one.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  extra: dict[str, PyTree]
  rng: jax.Array

  def variables(self) -> dict[str, PyTree]:
    """The variables to pass to `Module.apply`: params and `extra`."""
    return {'params': self.params, **self.extra}

  def step_rng(self) -> jax.Array:
    """A key for this step only (fresh each step, reproducible on resume)."""
    return jax.random.fold_in(self.rng, self.step)


def jit_from_weights(state_fn: Callable[[PyTree, dict[str, PyTree], jax.Array],
                                        TrainState],
                     shardings: TrainState) -> Callable[..., TrainState]:
  """(variables, rng, step) -> a state holding `variables`' weights.

  `state_fn(params, extra, rng)` builds a stage's state around given weights
  (a fresh optimizer state, its Polyak average, ...), as its init does after
  `model.init`. The returned function places `variables` ({'params',
  **extra}, e.g. from an exported file, the same on every process) on the
  state's shardings and builds the rest there, at `step`: nothing random is
  drawn and no initializer runs (a paper-size prior's jitted random init
  compiled for about 75 s on an H200, docs/benchmarks.md, for weights that
  would be replaced).
  """
  build = jax.jit(state_fn, out_shardings=shardings,
                  compiler_options=fast_compile_options())

  def from_weights(variables: dict[str, PyTree], rng: jax.Array,
                   step: int) -> TrainState:
    variables = dict(variables)

    def place(new, sharding):
      host = (parallel.to_host(new) if isinstance(new, jax.Array)
              else np.asarray(new))
      return jax.device_put(host, sharding)

    params = jax.tree.map(place, variables.pop('params'), shardings.params)
    extra = jax.tree.map(place, variables, shardings.extra)
    state = build(params, extra, rng)
    return state.replace(step=jax.device_put(np.asarray(step, np.int32),
                                             shardings.step))

  return from_weights


def sharded_init(init_fn: Callable[..., PyTree], mesh: Mesh,
                 *example_args: Any) -> tuple[Callable[..., PyTree], PyTree]:
  """Jits `init_fn` so that it writes the state straight into its shardings.

  `jax.eval_shape` gives the state's shapes without computing anything, the
  shardings follow from the shapes, and the jitted `init_fn` then writes each
  array into its place on the mesh (no full copy on one device).

  Args:
    init_fn: (*args) -> state pytree; traced, so it must be pure.
    mesh: the mesh to lay the state out on.
    *example_args: arguments of `init_fn` (only their shapes are used).

  Returns:
    (jitted init_fn, shardings: a pytree like the state).
  """
  abstract_state = jax.eval_shape(init_fn, *example_args)
  shardings = parallel.state_shardings(abstract_state, mesh)
  # Runs once: LLVM's optimisations would cost more (~25 s for a small VQ-VAE
  # on XLA:CPU, mostly in the initializers' random-number code) than the
  # optimised program could ever save.
  return jax.jit(init_fn, out_shardings=shardings,
                 compiler_options=fast_compile_options()), shardings


def fast_compile_options() -> dict[str, Any] | None:
  """XLA options for functions that run rarely: compile fast, run slower."""
  return dict(_FAST_COMPILE) if jax.default_backend() == 'cpu' else None


def create_sharded_state(init_fn: Callable[..., PyTree], mesh: Mesh,
                         *init_args: Any) -> tuple[PyTree, PyTree]:
  """`sharded_init`, called: returns (state, shardings)."""
  init, shardings = sharded_init(init_fn, mesh, *init_args)
  return init(*init_args), shardings


def jit_train_step(step_fn: Callable[[PyTree, PyTree], tuple[PyTree, Any]],
                   shardings: PyTree, mesh: Mesh) -> Callable:
  """Jits `step_fn(state, batch) -> (state, metrics)` over `mesh`.

  The batch is split over the mesh's data axes, the state keeps its
  shardings and is donated (updated in place), and metrics come back
  replicated.
  """
  return jax.jit(
      step_fn,
      in_shardings=(shardings, parallel.data_sharding(mesh)),
      out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=(0,))


class TrainPrograms(Protocol):
  """What `run_training` needs of a stage's jitted programs."""
  init: Callable[[jax.Array], Any]  # (rng) -> the sharded initial state.
  shardings: Any  # NamedShardings, a pytree like the state.
  train_step: Callable[[Any, Any], tuple[Any, Any]]  # State donated.


def restore_target(programs: TrainPrograms) -> PyTree:
  """The abstract state of `programs.init`, carrying its shardings.

  `jax.eval_shape` only: nothing is computed or allocated, so a resumed run
  never builds an initial state it would throw away.
  """
  abstract = jax.eval_shape(programs.init, jax.random.PRNGKey(0))
  return parallel.abstract_with_shardings(abstract, programs.shardings)


def state_bytes(programs: TrainPrograms) -> int | None:
  """About the bytes of one checkpoint: the state's arrays (shapes only)."""
  try:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(restore_target(programs)))
  except Exception:  # pylint: disable=broad-except
    return None  # The message does without the figure.

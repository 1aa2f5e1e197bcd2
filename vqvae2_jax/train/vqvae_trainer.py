r"""Stage 1: trains the hierarchical VQ-VAE (--mode=vqvae).

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=vqvae

Writes to workdir/vqvae/: checkpoints/ (orbax), TensorBoard event files,
images/ (inputs, reconstructions and per-level views at each evaluation) and
metrics.json (the final evaluation). A rerun with the same workdir resumes
from the newest checkpoint and ends as an uninterrupted run would.
"""

from collections.abc import Callable, Iterator, Mapping
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from vqvae2_jax import builders
from vqvae2_jax import checkpoints
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import images as images_lib
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import layout
from vqvae2_jax.evaluation import reconstruction
from vqvae2_jax.models import vqvae as vqvae_lib
from vqvae2_jax.train import common
from vqvae2_jax.train import optimizer
from vqvae2_jax.train import step_metrics
from vqvae2_jax.train import train_state

_GRID_IMAGES = 16  # Columns of the evaluation image grid.


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and schedule of `config.vqvae_train`."""
  return optimizer.create_optimizer(**dict(_optimizer_settings(config)))


def _optimizer_settings(config: ml_collections.ConfigDict
                        ) -> tuple[tuple[str, Any], ...]:
  return optimizer.settings_key(config.vqvae_train, optimizer.OPTIMIZER_FIELDS)


def make_state_fn(tx: optax.GradientTransformation
                  ) -> Callable[..., train_state.TrainState]:
  """(params, extra, rng) -> the TrainState at step 0 around given weights:
  a fresh optimizer state, `rng` its base key."""

  def state_fn(params, extra, rng) -> train_state.TrainState:
    return train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params), extra=extra, rng=rng)

  return state_fn


def _split_init_key(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(params, codebook, state) keys of the init from `rng`."""
  params_rng, vq_rng, state_rng = jax.random.split(rng, 3)
  return params_rng, vq_rng, state_rng


def make_init_fn(model: vqvae_lib.VQVAE, tx: optax.GradientTransformation,
                 image_shape: tuple[int, int, int]
                 ) -> Callable[[jax.Array], train_state.TrainState]:
  """(rng) -> initial TrainState; `image_shape` is [h, w, c].

  The variables are `model.init`'s with the collections `loading.load_vqvae`
  expects: 'params', the rest (codebook statistics) in `extra`.
  """
  state_fn = make_state_fn(tx)

  def init_fn(rng: jax.Array) -> train_state.TrainState:
    params_rng, vq_rng, state_rng = _split_init_key(rng)
    variables = dict(model.init({'params': params_rng, 'vq': vq_rng},
                                jnp.zeros((1, *image_shape), jnp.float32),
                                train=False))
    params = variables.pop('params')
    return state_fn(params, variables, state_rng)

  return init_fn


def make_train_step(model: vqvae_lib.VQVAE, tx: optax.GradientTransformation,
                    schedule: optax.Schedule
                    ) -> Callable[[train_state.TrainState,
                                   Mapping[str, jax.Array]],
                                  tuple[train_state.TrainState,
                                        dict[str, Any]]]:
  """One optimizer step on a global batch; loss = MSE + quantizer losses.

  The step sees global arrays (jit over the mesh), so every mean and every
  codebook statistic is over the global batch whatever the device count.
  """

  def train_step(state, batch):
    images = batch['image']

    def loss_fn(params):
      (recon, aux), new_extra = model.apply(
          {'params': params, **state.extra}, images, train=True,
          rngs={'vq': state.step_rng()}, mutable=list(state.extra))
      mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
      return mse + aux['loss'], (mse, aux, new_extra)

    (loss, (mse, aux, new_extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, extra=dict(new_extra))

    metrics = {
        'loss': loss, 'mse': mse, 'psnr': reconstruction.psnr(mse),
        'quantizer_loss': aux['loss'], 'learning_rate': schedule(state.step),
        **step_metrics.norm_metrics(grads, params, updates),
    }
    for name in ('commitment_loss', 'codebook_loss', 'perplexity',
                 'used_fraction', 'restarted'):
      metrics.update(step_metrics.flatten_levels(name, aux[name]))
    return new_state, jax.tree.map(step_metrics.to_float32, metrics)

  return train_step


def make_eval_fns(model: vqvae_lib.VQVAE, variable_shardings: Any, mesh: Mesh,
                  area: tuple[int, int, int, int] | None = None
                  ) -> tuple[Callable, Callable]:
  """Jitted (variables, batch) -> sums, and (variables, batch) -> grid rows.

  `area`: the dataset's original image inside the canvas
  (`layout.original_area`), also scored on its own; None: no area.
  """
  num_embeddings = model.num_embeddings
  num_levels = len(model.downsample_factors)

  def eval_sums(variables, batch):
    recon, aux = model.apply(variables, batch['image'], train=False)
    return reconstruction.batch_sums(batch['image'], recon, aux['codes'],
                                     batch['mask'], num_embeddings, area)

  def grid_rows(variables, batch):
    images = batch['image'][:_GRID_IMAGES]
    codes = model.apply(variables, images, method=model.encode)
    rows = [images, model.apply(variables, codes, method=model.decode_codes)]
    if num_levels > 1:  # What each level alone carries.
      rows += [model.apply(variables, codes, keep=(i,),
                           method=model.decode_levels)
               for i in range(num_levels)]
    return jnp.concatenate([r.astype(jnp.float32) for r in rows])

  in_shardings = (variable_shardings, parallel.data_sharding(mesh))
  out = parallel.replicated(mesh)
  return (jax.jit(eval_sums, in_shardings=in_shardings, out_shardings=out),
          # Runs once per evaluation on a few images: compile it quickly.
          jax.jit(grid_rows, in_shardings=in_shardings, out_shardings=out,
                  compiler_options=train_state.fast_compile_options()))


def evaluate(eval_sums: Callable, grid_rows: Callable | None,
             variables: Any, batches: Iterator[Mapping[str, jax.Array]]
             ) -> tuple[dict[str, float], np.ndarray | None]:
  """Reconstruction metrics over every batch of `batches` (one whole split).

  Returns:
    (metrics from `reconstruction.summarize`, the grid images
    [rows * n, h, w, c] from the first batch or None).
  """
  total, grid = None, None
  for batch in batches:
    if grid is None and grid_rows is not None:
      grid = np.asarray(jax.device_get(grid_rows(variables, batch)))
    total = reconstruction.add_sums(total, eval_sums(variables, batch))
  if total is None:
    raise ValueError('The evaluation split yielded no batches.')
  return reconstruction.summarize(total), grid


class Programs(NamedTuple):
  """A VQ-VAE's jitted functions on one mesh.

  Built once per process for each (model, optimizer settings, image shape,
  mesh), so that a rerun in the same process (a notebook, a resumed test)
  compiles nothing again.
  """
  model: vqvae_lib.VQVAE
  schedule: optax.Schedule
  shardings: train_state.TrainState  # NamedShardings of the train state.
  # (rng) -> the sharded state.
  init: Callable[[jax.Array], train_state.TrainState]
  # (variables, rng, step) -> the sharded state around given weights, with
  # no random init (`train_state.jit_from_weights`).
  from_weights: Callable[..., train_state.TrainState]
  train_step: Callable  # (state, batch) -> (state, metrics); state donated.
  eval_sums: Callable  # (variables, batch) -> reconstruction sums.
  grid_rows: Callable  # (variables, batch) -> image rows for the grid.


def programs(config: ml_collections.ConfigDict, mesh: Mesh) -> Programs:
  """The jitted functions that `config` needs on `mesh` (cached)."""
  return _programs(builders.build_vqvae(config), _optimizer_settings(config),
                   builders.image_shape(config), mesh,
                   layout.original_area(config.data))


@functools.lru_cache(maxsize=8)
def _programs(model: vqvae_lib.VQVAE,
              optimizer_settings: tuple[tuple[str, Any], ...],
              image_shape: tuple[int, int, int], mesh: Mesh,
              area: tuple[int, int, int, int] | None = None) -> Programs:
  tx, schedule = optimizer.create_optimizer(**dict(optimizer_settings))
  init, shardings = train_state.sharded_init(
      make_init_fn(model, tx, image_shape), mesh, jax.random.PRNGKey(0))
  train_step = train_state.jit_train_step(
      make_train_step(model, tx, schedule), shardings, mesh)
  eval_sums, grid_rows = make_eval_fns(
      model, {'params': shardings.params, **shardings.extra}, mesh, area)
  from_weights = train_state.jit_from_weights(make_state_fn(tx), shardings)
  return Programs(model, schedule, shardings, init, from_weights, train_step,
                  eval_sums, grid_rows)


def _start_from_export(config: ml_collections.ConfigDict, progs: Programs,
                       mesh: Mesh, directory: str,
                       fingerprint: Mapping[str, Any]) -> None:
  """Writes the VQ-VAE of config.vqvae_train.from_export as this stage's
  checkpoint, unless the stage has one already (a rerun resumes from it).

  The file's weights and codebook statistics at its step, with a fresh
  optimizer state: trained to the file's step, the stage is finished (it
  is evaluated, and codes and priors follow as after training); more steps
  train on from those weights.

  Raises:
    errors.ConfigError: the file holds a VQ-VAE of another model config.
  """
  ckpt_dir = workdir_lib.checkpoint_dir(directory)
  if checkpoints.has_checkpoint(ckpt_dir):
    return
  # Here, not at the top: nothing in train/ needs the API otherwise.
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  source = config.vqvae_train.from_export
  pipe = api.Pipeline.load(source, mesh=mesh, priors=False)
  differ = checkpoints.fingerprint_differences(
      builders.vqvae_fingerprint(pipe.config), fingerprint, 'file', 'here')
  if differ:
    raise errors.ConfigError(
        f'config.vqvae_train.from_export: {source} holds a VQ-VAE of another '
        f'model config than --config ({"; ".join(differ.values())}). Fix: '
        'pass the config it was trained with (its config is inside: '
        f'vqvae2_jax.Pipeline.load({source!r}).config), or leave '
        'from_export empty to train stage 1.')
  step = int(pipe.steps.get('vqvae', 0))
  # The state key the init of config.seed would give; the file's weights.
  state = progs.from_weights(
      pipe.vqvae_variables,
      _split_init_key(jax.random.PRNGKey(config.seed))[2], step)
  checkpoints.save_now(ckpt_dir, step, state, fingerprint)
  console.say('VQ-VAE: stage 1 from %s (its step %d; the optimizer starts '
              'afresh if training goes on)', source, step)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains the VQ-VAE, resuming from workdir/vqvae if it holds checkpoints.

  Args:
    config: a validated config from configs/ (fields under data, model,
      vqvae_train, mesh, seed).
    workdir: the run's directory; this stage writes under workdir/vqvae/.

  Returns:
    The final metrics (also in workdir/vqvae/metrics.json, see
    `common.run_training`): 'eval/...' over the whole eval split,
    'train/...' of the last log interval, 'step', 'wall_time_s',
    'steps_per_sec' and 'eval_time_s'.
  """
  # Here, not at the top: it needs TensorFlow, and the module must import
  # without it (accelerator images).
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  train_cfg = config.vqvae_train
  wd = workdir_lib.Workdir(workdir)
  out_dir = wd.vqvae
  fingerprint = builders.vqvae_fingerprint(config)
  # A wrong --workdir fails here, before anything is built or compiled.
  checkpoints.check_directory(workdir_lib.checkpoint_dir(out_dir),
                              fingerprint)
  mesh = parallel.create_mesh(config.mesh)
  progs = programs(config, mesh)
  if train_cfg.from_export:
    _start_from_export(config, progs, mesh, out_dir, fingerprint)

  def train_iterator(start_step):
    return input_pipeline.create_train_iterator(
        config.data, global_batch_size=train_cfg.batch_size, mesh=mesh,
        seed=config.seed, start_step=start_step)

  def run_eval(step, state, is_last):
    del is_last  # Stage 1 evaluates the same way every time.
    eval_iter = input_pipeline.create_eval_iterator(
        config.data, global_batch_size=train_cfg.eval_batch_size, mesh=mesh)
    metrics, grid = evaluate(progs.eval_sums, progs.grid_rows,
                             state.variables(), eval_iter)
    num_cols = min(_GRID_IMAGES, grid.shape[0])
    images_lib.write_image_grid(
        os.path.join(wd.vqvae_images, f'recon_{step:07d}.png'), grid,
        num_cols=num_cols)
    # Rows: inputs, reconstructions, then each level alone (top first).
    return {**step_metrics.scalars(metrics, 'eval'),
            'images/reconstructions': images_lib.image_grid(grid, num_cols)}

  return common.run_training(common.Stage(
      name='VQ-VAE', directory=out_dir, batch_size=train_cfg.batch_size,
      fingerprint=fingerprint, programs=progs,
      init_rng=jax.random.PRNGKey(config.seed),
      cadence=common.Cadence.from_config(train_cfg),
      train_iterator=train_iterator, evaluate=run_eval,
      nan_fix='lower --config.vqvae_train.learning_rate or grad_clip_norm',
      sum_prefixes=('restarted',)))

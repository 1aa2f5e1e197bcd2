r"""Stage 2: trains the gated PixelCNN prior of every level (--mode=prior).

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=prior

Reads the codes that --mode=codes wrote to workdir/codes/ (refusing codes of
another VQ-VAE than the one in workdir/vqvae/) and trains each level's prior,
top first, or only `--config.prior.level=<i>`. Level i writes
workdir/prior_<i>/: checkpoints/ (orbax), TensorBoard event files and
metrics.json. A rerun resumes each level from its newest checkpoint (params,
Polyak weights, optimizer, RNG and data position) and ends as an
uninterrupted run would.
"""

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from vqvae2_jax import checkpoints
from vqvae2_jax import parallel
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.evaluation import likelihood
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.train import common
from vqvae2_jax.train import extract

PyTree = Any
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Fields of config.prior.level_<i> that define the prior's variables.
_LEVEL_FIELDS = ('num_channels', 'num_layers', 'filter_size',
                 'attention_layers', 'num_heads', 'cond_stack_blocks',
                 'num_output_layers')
# Examples of the training split whose code frequencies define the unigram
# baseline (enough for stable frequencies, cheap to read).
_UNIGRAM_EXAMPLES = 50_000


class PriorTrainState(common.TrainState):
  """`common.TrainState` plus the Polyak (EMA) average of the params.

  Attributes:
    polyak: a pytree like `params`, or None when config.prior.polyak_decay is
      0. Evaluation (and sampling) use it in place of `params`.
  """
  polyak: PyTree

  def eval_params(self) -> PyTree:
    return self.params if self.polyak is None else self.polyak


def stage_dir(workdir: str, level: int) -> str:
  return os.path.join(os.path.abspath(workdir), f'prior_{level}')


def levels_to_train(config: ml_collections.ConfigDict) -> list[int]:
  """config.prior.level, or every level top first when it is -1."""
  n = len(config.model.downsample_factors)
  level = int(config.prior.level)
  if not -1 <= level < n:
    raise ValueError(f'config.prior.level: {level} for a {n}-level model. '
                     f'Fix: use -1 (all levels) or 0..{n - 1}.')
  return list(range(n)) if level < 0 else [level]


def build_prior(config: ml_collections.ConfigDict,
                level: int) -> pixelcnn.PixelCNNPrior:
  """The prior of level `level` (0 = top) that `config` describes.

  K comes from config.model.num_embeddings (every level's codebook), the
  labels from config.data.num_classes, the model from config.prior.level_<i>;
  a lower level is conditioned on the codes of every level above it.
  """
  c = config.prior[f'level_{level}']
  k = int(config.model.num_embeddings)
  dtype = config.prior.get('dtype', 'float32')
  if dtype not in _DTYPES:
    raise ValueError(f'config.prior.dtype: {dtype!r} is not one of '
                     f'{tuple(_DTYPES)}.')
  return pixelcnn.PixelCNNPrior(
      num_embeddings=k,
      num_channels=c.num_channels,
      num_layers=c.num_layers,
      filter_size=c.filter_size,
      dropout_rate=c.dropout_rate,
      attention_layers=c.attention_layers,
      num_heads=c.num_heads,
      num_classes=int(config.data.num_classes),
      cond_num_embeddings=(k,) * level,
      cond_stack_blocks=c.cond_stack_blocks if level else 0,
      num_output_layers=c.num_output_layers,
      dtype=_DTYPES[dtype])


def prior_fingerprint(config: ml_collections.ConfigDict, level: int,
                      level_shapes: Sequence[Sequence[int]],
                      vqvae: Mapping[str, Any]) -> dict[str, Any]:
  """What a level's checkpoint must agree on: model fields and its codes."""
  c = config.prior[f'level_{level}']
  return {
      'level': level,
      'level_shapes': [list(s) for s in level_shapes[:level + 1]],
      'model.num_embeddings': int(config.model.num_embeddings),
      'data.num_classes': int(config.data.num_classes),
      'prior.dtype': config.prior.get('dtype', 'float32'),
      **{f'prior.level_{level}.{f}': c[f] for f in _LEVEL_FIELDS},
      'codes.vqvae_step': int(vqvae['step']),
      'codes.vqvae_digest': vqvae['digest'],
  }


def _optimizer_args(config: ml_collections.ConfigDict
                    ) -> tuple[tuple[str, Any], ...]:
  p = config.prior
  return (('learning_rate', float(p.learning_rate)),
          ('warmup_steps', int(p.warmup_steps)),
          ('num_train_steps', int(p.num_train_steps)),
          ('cosine_decay', bool(p.get('cosine_decay', True))),
          ('grad_clip_norm', float(p.get('grad_clip_norm', 0.0))))


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam on a warm-up/cosine schedule with clipping, from config.prior."""
  return common.create_optimizer(**dict(_optimizer_args(config)))


def _dummy_inputs(level: int, level_shapes: Sequence[Sequence[int]],
                  num_classes: int) -> tuple:
  codes = jnp.zeros((1, *level_shapes[level]), jnp.int32)
  cond = tuple(jnp.zeros((1, *s), jnp.int32) for s in level_shapes[:level])
  labels = jnp.zeros((1,), jnp.int32) if num_classes else None
  return codes, cond, labels


def make_init_fn(model: pixelcnn.PixelCNNPrior,
                 tx: optax.GradientTransformation, *, level: int,
                 level_shapes: Sequence[Sequence[int]], use_polyak: bool
                 ) -> Callable[[jax.Array], PriorTrainState]:
  """(rng) -> initial PriorTrainState of level `level`'s prior."""

  def init_fn(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    codes, cond, labels = _dummy_inputs(level, level_shapes, model.num_classes)
    variables = dict(model.init({'params': params_rng, 'dropout': dropout_rng},
                                codes, cond_codes=cond, labels=labels,
                                train=False))
    params = variables.pop('params')
    return PriorTrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params), extra=variables, rng=state_rng,
        polyak=params if use_polyak else None)

  return init_fn


def polyak_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay after `step` updates: min(decay, (1 + step) / (10 + step)).

  The ramp keeps the average from being dominated by the initial weights in
  short runs (0.999 ** 2000 is still 0.14).
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def drop_labels(labels: jax.Array, rng: jax.Array, rate: float,
                num_classes: int) -> jax.Array:
  """Replaces each label by the "no label" index `num_classes` w.p. `rate`."""
  if rate <= 0:
    return labels
  drop = jax.random.bernoulli(rng, rate, labels.shape)
  return jnp.where(drop, num_classes, labels)


def make_train_step(model: pixelcnn.PixelCNNPrior,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, label_drop_rate: float, polyak_decay: float
                    ) -> Callable[[PriorTrainState, Mapping[str, Any]],
                                  tuple[PriorTrainState, dict[str, Any]]]:
  """One optimizer step of cross-entropy on a global batch of codes.

  The batch holds the codes of the trained level last in 'codes' (the levels
  above it first, as conditioning) and 'label'. Randomness (label dropout,
  dropout) comes from `state.step_rng()`, so it is the same on any mesh and
  after a resume.
  """
  num_classes = model.num_classes

  def train_step(state, batch):
    *cond, target = batch['codes']
    label_rng, dropout_rng = jax.random.split(state.step_rng())
    labels = None
    if num_classes:
      labels = drop_labels(batch['label'], label_rng, label_drop_rate,
                           num_classes)

    def loss_fn(params):
      logits = model.apply({'params': params, **state.extra}, target,
                           cond_codes=tuple(cond), labels=labels, train=True,
                           rngs={'dropout': dropout_rng})
      sums = likelihood.batch_sums(logits, target)
      return sums['nll'] / sums['num_codes'], sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    polyak = state.polyak
    if polyak is not None:
      decay = polyak_decay_at(polyak_decay, state.step + 1)
      polyak = jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p,
                            polyak, params)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, polyak=polyak)
    metrics = {
        'loss': loss, 'bits_per_code': loss / math.log(2.0),
        'accuracy': sums['correct'] / sums['num_codes'],
        'learning_rate': schedule(state.step),
        **common.norm_metrics(grads, params, updates),
    }
    return new_state, jax.tree.map(common.to_float32, metrics)

  return train_step


def make_eval_fn(model: pixelcnn.PixelCNNPrior, param_shardings: PyTree,
                 mesh: Mesh, *, use_labels: bool) -> Callable:
  """Jitted (params, batch) -> `likelihood.batch_sums` of one batch.

  use_labels: condition on the batch's labels; False scores the
  unconditional path ("no label" everywhere).
  """

  def eval_sums(params, batch):
    *cond, target = batch['codes']
    labels = None
    if model.num_classes:
      labels = batch['label'] if use_labels else jnp.full_like(
          batch['label'], model.num_classes)
    logits = model.apply({'params': params}, target, cond_codes=tuple(cond),
                         labels=labels, train=False)
    return likelihood.batch_sums(logits, target, batch['mask'])

  return jax.jit(eval_sums,
                 in_shardings=(param_shardings, parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=4)
def _jitted_functions(model: pixelcnn.PixelCNNPrior,
                      optimizer_args: tuple[tuple[str, Any], ...], *,
                      level: int, level_shapes: tuple[tuple[int, ...], ...],
                      label_drop_rate: float, polyak_decay: float, mesh: Mesh
                      ) -> tuple[Callable, PyTree, Callable, dict]:
  """The jitted init, state shardings, train step and eval functions.

  Cached, so that training the same prior again in this process (a resume
  from a notebook, the tests) reuses the compiled functions.
  """
  tx, schedule = common.create_optimizer(**dict(optimizer_args))
  init_fn = make_init_fn(model, tx, level=level, level_shapes=level_shapes,
                         use_polyak=polyak_decay > 0)
  init, shardings = common.sharded_init(init_fn, mesh, jax.random.PRNGKey(0))
  train_step = common.jit_train_step(
      make_train_step(model, tx, schedule, label_drop_rate=label_drop_rate,
                      polyak_decay=polyak_decay), shardings, mesh)
  eval_fns = {
      'cond': make_eval_fn(model, shardings.params, mesh, use_labels=True),
      'uncond': make_eval_fn(model, shardings.params, mesh, use_labels=False)}
  return init, shardings, train_step, eval_fns


def evaluate(eval_fn: Callable, params: PyTree,
             batches: Iterator[Mapping[str, Any]]) -> dict[str, float]:
  """Bits per code, NLL and accuracy over every batch of `batches`."""
  total = None
  for batch in batches:
    total = likelihood.add_sums(total, eval_fn(params, batch))
  if total is None:
    raise ValueError('The evaluation split yielded no batches.')
  return likelihood.summarize(total)


def baselines(dataset: codes_lib.CodeDataset, level: int) -> dict[str, float]:
  """Context-free baselines of a level on the held-out codes."""
  train, held_out = dataset.split('train'), dataset.split('eval')
  n = min(train.num_examples, _UNIGRAM_EXAMPLES)
  train_codes = train.read(np.arange(n), (level,))['codes'][0]
  eval_codes = held_out.read(np.arange(held_out.num_examples),
                             (level,))['codes'][0]
  k = dataset.num_embeddings[level]
  return {'uniform_bits_per_code': likelihood.uniform_bits(k),
          **likelihood.unigram_bits(train_codes, eval_codes, k)}


def _check_codes_provenance(ckpt_dir: str, fingerprint: Mapping[str, Any]
                            ) -> None:
  """A clearer error than a fingerprint diff when the codes changed."""
  if not os.path.isdir(ckpt_dir):
    return
  manager = checkpoints.create_manager(ckpt_dir, read_only=True)
  try:
    step = manager.latest_step()
    saved = None if step is None else checkpoints.restore_fingerprint(
        manager, step)
  finally:
    manager.close()
  if not saved:
    return
  keys = ('codes.vqvae_step', 'codes.vqvae_digest')
  if any(saved.get(k) != fingerprint[k] for k in keys):
    raise ValueError(
        f'The prior checkpoints in {ckpt_dir} were trained on codes of VQ-VAE '
        f'step {saved.get("codes.vqvae_step")}, but workdir/codes now holds '
        f'codes of VQ-VAE step {fingerprint["codes.vqvae_step"]} (or other '
        f'weights). Fix: delete {os.path.dirname(ckpt_dir)} to train this '
        'prior on the new codes, or use another --workdir.')


def train_level(config: ml_collections.ConfigDict, workdir: str, level: int,
                dataset: codes_lib.CodeDataset, vqvae: Mapping[str, Any],
                mesh: Mesh) -> dict[str, Any]:
  """Trains (or resumes) the prior of one level; returns its final metrics.

  Args:
    config: the run's config.
    workdir: the run's directory; writes workdir/prior_<level>/.
    level: 0 = top.
    dataset: the provenance-checked codes.
    vqvae: provenance of the current VQ-VAE (stored in the fingerprint).
    mesh: the device mesh.

  Returns:
    'eval/...' (held-out split, whole; with the Polyak weights when used,
    plus 'eval/bits_per_code_uncond' without labels and
    'eval/bits_per_code_raw' with the raw params), 'eval_train/...' (the
    first training examples, as many as held out up to 4096), 'train/...'
    (last log interval, train mode), 'baseline/...' (uniform and unigram),
    'step', 'num_params', 'steps_per_sec' and 'codes_per_sec' (training
    alone), 'eval_time_s', 'wall_time_s'.
  """
  start_time = time.time()
  p = config.prior
  out_dir = stage_dir(workdir, level)
  ckpt_dir = os.path.join(out_dir, 'checkpoints')
  fingerprint = prior_fingerprint(config, level, dataset.level_shapes, vqvae)
  _check_codes_provenance(ckpt_dir, fingerprint)
  checkpoints.check_directory(ckpt_dir, fingerprint)

  model = build_prior(config, level)
  init, shardings, train_step, eval_fns = _jitted_functions(
      model, _optimizer_args(config), level=level,
      level_shapes=tuple(tuple(s) for s in dataset.level_shapes),
      label_drop_rate=float(p.label_drop_rate),
      polyak_decay=float(p.polyak_decay), mesh=mesh)
  # Each level its own parameter seed; the data order is shared.
  state = init(jax.random.fold_in(jax.random.PRNGKey(config.seed), level))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))

  manager = checkpoints.create_manager(ckpt_dir,
                                       max_to_keep=p.keep_checkpoints)
  writer = common.create_writer(out_dir)
  try:
    # Resume order: state (params, Polyak weights, optimizer, RNG) from the
    # newest checkpoint, then the data stream positioned at its step.
    restored = checkpoints.restore_latest(
        manager, common.abstract_with_shardings(state, shardings), fingerprint)
    if restored is not None:
      state = restored
    start_step, num_steps = int(state.step), int(p.num_train_steps)
    logging.info('Prior level %d (%d params): %d steps (from step %d) on '
                 'mesh %s', level, num_params, num_steps, start_step,
                 dict(mesh.shape))
    if start_step == 0:
      writer.write_hparams({k: str(v) for k, v in fingerprint.items()})

    levels = tuple(range(level + 1))
    train_split, eval_split = dataset.split('train'), dataset.split('eval')
    train_iter = codes_lib.create_train_iterator(
        train_split, global_batch_size=p.batch_size, mesh=mesh,
        seed=config.seed, levels=levels, start_step=start_step)
    # Training examples scored in eval mode (config.prior.train_eval_examples,
    # 0 = all): a few thousand show overfitting at a fraction of the cost.
    train_eval_limit = (min(p.train_eval_examples, train_split.num_examples)
                        if p.train_eval_examples else None)

    def run_eval(step, state, final):
      def batches(split, limit=None):
        return codes_lib.create_eval_iterator(
            split, global_batch_size=p.eval_batch_size, mesh=mesh,
            levels=levels, num_examples=limit)
      params = state.eval_params()
      results = {'eval': evaluate(eval_fns['cond'], params,
                                  batches(eval_split)),
                 'eval_train': evaluate(eval_fns['cond'], params, batches(
                     train_split, train_eval_limit))}
      if final and model.num_classes:
        results['eval']['bits_per_code_uncond'] = evaluate(
            eval_fns['uncond'], params, batches(eval_split))['bits_per_code']
      if final and state.polyak is not None:
        results['eval']['bits_per_code_raw'] = evaluate(
            eval_fns['cond'], state.params,
            batches(eval_split))['bits_per_code']
      flat = {}
      for prefix, metrics in results.items():
        flat.update(common.scalars(metrics, prefix))
      writer.write_scalars(step, flat)
      logging.info('Prior level %d step %d: held-out %.4f bits/code, train '
                   '%.4f bits/code', level, step,
                   flat['eval/bits_per_code'], flat['eval_train/bits_per_code'])
      return flat

    loop = common.train_loop(
        state=state, train_step=train_step, train_iter=train_iter,
        start_step=start_step, num_steps=num_steps, log_every=p.log_every,
        eval_every=p.eval_every, checkpoint_every=p.checkpoint_every,
        run_eval=run_eval, manager=manager, fingerprint=fingerprint,
        writer=writer, pending=common.StepMetrics(),
        nan_fix='lower prior.learning_rate or grad_clip_norm')
    state, eval_metrics = loop.state, loop.eval_metrics
    if eval_metrics is None:  # Nothing left to train: evaluate what we have.
      eval_metrics = run_eval(start_step, state, final=True)
    codes_per_example = math.prod(dataset.level_shapes[level])
    steps_per_sec = loop.steps_per_sec
    final = {
        'level': level, 'step': int(state.step), 'num_params': num_params,
        'steps_per_sec': steps_per_sec,
        'codes_per_sec': steps_per_sec * p.batch_size * codes_per_example,
        'eval_time_s': loop.eval_seconds,
        'wall_time_s': time.time() - start_time,
        **eval_metrics, **common.scalars(loop.train_summary, 'train'),
        **common.scalars(baselines(dataset, level), 'baseline')}
    common.write_json(os.path.join(out_dir, 'metrics.json'), final)
    logging.info('Prior level %d final metrics: %s', level, final)
    return final
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()


def train_priors(config: ml_collections.ConfigDict,
                 workdir: str) -> dict[str, Any]:
  """Trains every level's prior top first (or config.prior.level only).

  Args:
    config: the run's config (data, model, prior, mesh, seed).
    workdir: holds vqvae/ (stage 1) and codes/ (--mode=codes).

  Returns:
    {'level_<i>': final metrics of level i} for the levels trained.

  Raises:
    FileNotFoundError: no stage-1 checkpoint or no complete extraction.
    codes_lib.CodesMismatchError: the codes come from another VQ-VAE.
  """
  levels = levels_to_train(config)
  mesh = parallel.create_mesh(config.mesh)
  vqvae = extract.current_vqvae_provenance(config, workdir, mesh)
  dataset = codes_lib.CodeDataset(extract.codes_dir(workdir), vqvae=vqvae)
  return {f'level_{level}': train_level(config, workdir, level, dataset,
                                        vqvae, mesh)
          for level in levels}


def load_prior(config: ml_collections.ConfigDict, workdir: str, level: int, *,
               vqvae: Mapping[str, Any], mesh: Mesh | None = None,
               use_polyak: bool = True
               ) -> tuple[pixelcnn.PixelCNNPrior, dict[str, PyTree], int]:
  """Loads the newest checkpoint of level `level`'s prior for sampling.

  Args:
    config: the config that trained it (the fingerprint must match).
    workdir: the run's workdir (reads workdir/prior_<level>/checkpoints).
    level: 0 = top.
    vqvae: provenance of the current VQ-VAE (`extract.vqvae_provenance`); a
      prior trained on another VQ-VAE's codes is refused.
    mesh: where to place the parameters; default: all devices.
    use_polyak: return the Polyak weights when the checkpoint has them.

  Returns:
    (model, variables {'params': ...}, step).

  Raises:
    FileNotFoundError: no checkpoint of this level's prior.
    ValueError: written for another config or another VQ-VAE's codes.
  """
  mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
  ckpt_dir = os.path.join(stage_dir(workdir, level), 'checkpoints')
  level_shapes = tuple((config.data.image_size // f,) * 2
                       for f in config.model.downsample_factors)
  fingerprint = prior_fingerprint(config, level, level_shapes, vqvae)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f'No prior checkpoint for level {level} in {ckpt_dir}. Fix: train the '
        'priors first with --mode=prior and the same --workdir.')
  _check_codes_provenance(ckpt_dir, fingerprint)
  model = build_prior(config, level)
  init, shardings, _, _ = _jitted_functions(
      model, _optimizer_args(config), level=level, level_shapes=level_shapes,
      label_drop_rate=float(config.prior.label_drop_rate),
      polyak_decay=float(config.prior.polyak_decay), mesh=mesh)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  manager = checkpoints.create_manager(ckpt_dir, read_only=True)
  try:
    state = checkpoints.restore_latest(
        manager, common.abstract_with_shardings(abstract, shardings),
        fingerprint)
  finally:
    manager.close()
  if state is None:
    raise FileNotFoundError(
        f'No prior checkpoint for level {level} in {ckpt_dir}. Fix: train the '
        'priors first with --mode=prior and the same --workdir.')
  params = state.eval_params() if use_polyak else state.params
  return model, {'params': params}, int(state.step)

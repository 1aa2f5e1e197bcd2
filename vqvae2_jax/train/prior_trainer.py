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

from collections.abc import Callable, Iterator, Mapping, Sequence
import functools
import math
from typing import Any, NamedTuple, Optional

from absl import logging
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
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import code_iterators
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.evaluation import likelihood
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.train import common
from vqvae2_jax.train import optimizer
from vqvae2_jax.train import step_metrics
from vqvae2_jax.train import train_state

PyTree = Any
# Examples of the training split whose code frequencies define the unigram
# baseline (enough for stable frequencies, cheap to read).
_UNIGRAM_EXAMPLES = 50_000


class PriorTrainState(train_state.TrainState):
  """`train_state.TrainState` plus the Polyak (EMA) average of the params.

  Attributes:
    polyak: a pytree like `params`, or None when config.prior.polyak_decay is
      0. Evaluation (and sampling) use it in place of `params`.
  """
  polyak: PyTree

  def eval_params(self) -> PyTree:
    return self.params if self.polyak is None else self.polyak


def levels_to_train(config: ml_collections.ConfigDict) -> list[int]:
  """config.prior.level, or every level top first when it is -1."""
  level = int(config.prior.level)
  return list(range(builders.num_levels(config))) if level < 0 else [level]


def _optimizer_args(config: ml_collections.ConfigDict
                    ) -> tuple[tuple[str, Any], ...]:
  return optimizer.settings_key(config.prior, optimizer.OPTIMIZER_FIELDS)


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam on a warm-up/cosine schedule with clipping, from config.prior."""
  return optimizer.create_optimizer(**dict(_optimizer_args(config)))


def make_state_fn(tx: optax.GradientTransformation, *, use_polyak: bool
                  ) -> Callable[..., PriorTrainState]:
  """(params, extra, rng) -> the PriorTrainState at step 0 around given
  weights: a fresh optimizer state, the Polyak average (when kept) equal to
  `params`, `rng` its base key."""

  def state_fn(params, extra, rng) -> PriorTrainState:
    return PriorTrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params), extra=extra, rng=rng,
        polyak=params if use_polyak else None)

  return state_fn


def _split_init_key(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(params, dropout, state) keys of the init from `rng`."""
  params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  return params_rng, dropout_rng, state_rng


def make_init_fn(model: pixelcnn.PixelCNNPrior,
                 tx: optax.GradientTransformation, *, level: int,
                 level_shapes: Sequence[Sequence[int]], use_polyak: bool
                 ) -> Callable[[jax.Array], PriorTrainState]:
  """(rng) -> initial PriorTrainState of level `level`'s prior.

  `level_shapes`: (h, w) of every level, top first. The state's 'params'
  and 'polyak' fields are what `loading.load_prior` reads.
  """
  state_fn = make_state_fn(tx, use_polyak=use_polyak)

  def init_fn(rng):
    params_rng, dropout_rng, state_rng = _split_init_key(rng)
    codes, cond, labels = builders.prior_init_inputs(level, level_shapes,
                                                     model.num_classes)
    variables = dict(model.init({'params': params_rng, 'dropout': dropout_rng},
                                codes, cond_codes=cond, labels=labels,
                                train=False))
    params = variables.pop('params')
    return state_fn(params, variables, state_rng)

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
                    *, label_drop_rate: float, polyak_decay: float,
                    code_weights: Sequence[float] | None = None
                    ) -> Callable[[PriorTrainState, Mapping[str, Any]],
                                  tuple[PriorTrainState, dict[str, Any]]]:
  """One optimizer step of cross-entropy on a global batch of codes.

  The batch holds the codes of the trained level last in 'codes' (the levels
  above it first, as conditioning) and 'label'. Randomness (label dropout,
  dropout) comes from `state.step_rng()`, so it is the same on any mesh and
  after a resume. With `code_weights` ([K], `likelihood.code_weight_table`)
  each code's cross-entropy is weighed by its target's weight: 'loss' is
  the weighted mean, 'bits_per_code' stays the plain one.
  """
  num_classes = model.num_classes
  if code_weights is not None:
    code_weights = np.asarray(code_weights, np.float32)

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
      sums = likelihood.batch_sums(logits, target, code_weights=code_weights)
      objective = sums['weighted_nll' if code_weights is not None else 'nll']
      return objective / sums['num_codes'], sums

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
        'loss': loss,
        'bits_per_code': sums['nll'] / sums['num_codes'] / math.log(2.0),
        'accuracy': sums['correct'] / sums['num_codes'],
        'learning_rate': schedule(state.step),
        **step_metrics.norm_metrics(grads, params, updates),
    }
    return new_state, jax.tree.map(step_metrics.to_float32, metrics)

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


class Programs(NamedTuple):
  """A prior's jitted functions on one mesh.

  Built once per process for each (prior, optimizer settings, level, shapes,
  label dropout, Polyak decay, mesh), so that training the same prior again
  in this process (a resume from a notebook, the tests) compiles nothing.
  """
  model: pixelcnn.PixelCNNPrior
  schedule: optax.Schedule
  shardings: PriorTrainState  # NamedShardings of the train state.
  init: Callable[[jax.Array], PriorTrainState]  # (rng) -> sharded state.
  # (variables, rng, step) -> the sharded state around given weights, with
  # no random init (`train_state.jit_from_weights`).
  from_weights: Callable[..., PriorTrainState]
  train_step: Callable  # (state, batch) -> (state, metrics); state donated.
  eval_cond: Callable  # (params, batch) -> likelihood sums, with labels.
  eval_uncond: Callable  # (params, batch) -> likelihood sums, "no label".


def programs(config: ml_collections.ConfigDict, level: int,
             mesh: Mesh, code_weights: np.ndarray | None = None
             ) -> Programs:
  """The jitted functions of level `level`'s prior on `mesh` (cached).

  code_weights: [K], the loss's weight of each code
  (`likelihood.code_weight_table`); None: plain cross-entropy.
  """
  p = config.prior
  return _programs(
      builders.build_prior(config, level), _optimizer_args(config),
      level=level,
      level_shapes=tuple(tuple(s) for s in builders.level_shapes(config)),
      label_drop_rate=float(p.label_drop_rate),
      polyak_decay=float(p.polyak_decay), mesh=mesh,
      code_weights=(None if code_weights is None else
                    tuple(float(w) for w in np.asarray(code_weights))))


@functools.lru_cache(maxsize=4)
def _programs(model: pixelcnn.PixelCNNPrior,
              optimizer_args: tuple[tuple[str, Any], ...], *, level: int,
              level_shapes: tuple[tuple[int, ...], ...],
              label_drop_rate: float, polyak_decay: float,
              mesh: Mesh, code_weights: tuple[float, ...] | None
              ) -> Programs:
  tx, schedule = optimizer.create_optimizer(**dict(optimizer_args))
  init_fn = make_init_fn(model, tx, level=level, level_shapes=level_shapes,
                         use_polyak=polyak_decay > 0)
  init, shardings = train_state.sharded_init(init_fn, mesh,
                                             jax.random.PRNGKey(0))
  train_step = train_state.jit_train_step(
      make_train_step(model, tx, schedule, label_drop_rate=label_drop_rate,
                      polyak_decay=polyak_decay, code_weights=code_weights),
      shardings, mesh)
  return Programs(
      model=model, schedule=schedule, shardings=shardings, init=init,
      from_weights=train_state.jit_from_weights(
          make_state_fn(tx, use_polyak=polyak_decay > 0), shardings),
      train_step=train_step,
      eval_cond=make_eval_fn(model, shardings.params, mesh, use_labels=True),
      eval_uncond=make_eval_fn(model, shardings.params, mesh,
                               use_labels=False))


def evaluate(eval_fn: Callable, params: PyTree,
             batches: Iterator[Mapping[str, Any]]) -> dict[str, float]:
  """Bits per code, NLL and accuracy over every batch of `batches`."""
  total = None
  for batch in batches:
    total = likelihood.add_sums(total, eval_fn(params, batch))
  if total is None:
    raise ValueError('The evaluation split yielded no batches.')
  return likelihood.summarize(total)


def _training_codes(dataset: codes_lib.CodeDataset, level: int) -> np.ndarray:
  """The level's codes of the first training examples (up to 50,000): the
  frequencies of the unigram baseline and of `prior.code_weight`."""
  train = dataset.split('train')
  n = min(train.num_examples, _UNIGRAM_EXAMPLES)
  return train.read(np.arange(n), (level,))['codes'][0]


def baselines(dataset: codes_lib.CodeDataset, level: int) -> dict[str, float]:
  """Context-free baselines of a level on the held-out codes."""
  held_out = dataset.split('eval')
  train_codes = _training_codes(dataset, level)
  eval_codes = held_out.read(np.arange(held_out.num_examples),
                             (level,))['codes'][0]
  k = dataset.num_embeddings[level]
  return {'uniform_bits_per_code': likelihood.uniform_bits(k),
          **likelihood.unigram_bits(train_codes, eval_codes, k)}


def _start_from_export(config: ml_collections.ConfigDict, level: int,
                       progs: Programs, exported: Callable[[], Any],
                       ckpt_dir: str, fingerprint: Mapping[str, Any]) -> None:
  """Writes the prior of `level` in config.prior.from_export as this level's
  checkpoint, unless it has one already (a rerun resumes from it).

  The file's weights (its sampling weights: the Polyak average where the
  run kept one) as both the weights and their Polyak average, at the file's
  step, with a fresh optimizer state: trained to that step, the level is
  finished (it is evaluated); more steps train on from those weights.

  `exported()` is the file's `api.Pipeline`, loaded on first use.

  Raises:
    errors.ConfigError: the file holds no prior of this level, or one for
      another VQ-VAE than the workdir's stage 1, or of another model config
      (the message names the fields that differ).
  """
  if checkpoints.has_checkpoint(ckpt_dir):
    return
  source = config.prior.from_export
  pipe = exported()
  provenance = loading.vqvae_provenance(pipe.config, pipe.vqvae_variables,
                                        pipe.steps.get('vqvae', 0))
  theirs = (builders.prior_fingerprint(pipe.config, level, provenance)
            if level < len(pipe.priors) else None)
  if theirs is None:
    raise errors.ConfigError(
        f'config.prior.from_export: {source} holds no prior of level {level} '
        f'(it has {len(pipe.priors)} level(s)). Fix: import the levels it '
        'has (--config.prior.level=N) and train this one without '
        'prior.from_export.')
  differ = checkpoints.fingerprint_differences(theirs, fingerprint, 'file',
                                               'here')
  if any(k.startswith('codes.') for k in differ):
    raise errors.ConfigError(
        f'config.prior.from_export: {source} holds no prior of level {level} '
        f"for these codes: its VQ-VAE is not this workdir's stage 1 "
        f'({"; ".join(differ.values())}). Fix: start stage 1 from the same '
        f'file (--config.vqvae_train.from_export={source} in a new '
        '--workdir), or leave prior.from_export empty.')
  if differ:
    raise errors.ConfigError(
        f'config.prior.from_export: {source} holds no prior of level {level} '
        f'for this config: they differ in {"; ".join(differ.values())}. '
        'Fix: pass the config it was trained with, or import only the '
        'levels that agree (--config.prior.level=N) and train this one '
        'without prior.from_export.')
  step = int(pipe.steps.get(f'prior_{level}', 0))
  # The state key the init of this level would give; the file's weights
  # (and Polyak average, when kept).
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), level)
  state = progs.from_weights(pipe.priors[level][1], _split_init_key(rng)[2],
                             step)
  checkpoints.save_now(ckpt_dir, step, state, fingerprint)
  console.say('Prior level %d: from %s (its step %d; the optimizer starts '
              'afresh if training goes on)', level, source, step)


def train_level(config: ml_collections.ConfigDict, workdir: str, level: int,
                dataset: codes_lib.CodeDataset, vqvae: Mapping[str, Any],
                mesh: Mesh, exported: Optional[Callable[[], Any]] = None
                ) -> dict[str, Any]:
  """Trains (or resumes) the prior of one level; returns its final metrics.

  Args:
    config: the run's config.
    workdir: the run's directory; writes workdir/prior_<level>/.
    level: 0 = top.
    dataset: the provenance-checked codes.
    vqvae: provenance of the current VQ-VAE (stored in the fingerprint).
    mesh: the device mesh.
    exported: with config.prior.from_export, its `api.Pipeline` (loaded on
      first use, once for every level).

  Returns:
    'eval/...' (held-out split, whole; with the Polyak weights when used,
    plus 'eval/bits_per_code_uncond' without labels and
    'eval/bits_per_code_raw' with the raw params), 'eval_train/...' (the
    first training examples, config.prior.train_eval_examples of them or
    all), 'train/...' (last log interval, train mode), 'baseline/...'
    (uniform and unigram), 'level', 'num_params', 'codes_per_sec' and what
    `common.run_training` reports ('step', 'steps_per_sec', 'eval_time_s',
    'wall_time_s').
  """
  p = config.prior
  out_dir = workdir_lib.Workdir(workdir).prior(level)
  ckpt_dir = workdir_lib.checkpoint_dir(out_dir)
  fingerprint = builders.prior_fingerprint(config, level, vqvae)
  loading.check_codes_provenance(ckpt_dir, fingerprint)
  checkpoints.check_directory(ckpt_dir, fingerprint)

  power = builders.prior_code_weight(config)[level]
  code_weights = None
  if power:
    code_weights = likelihood.code_weight_table(
        _training_codes(dataset, level), dataset.num_embeddings[level], power)
    logging.info('Prior level %d: loss weighs code k by freq(k)^-%g (weights '
                 '%.3g to %.3g)', level, power, code_weights.min(),
                 code_weights.max())
  progs = programs(config, level, mesh, code_weights)
  if p.from_export:
    _start_from_export(
        config, level, progs,
        exported or functools.partial(_exported, p.from_export, mesh),
        ckpt_dir, fingerprint)
  model = progs.model
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(
      train_state.restore_target(progs).params))
  logging.info('Prior level %d: %d params on mesh %s', level, num_params,
               dict(mesh.shape))
  levels = tuple(range(level + 1))
  train_split, eval_split = dataset.split('train'), dataset.split('eval')
  # Training examples scored in eval mode (config.prior.train_eval_examples,
  # 0 = all): a few thousand show overfitting at a fraction of the cost.
  train_eval_limit = (min(p.train_eval_examples, train_split.num_examples)
                      if p.train_eval_examples else None)

  def train_iterator(start_step):
    return code_iterators.create_train_iterator(
        train_split, global_batch_size=p.batch_size, mesh=mesh,
        seed=config.seed, levels=levels, start_step=start_step)

  def batches(split, limit=None):
    return code_iterators.create_eval_iterator(
        split, global_batch_size=p.eval_batch_size, mesh=mesh, levels=levels,
        num_examples=limit)

  def run_eval(step, state, is_last):
    params = state.eval_params()
    results = {'eval': evaluate(progs.eval_cond, params, batches(eval_split)),
               'eval_train': evaluate(progs.eval_cond, params, batches(
                   train_split, train_eval_limit))}
    if is_last and model.num_classes:
      results['eval']['bits_per_code_uncond'] = evaluate(
          progs.eval_uncond, params, batches(eval_split))['bits_per_code']
    if is_last and state.polyak is not None:
      results['eval']['bits_per_code_raw'] = evaluate(
          progs.eval_cond, state.params, batches(eval_split))['bits_per_code']
    flat = {}
    for prefix, metrics in results.items():
      flat.update(step_metrics.scalars(metrics, prefix))
    logging.info('Prior level %d step %d: held-out %.4f bits/code, train '
                 '%.4f bits/code', level, step, flat['eval/bits_per_code'],
                 flat['eval_train/bits_per_code'])
    return flat

  def final_metrics(final):
    codes_per_example = math.prod(builders.level_shapes(config)[level])
    steps_per_sec = final.get('steps_per_sec')
    return {
        'level': level, 'num_params': num_params, 'code_weight': power,
        'codes_per_sec': (float('nan') if steps_per_sec is None else
                          steps_per_sec * p.batch_size * codes_per_example),
        **step_metrics.scalars(baselines(dataset, level), 'baseline')}

  return common.run_training(common.Stage(
      name=f'Prior level {level}', directory=out_dir, fingerprint=fingerprint,
      programs=progs,
      # Each level its own parameter seed; the data order is shared.
      init_rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), level),
      cadence=common.Cadence.from_config(p), train_iterator=train_iterator,
      evaluate=run_eval,
      nan_fix='lower --config.prior.learning_rate or grad_clip_norm',
      final_metrics=final_metrics, batch_size=p.batch_size))


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
  vqvae = loading.current_vqvae_provenance(config, workdir, mesh)
  dataset = codes_lib.CodeDataset(workdir_lib.Workdir(workdir).codes,
                                  vqvae=vqvae)
  # The file priors start from, read once for every level.
  exported = functools.cache(lambda: _exported(config.prior.from_export,
                                               mesh))
  return {f'level_{level}': train_level(config, workdir, level, dataset,
                                        vqvae, mesh, exported)
          for level in levels}


def _exported(source: str, mesh: Mesh) -> Any:
  # Here, not at the top: nothing in train/ needs the API otherwise.
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  return api.Pipeline.load(source, mesh=mesh)

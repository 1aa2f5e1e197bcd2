r"""The domain classifier (--mode=classifier), and classifiers of CAS.

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=classifier

Trains `models.classifier.Classifier` on the train split with the project's
one training loop (`common.run_training`: sharded step, orbax checkpoints,
exact resume, metrics, progress with ETA) and scores it on the held-out
split. Writes workdir/classifier/: checkpoints/, TensorBoard event files and
metrics.json. Its features and probabilities serve the sample metrics,
rejection sampling and CAS; `train_on_arrays` trains the same model on
in-memory images (samples or reconstructions) for the Classification
Accuracy Score.
"""

from collections.abc import Callable, Iterator, Mapping
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from vqvae2_jax import builders
from vqvae2_jax import checkpoints
from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import code_iterators
from vqvae2_jax.models import classifier as classifier_lib
from vqvae2_jax.train import common
from vqvae2_jax.train import optimizer
from vqvae2_jax.train import step_metrics
from vqvae2_jax.train import train_state

PyTree = Any


def _settings(config: ml_collections.ConfigDict
              ) -> tuple[tuple[str, Any], ...]:
  return optimizer.settings_key(config.classifier, {
      'learning_rate': float, 'warmup_steps': int, 'num_train_steps': int,
      'weight_decay': float, 'augment_shift': int, 'augment_flip': bool})


def make_init_fn(model: classifier_lib.Classifier,
                 tx: optax.GradientTransformation,
                 image_shape: tuple[int, int, int]
                 ) -> Callable[[jax.Array], train_state.TrainState]:
  """(rng) -> initial TrainState; `image_shape` is [h, w, c]."""

  def init_fn(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng,
                        jnp.zeros((1, *image_shape), jnp.float32))['params']
    return train_state.TrainState(step=jnp.zeros((), jnp.int32),
                                  params=params, opt_state=tx.init(params),
                                  extra={}, rng=state_rng)

  return init_fn


def make_train_step(model: classifier_lib.Classifier,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, augment_shift: int,
                    augment_flip: bool) -> Callable:
  """One step of cross-entropy on an augmented global batch.

  The augmentation draws from `state.step_rng()`, so a batch is augmented
  the same way on any mesh and after a resume.
  """

  def train_step(state, batch):
    images = classifier_lib.augment(state.step_rng(), batch['image'],
                                    max_shift=augment_shift, flip=augment_flip)
    labels = batch['label']

    def loss_fn(params):
      _, logits = model.apply({'params': params}, images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(loss), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss,
               'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
               'learning_rate': schedule(state.step),
               **step_metrics.norm_metrics(grads, params, updates)}
    return (state.replace(step=state.step + 1, params=params,
                          opt_state=opt_state),
            jax.tree.map(step_metrics.to_float32, metrics))

  return train_step


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array
               ) -> dict[str, jax.Array]:
  """Sums over the unmasked examples of one batch.

  Args:
    logits: float [b, C].
    labels: int32 [b].
    mask: bool [b]; False for padding.

  Returns:
    'nll' (nats), 'top1', 'top5' (correct counts; top-5 is top-C when there
    are fewer than 5 classes) and 'count', float32 scalars.
  """
  weights = mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  top5 = jnp.any(top == labels[:, None], axis=-1)
  top1 = top[:, 0] == labels
  return {'nll': jnp.sum(nll * weights), 'top1': jnp.sum(top1 * weights),
          'top5': jnp.sum(top5 * weights), 'count': jnp.sum(weights)}


def evaluate(eval_sums: Callable, params: PyTree,
             batches: Iterator[Mapping[str, jax.Array]]) -> dict[str, float]:
  """'accuracy', 'top5_accuracy', 'loss' and 'num_examples' over `batches`."""
  total = None
  for batch in batches:
    sums = jax.device_get(eval_sums(params, batch))
    sums = {k: np.float64(v) for k, v in sums.items()}
    total = sums if total is None else {k: total[k] + sums[k] for k in total}
  if total is None or total['count'] <= 0:
    raise ValueError('The evaluation split yielded no examples.')
  n = total['count']
  return {'accuracy': total['top1'] / n, 'top5_accuracy': total['top5'] / n,
          'loss': total['nll'] / n, 'num_examples': n}


class Programs(NamedTuple):
  """A classifier's jitted functions on one mesh (built once per process)."""
  model: classifier_lib.Classifier
  shardings: train_state.TrainState  # NamedShardings of the train state.
  init: Callable[[jax.Array], train_state.TrainState]
  train_step: Callable  # (state, batch) -> (state, metrics); state donated.
  eval_sums: Callable  # (params, batch) -> `batch_sums`.


def programs(config: ml_collections.ConfigDict, mesh: Mesh) -> Programs:
  """The jitted functions that `config` needs on `mesh` (cached)."""
  return _programs(builders.build_classifier(config), _settings(config),
                   builders.image_shape(config), mesh)


@functools.lru_cache(maxsize=8)
def _programs(model: classifier_lib.Classifier,
              settings: tuple[tuple[str, Any], ...],
              image_shape: tuple[int, int, int], mesh: Mesh) -> Programs:
  s = dict(settings)
  schedule = optimizer.create_learning_rate_schedule(
      learning_rate=s['learning_rate'], warmup_steps=s['warmup_steps'],
      num_train_steps=s['num_train_steps'])
  tx = optax.adamw(schedule, weight_decay=s['weight_decay'])
  init, shardings = train_state.sharded_init(
      make_init_fn(model, tx, image_shape), mesh, jax.random.PRNGKey(0))
  train_step = train_state.jit_train_step(
      make_train_step(model, tx, schedule, augment_shift=s['augment_shift'],
                      augment_flip=s['augment_flip']), shardings, mesh)
  data, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)

  def eval_sums(params, batch):
    _, logits = model.apply({'params': params}, batch['image'])
    return batch_sums(logits, batch['label'], batch['mask'])

  return Programs(
      model=model, shardings=shardings, init=init, train_step=train_step,
      eval_sums=jax.jit(eval_sums, in_shardings=(shardings.params, data),
                        out_shardings=replicated))


def _train(config: ml_collections.ConfigDict, *, name: str, directory: str,
           fingerprint: Mapping[str, Any], mesh: Mesh,
           train_iterator: Callable[[int], Iterator[Any]],
           eval_batches: Callable[[], Iterator[Any]]) -> dict[str, Any]:
  """Runs the training loop of one classifier; returns its final metrics."""
  checkpoints.check_directory(workdir_lib.checkpoint_dir(directory),
                              fingerprint)
  progs = programs(config, mesh)

  def run_eval(step, state, is_last):
    del step, is_last  # Every evaluation scores the whole held-out split.
    return step_metrics.scalars(
        evaluate(progs.eval_sums, state.params, eval_batches()), 'eval')

  return common.run_training(common.Stage(
      name=name, directory=directory, fingerprint=fingerprint,
      programs=progs, init_rng=jax.random.PRNGKey(config.seed),
      cadence=common.Cadence.from_config(config.classifier),
      train_iterator=train_iterator, evaluate=run_eval,
      nan_fix='lower --config.classifier.learning_rate',
      batch_size=config.classifier.batch_size))


def held_out_batches(config: ml_collections.ConfigDict, mesh: Mesh
                     ) -> Iterator[Mapping[str, jax.Array]]:
  """One ordered pass over the held-out split (config.data.eval_split)."""
  # Here, not at the top: it needs TensorFlow, and the module must import
  # without it (accelerator images).
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.classifier.eval_batch_size,
      mesh=mesh)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """--mode=classifier: trains on the train split, scores the held-out one.

  Args:
    config: a validated config (data, classifier, mesh, seed).
    workdir: the run's directory; writes workdir/classifier/.

  Returns:
    The final metrics (also in workdir/classifier/metrics.json):
    'eval/accuracy', 'eval/top5_accuracy', 'eval/loss' over the whole
    held-out split, 'train/...', 'step', 'steps_per_sec', 'wall_time_s'.
  """
  if not config.data.num_classes:
    raise errors.ConfigError(
        'config.data.num_classes: 0, but the domain classifier needs labels. '
        'Fix: use labelled data (sample metrics without a classifier, e.g. '
        'Inception FID, still work).')
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh(config.mesh)
  c = config.classifier

  def train_iterator(start_step):
    return input_pipeline.create_train_iterator(
        config.data, global_batch_size=c.batch_size, mesh=mesh,
        seed=config.seed, start_step=start_step)

  return _train(config, name='Classifier',
                directory=workdir_lib.Workdir(workdir).classifier,
                fingerprint=builders.classifier_fingerprint(config), mesh=mesh,
                train_iterator=train_iterator,
                eval_batches=lambda: held_out_batches(config, mesh))


def array_train_iterator(images: np.ndarray, labels: np.ndarray, *,
                         global_batch_size: int, mesh: Mesh, seed: int,
                         start_step: int = 0
                         ) -> Iterator[dict[str, jax.Array]]:
  """Endless shuffled batches of in-memory examples, resumable at any step.

  The same stream as the extracted codes' (`code_iterators.train_indices`:
  epochs of permutations drawn from (seed, epoch)); each process lays out
  its own rows of every global batch.

  Args:
    images: float32 [n, h, w, c] in [-1, 1], the same on every process.
    labels: int32 [n].
    global_batch_size: examples per batch; divides by the mesh's devices.
    mesh: batches are sharded over its data axes.
    seed: the order's seed.
    start_step: batches an earlier run already consumed.

  Yields:
    {'image': float32 [B, h, w, c], 'label': int32 [B]} global arrays.
  """
  n = len(images)
  if n < global_batch_size:
    raise errors.ConfigError(
        f'{n} examples, fewer than the batch size {global_batch_size}. Fix: '
        'lower --config.classifier.batch_size or provide more examples.')
  local = global_batch_size // jax.process_count()
  first = jax.process_index() * local
  cache = {}
  for step in range(start_step, 2**62):
    positions = step * global_batch_size + first + np.arange(local)
    idx = code_iterators.train_indices(n, seed, positions, cache)
    yield parallel.shard_batch({'image': images[idx], 'label': labels[idx]},
                               mesh)


def train_on_arrays(config: ml_collections.ConfigDict, directory: str,
                    images: np.ndarray, labels: np.ndarray, *,
                    name: str, provenance: Mapping[str, Any],
                    mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains a classifier on in-memory examples; scores the held-out split.

  The Classification Accuracy Score trains this way on samples (or on
  reconstructions) and tests on the real held-out split.

  Args:
    config: the run's config; the model and schedule of config.classifier.
    directory: where this classifier's checkpoints and metrics go.
    images: float32 [n, h, w, c] in [-1, 1].
    labels: int32 [n] (the requested classes of samples).
    name: for the log.
    provenance: what the examples are (e.g. sample run, count); part of the
      fingerprint, so other examples never resume this run.
    mesh: default: config.mesh.

  Returns:
    As `train_and_evaluate`.
  """
  mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  fingerprint = {**builders.classifier_fingerprint(config),
                 **{f'examples.{k}': v for k, v in provenance.items()},
                 'examples.count': len(images)}

  def train_iterator(start_step):
    return array_train_iterator(
        images, labels, global_batch_size=config.classifier.batch_size,
        mesh=mesh, seed=config.seed, start_step=start_step)

  return _train(config, name=name, directory=directory,
                fingerprint=fingerprint, mesh=mesh,
                train_iterator=train_iterator,
                eval_batches=lambda: held_out_batches(config, mesh))


def num_params(params: PyTree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))

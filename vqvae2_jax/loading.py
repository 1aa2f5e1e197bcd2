"""Loads the variables of finished stages for the stages after them.

`load_vqvae` (codes, sampling, evaluation) and `load_prior` (sampling)
restore the model variables only, never the optimizer state: a checkpoint
still loads after a training-only setting changed (vqvae_train.grad_clip_norm,
prior.grad_clip_norm, prior.polyak_decay, ...). Also here: the provenance
that ties extracted codes and priors to one VQ-VAE. Where each stage writes
is `workdir.Workdir`'s.
"""

from collections.abc import Mapping
import functools
import hashlib
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import checkpoints
from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.models import classifier as classifier_lib
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.models import vqvae as vqvae_lib

PyTree = Any


def variables_digest(variables: Any) -> str:
  """SHA-256 of every variable's path, dtype, shape and bytes (16 hex digits).

  Two checkpoints with the same config and step (e.g. two seeds) encode
  differently; the digest tells them apart.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    value = np.ascontiguousarray(parallel.to_host(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{value.dtype.str}|'
                  f'{value.shape}|'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def vqvae_provenance(config: ml_collections.ConfigDict, variables: Any,
                     step: int) -> dict[str, Any]:
  """What identifies a VQ-VAE's codes: {'step', 'fingerprint', 'digest'}."""
  return {'step': int(step),
          'fingerprint': builders.vqvae_fingerprint(config),
          'digest': variables_digest(variables)}


def _abstract_on_mesh(abstract: PyTree, mesh: Mesh) -> PyTree:
  """`abstract` with the shardings the trainers give these arrays."""
  return parallel.abstract_with_shardings(
      abstract, parallel.state_shardings(abstract, mesh))


def _restore_latest_subtrees(ckpt_dir: str, fingerprint: Mapping[str, Any],
                             choose_target: Any
                             ) -> tuple[dict[str, PyTree], int] | None:
  """Restores what `choose_target(saved structure)` names from the newest step.

  A damaged newest step is passed over for the newest intact one, with a
  warning, and left in place (`checkpoints.restore_newest_intact`).

  Returns None when `ckpt_dir` holds no checkpoint.

  Raises:
    errors.CheckpointMismatchError: written for a different model config.
    errors.NoIntactCheckpointError: no checkpoint in `ckpt_dir` reads back.
  """
  if not checkpoints.directory_exists(ckpt_dir):
    return None
  manager = checkpoints.create_manager(ckpt_dir, read_only=True)

  def restore(step):
    target = choose_target(checkpoints.saved_structure(manager, step))
    return checkpoints.restore_subtrees(manager, step, target)

  try:
    return checkpoints.restore_newest_intact(manager, fingerprint, restore)
  finally:
    manager.close()


def load_vqvae(config: ml_collections.ConfigDict, workdir: str,
               mesh: Mesh | None = None
               ) -> tuple[vqvae_lib.VQVAE, dict[str, Any], int]:
  """Loads the variables of the newest stage-1 checkpoint.

  Args:
    config: the config that trained it (the fingerprint must match; training
      settings may differ).
    workdir: the run's workdir (reads workdir/vqvae/checkpoints).
    mesh: where to place the variables; default: all devices.

  Returns:
    (model, variables {'params', 'vq_stats'}, step).

  Raises:
    errors.MissingStageError: no stage-1 checkpoint in `workdir`.
    errors.CheckpointMismatchError: written for another model config.
  """
  mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
  model = builders.build_vqvae(config)
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(
      functools.partial(model.init, train=False), {'params': key, 'vq': key},
      builders.vqvae_init_inputs(config))
  abstract = _abstract_on_mesh(dict(abstract), mesh)
  params = abstract.pop('params')
  # The trainer keeps the other collections (codebook statistics) in 'extra'.
  target = {'params': params, 'extra': abstract}
  ckpt_dir = workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).vqvae)
  restored = _restore_latest_subtrees(
      ckpt_dir, builders.vqvae_fingerprint(config), lambda _: target)
  if restored is None:
    raise errors.MissingStageError(
        f'No VQ-VAE checkpoint in {ckpt_dir}. Fix: train stage 1 first with '
        '--mode=vqvae and the same --workdir.')
  subtrees, step = restored
  return model, {'params': subtrees['params'], **subtrees['extra']}, step


def current_vqvae_provenance(config: ml_collections.ConfigDict, workdir: str,
                             mesh: Mesh | None = None) -> dict[str, Any]:
  """The provenance of the newest stage-1 checkpoint in `workdir`.

  Raises:
    errors.MissingStageError: there is no stage-1 checkpoint.
    errors.CheckpointMismatchError: written for another model config.
  """
  _, variables, step = load_vqvae(config, workdir, mesh)
  return vqvae_provenance(config, variables, step)


def check_codes_provenance(ckpt_dir: str,
                           fingerprint: Mapping[str, Any]) -> None:
  """Refuses prior checkpoints trained on another VQ-VAE's codes.

  A clearer error than the fingerprint diff for the usual cause: stage 1
  trained further after the priors.

  Args:
    ckpt_dir: a prior's checkpoint directory (may not exist yet).
    fingerprint: the prior's current `builders.prior_fingerprint`.
  """
  if not checkpoints.directory_exists(ckpt_dir):
    return
  manager = checkpoints.create_manager(ckpt_dir, read_only=True)
  try:
    newest = checkpoints.newest_fingerprint(manager)
    saved = None if newest is None else newest[1]
  finally:
    manager.close()
  if not saved:
    return
  keys = ('codes.vqvae_step', 'codes.vqvae_digest')
  if any(saved.get(k) != fingerprint[k] for k in keys):
    raise errors.CheckpointMismatchError(
        f'The prior checkpoints in {ckpt_dir} were trained on codes of VQ-VAE '
        f'step {saved.get("codes.vqvae_step")}, but workdir/codes now holds '
        f'codes of VQ-VAE step {fingerprint["codes.vqvae_step"]} (or other '
        f'weights). Fix: delete {os.path.dirname(ckpt_dir)} to train this '
        'prior on the new codes, or use another --workdir.')


def load_prior(config: ml_collections.ConfigDict, workdir: str, level: int, *,
               vqvae: Mapping[str, Any], mesh: Mesh | None = None,
               use_polyak: bool = True
               ) -> tuple[pixelcnn.PixelCNNPrior, dict[str, PyTree], int]:
  """Loads the weights of level `level`'s newest prior checkpoint.

  Only the weights are read, so the checkpoint loads whatever
  prior.polyak_decay and prior.grad_clip_norm say now.

  Args:
    config: the config that trained it (the fingerprint must match).
    workdir: the run's workdir (reads workdir/prior_<level>/checkpoints).
    level: 0 = top.
    vqvae: provenance of the current VQ-VAE (`vqvae_provenance`); a prior
      trained on another VQ-VAE's codes is refused.
    mesh: where to place the parameters; default: all devices.
    use_polyak: the Polyak weights when the checkpoint has them (it has them
      when prior.polyak_decay was > 0 during training), else the params.

  Returns:
    (model, variables {'params': ...}, step).

  Raises:
    errors.MissingStageError: no checkpoint of this level's prior.
    errors.CheckpointMismatchError: written for another config or another
      VQ-VAE's codes.
  """
  mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
  ckpt_dir = workdir_lib.checkpoint_dir(
      workdir_lib.Workdir(workdir).prior(level))
  fingerprint = builders.prior_fingerprint(config, level, vqvae)
  check_codes_provenance(ckpt_dir, fingerprint)
  model = builders.build_prior(config, level)
  codes, cond, labels = builders.prior_init_inputs(
      level, builders.level_shapes(config), model.num_classes)
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(
      functools.partial(model.init, train=False),
      {'params': key, 'dropout': key}, codes, cond_codes=cond, labels=labels)
  params = _abstract_on_mesh(abstract['params'], mesh)

  def choose_target(saved):
    has_polyak = saved.get('polyak') is not None
    field = 'polyak' if use_polyak and has_polyak else 'params'
    if use_polyak and not has_polyak:
      logging.info('Prior level %d: the checkpoint has no Polyak weights '
                   '(trained with prior.polyak_decay=0); using its params.',
                   level)
    return {field: params}

  restored = _restore_latest_subtrees(ckpt_dir, fingerprint, choose_target)
  if restored is None:
    raise errors.MissingStageError(
        f'No prior checkpoint for level {level} in {ckpt_dir}. Fix: train the '
        'priors first with --mode=prior and the same --workdir.')
  subtrees, step = restored
  (weights,) = subtrees.values()
  return model, {'params': weights}, step


class LoadedClassifier(NamedTuple):
  """A trained domain classifier, ready to score images.

  Attributes:
    model: the module.
    params: its 'params', placed on `mesh`.
    step: the checkpoint's step.
    mesh: where it runs.
    predict: jitted (params, images [b, h, w, c]) -> (features [b, d],
      probabilities [b, C]); b divides over the mesh's devices.
  """
  model: classifier_lib.Classifier
  params: PyTree
  step: int
  mesh: Mesh
  predict: Any


_FIX_TRAIN_CLASSIFIER = ('train the classifier first with --mode=classifier '
                         'and the same --workdir')


def load_classifier(config: ml_collections.ConfigDict, workdir: str,
                    mesh: Mesh | None = None) -> LoadedClassifier:
  """The newest domain classifier's params (variables only).

  Args:
    config: the run's config; its data and classifier fields must match the
      checkpoint's (a classifier of another dataset or image size is
      refused, naming the differing fields).
    workdir: reads workdir/classifier/checkpoints.
    mesh: default: config.mesh.

  Returns:
    The classifier; `predict_batches` scores images with it.

  Raises:
    errors.MissingStageError: no classifier checkpoint.
    errors.CheckpointMismatchError: written for another dataset, image size
      or model.
  """
  mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
  ckpt_dir = workdir_lib.checkpoint_dir(
      workdir_lib.Workdir(workdir).classifier)
  if not checkpoints.directory_exists(ckpt_dir):
    raise errors.MissingStageError(
        f'No classifier checkpoint in {ckpt_dir}. Fix: '
        f'{_FIX_TRAIN_CLASSIFIER}.')
  model = builders.build_classifier(config)
  abstract, predict = _classifier_programs(
      model, builders.image_shape(config), mesh)
  restored = _restore_latest_subtrees(
      ckpt_dir, builders.classifier_fingerprint(config),
      lambda _: {'params': abstract})
  if restored is None:
    raise errors.MissingStageError(
        f'No classifier checkpoint in {ckpt_dir}. Fix: '
        f'{_FIX_TRAIN_CLASSIFIER}.')
  subtrees, step = restored
  return LoadedClassifier(model=model, params=subtrees['params'], step=step,
                          mesh=mesh, predict=predict)


@functools.lru_cache(maxsize=8)
def _classifier_programs(model: classifier_lib.Classifier,
                         image_shape: tuple[int, int, int], mesh: Mesh
                         ) -> tuple[PyTree, Any]:
  """(the params' restore target, the jitted predict) of `model` on `mesh`.

  Built once per model and mesh, so that every load of a classifier shares
  one compilation. The params are laid out as the trainer lays them out
  (`parallel.state_shardings`). It computes in full float32 on every
  backend, as the judge does (`classifier.features_and_probabilities`):
  where it is the sample metrics' ruler, its figures mean the same on a CPU
  and a GPU.
  """
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *image_shape), jnp.float32))
  shardings = parallel.state_shardings(abstract['params'], mesh)
  data = parallel.data_sharding(mesh)

  def predict(params, images):
    return classifier_lib.features_and_probabilities(
        model, {'params': params}, images)

  return (parallel.abstract_with_shardings(abstract['params'], shardings),
          jax.jit(predict, in_shardings=(shardings, data),
                  out_shardings=(data, data)))


def predict_batches(classifier: LoadedClassifier, images: np.ndarray,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Features and probabilities of many images, batch by batch.

  Args:
    classifier: from `load_classifier`.
    images: float32 [n, h, w, c] in [-1, 1], the same on every process.
    batch_size: images per call, rounded down to a multiple of the mesh's
      devices (at least one each); the last batch is padded and its padding
      dropped.

  Returns:
    (features float64 [n, d], probabilities float64 [n, C]).
  """
  mesh = classifier.mesh
  n = len(images)
  batch_size = max(batch_size // mesh.size, 1) * mesh.size
  feats, probs = [], []
  for begin in range(0, n, batch_size):
    chunk = np.asarray(images[begin:begin + batch_size], np.float32)
    m = len(chunk)
    if m < batch_size:
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - m, *chunk.shape[1:]), np.float32)])
    f, p = classifier.predict(classifier.params, jax.device_put(
        chunk, parallel.data_sharding(mesh)))
    feats.append(np.asarray(jax.device_get(f), np.float64)[:m])
    probs.append(np.asarray(jax.device_get(p), np.float64)[:m])
  if not feats:
    raise ValueError('No images to classify.')
  return np.concatenate(feats), np.concatenate(probs)

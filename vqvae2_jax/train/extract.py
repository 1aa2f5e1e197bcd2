r"""Extracts the codes of the train and held-out splits (--mode=codes).

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=codes

Encodes both splits with the newest stage-1 checkpoint in workdir/vqvae/ and
writes workdir/codes/ in the format of `data.codes`: shards written
atomically, the manifest last. A rerun keeps the shards already written for
the same VQ-VAE and writes the rest; after stage 1 trains further, a rerun
extracts everything again.
"""

from collections.abc import Callable, Iterator, Mapping
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data import layout

_LOG_EVERY_SECS = 30.0


def make_encode_fn(model: Any, variables: Any, mesh: jax.sharding.Mesh
                   ) -> Callable[[Mapping[str, jax.Array]], tuple]:
  """Jitted batch -> (codes per level, labels, mask), gathered on every host.

  The images are split over the mesh's data axes; the outputs are small
  integers, replicated so that process 0 can write them.
  """
  var_shardings = jax.tree.map(lambda x: x.sharding, variables)

  def encode(variables, batch):
    codes = model.apply(variables, batch['image'], method=model.encode)
    labels = batch.get('label')
    if labels is None:  # Unlabelled data: label 0 everywhere.
      labels = jnp.zeros(batch['image'].shape[:1], jnp.int32)
    return list(codes), labels.astype(jnp.int32), batch['mask']

  jitted = jax.jit(encode,
                   in_shardings=(var_shardings, parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  return lambda batch: jitted(variables, batch)


def _extract_split(*, encode: Callable, batches: Iterator[Mapping[str, Any]],
                   out_dir: str, role: str, info: Mapping[str, Any],
                   todo: list[int], num_embeddings: list[int],
                   global_batch_size: int) -> None:
  """Encodes one split and writes the shards listed in `todo` (process 0).

  With several processes a batch holds a run of consecutive examples from
  each process's share (`layout.eval_batch_positions`), so shards
  fill out of order; each is written once, when its last example arrived.
  Every process makes the same decisions (the same `todo`, the same
  positions), so all of them call the encoder for the same batches.
  """
  n, size = info['num_examples'], info['shard_size']
  num_shards = info['num_shards']
  todo = set(todo)
  # Shard -> parts of (positions, codes per level, labels) received so far.
  pending: dict[int, list[tuple[np.ndarray, list[np.ndarray], np.ndarray]]]
  pending = {}
  start = last_log = time.time()
  encoded = 0
  for index, batch in enumerate(batches):
    if not todo:
      break  # Everything left is on disk already.
    if parallel.preempted():  # Shards are whole or absent: stop anywhere.
      raise errors.Preempted(
          f'codes: stopped by a preemption notice (SIGTERM); the complete '
          f'code shards in {out_dir} are kept and a rerun extracts only the '
          'rest. Run the same command again to continue.', step=0)
    positions = layout.eval_batch_positions(n, global_batch_size, index)
    shard_of = np.where(positions >= 0, positions // size, -1)
    if not todo.intersection(shard_of[positions >= 0].tolist()):
      continue  # Already written: skip the encoder.
    levels, labels, mask = jax.tree.map(parallel.to_host, encode(batch))
    if not np.array_equal(mask, positions >= 0):
      raise ValueError(
          f'Split {info["source"]!r}: batch {index} of the ordered pass has '
          f'{int(mask.sum())} examples where {int((positions >= 0).sum())} '
          'were expected.')
    encoded += int(mask.sum())
    for s in sorted(set(shard_of[mask].tolist()) & todo):
      rows = shard_of == s
      pending.setdefault(s, []).append(
          (positions[rows], [l[rows] for l in levels], labels[rows]))
      if sum(len(p[0]) for p in pending[s]) < min(size, n - s * size):
        continue
      parts = pending.pop(s)
      order = np.argsort(np.concatenate([p[0] for p in parts]))
      shard_codes = [np.concatenate([p[1][i] for p in parts])[order]
                     for i in range(len(levels))]
      records = codes_lib.make_records(
          shard_codes, np.concatenate([p[2] for p in parts])[order],
          num_embeddings)
      if jax.process_index() == 0:
        codes_lib.write_shard(
            codes_lib.shard_path(out_dir, role, s, num_shards), records)
      todo.discard(s)
      logging.info('codes/%s: wrote shard %d of %d', role, s + 1, num_shards)
    now = time.time()
    if now - last_log > _LOG_EVERY_SECS:
      last_log = now
      rate = encoded / (now - start)
      left = sum(min(size, n - s * size) for s in todo)
      logging.info('codes/%s: %d examples encoded, %.0f examples/s, ETA '
                   '%.0f s', role, encoded, rate, left / max(rate, 1e-9))
  if todo:
    raise ValueError(f'Split {info["source"]!r} ended before shards '
                     f'{sorted(todo)} of its {n} examples were complete.')


def extract_codes(config: ml_collections.ConfigDict,
                  workdir: str) -> dict[str, Any]:
  """Writes the codes of the train and eval splits to workdir/codes/.

  Args:
    config: the run's config (data, model, vqvae_train.eval_batch_size as the
      encoding batch, prior.codes_per_shard, mesh).
    workdir: holds the stage-1 checkpoints in vqvae/.

  Returns:
    {'vqvae_step', 'num_examples_<role>', 'encoded_examples', 'wall_time_s'}.

  Raises:
    FileNotFoundError: no stage-1 checkpoint in `workdir`.
    errors.WorkdirError: workdir/codes cannot be written, or the disk
      filled up (the message says which shards are kept).
  """
  # Here, not at the top: it needs TensorFlow, and the module must import
  # without it (accelerator images).
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  mesh = parallel.create_mesh(config.mesh)
  model, variables, step = loading.load_vqvae(config, workdir, mesh)
  provenance = loading.vqvae_provenance(config, variables, step)
  level_shapes = builders.level_shapes(config)
  num_embeddings = [int(config.model.num_embeddings)] * len(level_shapes)
  sources = {'train': config.data.train_split, 'eval': config.data.eval_split}
  shard_size = int(config.prior.codes_per_shard)
  plan = codes_lib.make_plan(
      vqvae=provenance, level_shapes=level_shapes,
      num_embeddings=num_embeddings, num_classes=config.data.num_classes,
      splits={role: {'source': split,
                     'num_examples': input_pipeline.num_examples(config.data,
                                                                 split),
                     'shard_size': shard_size}
              for role, split in sources.items()})
  out_dir = workdir_lib.Workdir(workdir).codes
  if codes_lib.is_complete(out_dir, plan):  # Read only: nothing to write.
    console.say('Codes in %s are complete for VQ-VAE step %d; nothing to '
                'do.', out_dir, step)
    return {'vqvae_step': step, 'extract_time_s': 0.0,
            'wall_time_s': time.time() - start_time,
            **{f'num_examples_{role}': info['num_examples']
               for role, info in plan['splits'].items()}}
  files.ensure_writable(out_dir, 'codes')
  try:
    before = time.time()
    _extract_all(config, model=model, variables=variables, mesh=mesh,
                 out_dir=out_dir, plan=plan, num_embeddings=num_embeddings,
                 step=step)
  except Exception as e:  # pylint: disable=broad-except
    if not files.is_disk_full(e):
      raise
    # Shards are written atomically: the ones on disk are whole and kept.
    done = codes_lib.count_shards(out_dir, plan)
    raise files.disk_full_error(
        out_dir, e, f'the {done} complete code shard(s) are kept and a rerun '
        'extracts only the rest',
        needed=codes_lib.missing_bytes(out_dir, plan)) from e
  result = {'vqvae_step': step, 'extract_time_s': time.time() - before,
            'wall_time_s': time.time() - start_time,
            **{f'num_examples_{role}': info['num_examples']
               for role, info in plan['splits'].items()}}
  logging.info('Codes extracted: %s', result)
  console.say('Codes: %s in %.0f s; in %s', ', '.join(
      f'{plan["splits"][role]["num_examples"]} {role}' for role in plan['splits']),
              result['extract_time_s'], out_dir)
  return result


def _extract_all(config: ml_collections.ConfigDict, *, model: Any,
                 variables: Any, mesh: jax.sharding.Mesh, out_dir: str,
                 plan: Mapping[str, Any], num_embeddings: list[int],
                 step: int) -> None:
  """Writes every shard of `plan` not yet in `out_dir`, then the manifest."""
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  todo = _prepare_directory(out_dir, plan)
  logging.info('Extracting codes with VQ-VAE step %d into %s; shards to '
               'write: %s', step, out_dir,
               {role: len(t) for role, t in todo.items()})

  encode = make_encode_fn(model, variables, mesh)
  batch_size = int(config.vqvae_train.eval_batch_size)
  for role in codes_lib.SPLITS:  # Train first.
    info = plan['splits'][role]
    if not todo[role]:
      continue
    batches = input_pipeline.create_eval_iterator(
        config.data, split=info['source'], global_batch_size=batch_size,
        mesh=mesh)
    _extract_split(encode=encode, batches=batches, out_dir=out_dir, role=role,
                   info=info, todo=todo[role], num_embeddings=num_embeddings,
                   global_batch_size=batch_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('codes: shards written')
  if jax.process_index() == 0:
    codes_lib.finalize(out_dir, plan)


def _prepare_directory(out_dir: str, plan: Mapping[str, Any]
                       ) -> dict[str, list[int]]:
  """`codes_lib.prepare_directory` on process 0; its answer on every process.

  Only process 0 deletes and writes files; the others get its list of the
  shards to do, so that no process reads the directory while it changes
  and all agree on which batches to encode.
  """
  if jax.process_count() == 1:
    return codes_lib.prepare_directory(out_dir, plan)
  masks = {role: np.zeros(info['num_shards'], bool)
           for role, info in plan['splits'].items()}
  if jax.process_index() == 0:
    for role, shards in codes_lib.prepare_directory(out_dir, plan).items():
      masks[role][shards] = True
  masks = multihost_utils.broadcast_one_to_all(masks)
  return {role: np.flatnonzero(mask).tolist() for role, mask in masks.items()}

r"""Stage 3 (--mode=sample): ancestral samples of the whole hierarchy.

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=sample

Loads the newest VQ-VAE and prior checkpoints of `workdir`, samples the top
level's codes given the class, then each lower level given the codes above
(the cached samplers of `sampling.py`), decodes, and writes
workdir/samples/<run>/. `<run>` names the checkpoints' steps, the seed and
the controls, so a finished run is skipped when rerun and other settings
write beside it: nothing already sampled is overwritten.
"""

import functools
import json
import os
import shutil
import time
from typing import Any, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import parallel
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.sampling import sample_level
from vqvae2_jax.train import common
from vqvae2_jax.train import extract
from vqvae2_jax.train import prior_trainer
from vqvae2_jax.train import vqvae_trainer

Array = jax.Array
PyTree = Any


def sample_hierarchy(priors: Sequence[tuple[pixelcnn.PixelCNNPrior, PyTree]],
                     level_shapes: Sequence[Sequence[int]], *, batch_size: int,
                     labels: Optional[Array], rng: Array,
                     temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0,
                     mesh: Optional[Mesh] = None) -> list[Array]:
  """Ancestral sampling of every level, top first.

  z_0 ~ p(z_0 | y), then z_l ~ p(z_l | z_0..z_{l-1}, y) for each lower level.

  Args:
    priors: (model, variables) of each level, top first.
    level_shapes: (h, w) of each level's map, top first.
    batch_size: maps per level.
    labels: [batch_size] int32 class labels, or None (unconditional path).
    rng: PRNG key; level l draws with `fold_in(rng, l)`.
    temperature, top_k, top_p: as for `sample_level`, at every level.
    mesh: split the batch over this mesh's devices (None: one device); the
      codes do not depend on it.

  Returns:
    Code maps [batch_size, h_l, w_l] int32, top first.
  """
  if len(priors) != len(level_shapes):
    raise ValueError(f'{len(priors)} priors for {len(level_shapes)} levels.')
  codes = []
  for level, ((model, variables), (h, w)) in enumerate(
      zip(priors, level_shapes)):
    codes.append(sample_level(
        model, variables, shape=(batch_size, h, w), cond_codes=tuple(codes),
        labels=labels if model.num_classes else None,
        rng=jax.random.fold_in(rng, level), temperature=temperature,
        top_k=top_k, top_p=top_p, mesh=mesh))
  return codes


def sample_labels(num_classes: int, per_class: int,
                  conditional: bool) -> Optional[np.ndarray]:
  """Labels of a sample grid: `per_class` of each class, class by class."""
  if not (conditional and num_classes):
    return None
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def sample_and_save(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, Any]:
  """--mode=sample: samples the hierarchy, decodes, writes grids and codes.

  Writes workdir/samples/<run>/ (into <run>.tmp, renamed when complete)
  with samples.png (one row per class when conditional), levels.png (what
  each level contributes: every level, then the top levels alone),
  codes.npz (every level's codes and the labels) and meta.json. <run> names
  the checkpoints' steps, the seed, the controls and the number of samples
  (and `_uncond` without labels), so a finished run is skipped on rerun and
  other settings never overwrite it.

  Returns:
    meta.json's contents: the directory, steps, controls and seconds per map.
  """
  s = config.sampling
  mesh = parallel.create_mesh(config.mesh)
  vqvae, vq_variables, vq_step = vqvae_trainer.load_vqvae(config, workdir, mesh)
  num_levels = len(config.model.downsample_factors)
  provenance = extract.vqvae_provenance(config, vq_variables, vq_step)
  priors, prior_steps = [], []
  for level in range(num_levels):
    model, variables, step = prior_trainer.load_prior(
        config, workdir, level, vqvae=provenance, mesh=mesh,
        use_polyak=s.use_polyak)
    priors.append((model, variables))
    prior_steps.append(step)

  labels = sample_labels(config.data.num_classes, s.num_samples_per_class,
                         s.conditional)
  num_samples = (len(labels) if labels is not None
                 else s.num_samples_per_class)
  name = (f'vqvae{vq_step}_prior{"-".join(map(str, prior_steps))}_'
          f'seed{config.seed}_t{s.temperature:g}_k{s.top_k}_p{s.top_p:g}_'
          f'n{num_samples}{"" if labels is not None else "_uncond"}')
  out_dir = os.path.join(os.path.abspath(workdir), 'samples', name)
  meta_path = os.path.join(out_dir, 'meta.json')
  if os.path.exists(meta_path):
    logging.info('Samples already in %s; skipping.', out_dir)
    with open(meta_path) as f:
      return json.load(f)

  level_shapes = [(config.data.image_size // f,) * 2
                  for f in config.model.downsample_factors]
  decode = jax.jit(functools.partial(vqvae.apply, method=vqvae.decode_codes))
  rng = jax.random.PRNGKey(config.seed)
  # No bigger than needed (rounded up to split over the mesh's devices).
  batch = min(s.batch_size, -(-num_samples // mesh.size) * mesh.size)
  all_codes, all_images = [], []
  start = time.time()
  for i, begin in enumerate(range(0, num_samples, batch)):
    n = min(batch, num_samples - begin)
    # Pad the last batch so every batch has one shape (one compilation).
    batch_labels = None
    if labels is not None:
      batch_labels = np.zeros((batch,), np.int32)
      batch_labels[:n] = labels[begin:begin + n]
    codes = sample_hierarchy(
        priors, level_shapes, batch_size=batch, labels=batch_labels,
        rng=jax.random.fold_in(rng, i), temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, mesh=mesh)
    images = decode(vq_variables, codes)
    all_codes.append([np.asarray(c)[:n] for c in codes])
    all_images.append(np.asarray(images)[:n])
    done = begin + n
    elapsed = time.time() - start
    logging.info('Sampled %d/%d maps (%.1f s, ETA %.0f s)', done, num_samples,
                 elapsed, elapsed / done * (num_samples - done))
  seconds = time.time() - start
  codes = [np.concatenate([c[l] for c in all_codes]) for l in range(num_levels)]
  images = np.concatenate(all_images)

  # Per-level view of the first samples: all levels, then the top l levels.
  view = min(num_samples, 8)
  view_rows = [images[:view]]
  for keep in range(num_levels - 1, 0, -1):
    view_rows.append(np.asarray(vqvae.apply(
        vq_variables, [jnp.asarray(c[:view]) for c in codes],
        list(range(keep)), method=vqvae.decode_levels)))

  tmp_dir = out_dir + '.tmp'
  if os.path.exists(tmp_dir):
    shutil.rmtree(tmp_dir)
  os.makedirs(tmp_dir)
  cols = s.num_samples_per_class if labels is not None else min(num_samples, 10)
  common.write_image_grid(os.path.join(tmp_dir, 'samples.png'), images, cols)
  common.write_image_grid(os.path.join(tmp_dir, 'levels.png'),
                          np.concatenate(view_rows), view)
  arrays = {f'codes_{l}': c for l, c in enumerate(codes)}
  if labels is not None:
    arrays['labels'] = labels
  np.savez(os.path.join(tmp_dir, 'codes.npz'), **arrays)
  meta = {'dir': out_dir, 'vqvae_step': vq_step, 'prior_steps': prior_steps,
          'num_samples': num_samples, 'seconds': seconds,
          'seconds_per_map': seconds / num_samples,
          'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p,
          'seed': config.seed, 'conditional': labels is not None}
  common.write_json(os.path.join(tmp_dir, 'meta.json'), meta)
  os.rename(tmp_dir, out_dir)
  logging.info('Wrote %d samples to %s (%.2f s per map)', num_samples, out_dir,
               seconds / num_samples)
  return meta

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
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax.train import common


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
  vqvae, vq_variables, vq_step = loading.load_vqvae(config, workdir, mesh)
  num_levels = builders.num_levels(config)
  provenance = loading.vqvae_provenance(config, vq_variables, vq_step)
  priors, prior_steps = [], []
  for level in range(num_levels):
    model, variables, step = loading.load_prior(
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
  meta = files.read_json(meta_path)
  if meta is not None:
    logging.info('Samples already in %s; skipping.', out_dir)
    return meta

  level_shapes = builders.level_shapes(config)
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
    codes = sampling.sample_hierarchy(
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
  if jax.process_index() == 0:
    files.write_json(os.path.join(tmp_dir, 'meta.json'), meta)
  os.rename(tmp_dir, out_dir)
  logging.info('Wrote %d samples to %s (%.2f s per map)', num_samples, out_dir,
               seconds / num_samples)
  return meta

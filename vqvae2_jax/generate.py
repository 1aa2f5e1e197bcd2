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
from collections.abc import Callable, Sequence
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import images as images_lib
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax import workdir as workdir_lib


def sample_labels(num_classes: int, per_class: int,
                  conditional: bool) -> Optional[np.ndarray]:
  """Labels of a sample grid: `per_class` of each class, class by class."""
  if not (conditional and num_classes):
    return None
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


Scorer = Callable[[np.ndarray, Sequence[np.ndarray], Optional[np.ndarray]],
                  np.ndarray]

# samples.png shows at most this many samples per class (codes.npz has all).
_GRID_PER_CLASS = 10


def run_name(config: ml_collections.ConfigDict, vq_step: int,
             prior_steps: Sequence[int], num_samples: int,
             conditional: bool) -> str:
  """The sample run's directory name: checkpoints, seed, controls, count.

  `_g<scale>` (`_g<top>-<bottom>` per level) is added when guidance is on,
  `_c<top>-<bottom>` (a value per level) when sampling.contrast is,
  `_ds<top>-<bottom>` when sampling.discount is (`s`: the squared rule,
  `sampling.discount_logits`; runs named `_d` were drawn by the rule
  before it and are not reused),
  `_keep<k>` when rejection sampling keeps a fraction k < 1, `_raw` when
  the priors' raw weights stand in for their Polyak average
  (sampling.use_polyak False) and `_<dtype>` when the sampler computes in
  sampling.dtype, so other settings write beside the plain run (whose
  name stays that of runs made before these fields).
  """
  s = config.sampling
  keep = float(s.rejection_keep)
  weights = ('' if s.get('use_polyak', True) else '_raw') + (
      f'_{s.dtype}' if s.get('dtype') else '')
  guidance = builders.sampling_guidance(config)
  guided = (f'g{builders.guidance_text(guidance, "-")}_'
            if guidance != 1.0 else '')
  contrast = builders.sampling_contrast(config)
  discount = builders.sampling_discount(config)
  adjusted = (f'c{builders.guidance_text(contrast, "-")}_'
              if any(contrast) else '') + (
                  f'ds{builders.guidance_text(discount, "-")}_'
                  if any(discount) else '')
  return (f'vqvae{vq_step}_prior{"-".join(map(str, prior_steps))}_'
          f'seed{config.seed}_t{s.temperature:g}_k{s.top_k}_p{s.top_p:g}_'
          f'{guided}{adjusted}'
          f'n{num_samples}{"" if conditional else "_uncond"}'
          f'{f"_keep{keep:g}" if keep < 1.0 else ""}{weights}')


def classifier_scorer(config: ml_collections.ConfigDict, workdir: str,
                      mesh: Mesh) -> tuple[Scorer, dict[str, Any]]:
  """Scores candidates with the domain classifier of `workdir`.

  The score of a candidate drawn for class y is p(y | image); of an
  unconditional one (no label), the classifier's confidence max_c p(c |
  image).

  Returns:
    (scorer(images, codes, labels) -> float64 [b], a description of the
    classifier for meta.json: its step and fingerprint).

  Raises:
    FileNotFoundError: no classifier in workdir (the message names
      --mode=classifier).
  """
  classifier = loading.load_classifier(config, workdir, mesh)
  batch_size = int(config.classifier.eval_batch_size)

  def scorer(images, codes, labels):
    del codes  # The classifier looks at the decoded images.
    _, probs = loading.predict_batches(classifier, images, batch_size)
    if labels is None:
      return probs.max(axis=-1)
    return probs[np.arange(len(probs)), labels]

  return scorer, {
      'step': classifier.step,
      'fingerprint': builders.classifier_fingerprint(config)}


def _model_fields(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """What defines the variables of every stage (no provenance)."""
  no_codes = {'step': 0, 'digest': ''}
  return [builders.vqvae_fingerprint(config)] + [
      builders.prior_fingerprint(config, level, no_codes)
      for level in range(builders.num_levels(config))]


def exported_pipeline(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Any) -> Any:
  """The newest workdir/export/*.msgpack when the workdir has no stage-1
  checkpoints (a pipeline downloaded rather than trained), else None.

  Raises:
    errors.ConfigError: the file's model differs from `config`'s.
  """
  wd = workdir_lib.Workdir(workdir)
  if os.path.isdir(workdir_lib.checkpoint_dir(wd.vqvae)):
    return None
  exported = wd.exported_files()
  if not exported:
    return None
  path = exported[-1]
  pipe = api.Pipeline.load(path, mesh=mesh)
  if _model_fields(config) != _model_fields(pipe.config):
    raise errors.ConfigError(
        f'{path} holds a pipeline of another model config than --config. '
        'Fix: pass the config it was trained with (its config is inside: '
        f'vqvae2_jax.Pipeline.load({path!r}).config).')
  logging.info('Using the exported pipeline %s.', path)
  return pipe


def sample_and_save(config: ml_collections.ConfigDict, workdir: str,
                    scorer: Optional[Scorer] = None) -> dict[str, Any]:
  """--mode=sample: samples the hierarchy, decodes, writes grids and codes.

  Writes workdir/samples/<run>/ (into <run>.tmp, renamed when complete)
  with samples.png (a row of at most 10 samples per class when
  conditional, else the first 100), levels.png (what each level
  contributes: every level, then the top levels alone), codes.npz (every
  sample's codes at every level, and the labels) and meta.json. <run> (see
  `run_name`) names the checkpoints' steps, the seed, the controls and the
  number of samples, so a finished run is skipped on rerun and other
  settings never overwrite it.

  Rejection sampling (config.sampling.rejection_keep = k < 1): each
  requested sample gets n = ceil(1 / k) candidates, drawn, decoded and
  scored batch by batch, and each class keeps its best-scoring m of m * n
  (`sampling.TopPerClass`); the score is the domain classifier's p(class |
  image), or its confidence when unconditional. The run also writes
  samples_without_rejection.png (the first candidates of each class) and
  comparison.png (both grids side by side), and meta.json records the
  acceptance rate, the classifier (step, fingerprint) and every kept
  sample's score. With k = 1 the samples are exactly the plain sampler's
  and no classifier is needed.

  Args:
    config: a validated config.
    workdir: reads the stage checkpoints, writes workdir/samples/.
    scorer: (images [b, h, w, c], codes per level [b, h_l, w_l], labels [b]
      or None) -> scores [b]; replaces the domain classifier (tests).

  Returns:
    meta.json's contents: the directory, steps, controls and seconds per map.
  """
  s = config.sampling
  mesh = parallel.create_mesh(config.mesh)
  num_levels = builders.num_levels(config)
  # A workdir holding only --mode=export's file, or its checkpoints: loaded
  # as the API loads them.
  pipe = exported_pipeline(config, workdir, mesh)
  if pipe is None:
    pipe = api.Pipeline.load(workdir, config, mesh=mesh,
                             use_polyak=s.use_polyak, require_priors=True)
  vqvae, vq_variables = pipe.vqvae, pipe.vqvae_variables
  vq_step = pipe.steps['vqvae']
  priors = pipe.priors
  prior_steps = [pipe.steps[f'prior_{l}'] for l in range(num_levels)]
  if s.dtype:  # Converted once, not at every batch.
    priors = [sampling.cast_prior(m, v, s.dtype) for m, v in priors]

  keep = float(s.rejection_keep)
  per_candidate = sampling.candidates_per_sample(keep)
  conditional = bool(s.conditional and config.data.num_classes)
  num_classes = int(config.data.num_classes) if conditional else 0
  per_class = int(s.num_samples_per_class)
  num_samples = per_class * num_classes if conditional else per_class
  name = run_name(config, vq_step, prior_steps, num_samples, conditional)
  out_dir = workdir_lib.Workdir(workdir).samples(name)
  meta_path = os.path.join(out_dir, 'meta.json')
  meta = files.read_json(meta_path)
  if meta is not None:
    console.say('Samples already in %s; nothing to do.', out_dir)
    return meta

  # Before any sampling: a workdir that cannot take the samples fails now.
  files.ensure_writable(os.path.dirname(out_dir), 'samples')
  classifier_info = None
  if per_candidate > 1 and scorer is None:
    # Before any sampling: a missing classifier fails here, naming its mode.
    scorer, classifier_info = classifier_scorer(config, workdir, mesh)
  # Candidates in class order; with one per sample they are the samples.
  candidate_labels = sample_labels(num_classes, per_class * per_candidate,
                                   conditional)
  num_candidates = num_samples * per_candidate
  grid_cols = min(per_class, _GRID_PER_CLASS) if conditional else 10
  grid_per_group = grid_cols if conditional else 10 * grid_cols
  decode = jax.jit(functools.partial(vqvae.apply, method=vqvae.decode_codes))
  selector, unfiltered, seconds = _draw_candidates(
      config, priors, lambda codes: decode(vq_variables, codes), mesh,
      code_bias=pipe.code_bias(builders.sampling_contrast(config)),
      code_discount=pipe.code_discount(builders.sampling_discount(config)),
      labels=candidate_labels, num_candidates=num_candidates,
      per_class=per_class, scorer=scorer,
      shown_per_group=grid_per_group if per_candidate > 1 else 0,
      out_dir=out_dir)
  kept, labels, scores, _ = selector.result()
  codes, images = kept[:num_levels], kept[num_levels]
  view = min(num_samples, 8)
  view_rows = _level_rows(vqvae, vq_variables, images, codes, view)

  meta = {'dir': out_dir, 'vqvae_step': vq_step, 'prior_steps': prior_steps,
          'num_samples': num_samples, 'seconds': seconds,
          'seconds_per_map': seconds / num_samples,
          'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p,
          'guidance': builders.sampling_guidance(config),
          'contrast': builders.sampling_contrast(config),
          'discount': builders.sampling_discount(config),
          'discount_rule': sampling.DISCOUNT_RULE,
          'seed': config.seed,
          'conditional': conditional,
          'rejection_keep': keep}
  if per_candidate > 1:
    meta.update({
        'candidates_per_sample': per_candidate,
        'num_candidates': num_candidates,
        'acceptance_rate': num_samples / num_candidates,
        'scorer': ('domain classifier, p(requested class | image)'
                   if conditional else
                   'domain classifier confidence, max_c p(c | image)')
                  if classifier_info is not None else 'given by the caller',
        'classifier': classifier_info,
        'scores': [float(x) for x in scores]})
  shown = _grid_images(images, labels, grid_per_group)
  before = None
  if per_candidate > 1:
    before = np.concatenate([np.stack(unfiltered[k])
                             for k in sorted(unfiltered)])
  # Every process computed the same samples; process 0 alone writes them,
  # and renames the run's directory when it is complete.
  if jax.process_index() == 0:
    _write_run_whole(out_dir, meta=meta, shown=shown, before=before,
                     levels=np.concatenate(view_rows), view=view,
                     grid_cols=grid_cols, codes=codes,
                     labels=labels if conditional else None)
  if jax.process_count() > 1:  # No process goes on before the files exist.
    multihost_utils.sync_global_devices('samples written')
  console.say('Wrote %d samples to %s (%.2f s per map%s)', num_samples,
               out_dir, seconds / num_samples,
               f', kept {num_samples} of {num_candidates} candidates'
               if per_candidate > 1 else '')
  return meta


def _draw_candidates(config: ml_collections.ConfigDict, priors: Sequence[Any],
                     decode: Callable[[list[Any]], Any], mesh: Mesh, *,
                     labels: Optional[np.ndarray], num_candidates: int,
                     per_class: int, scorer: Optional[Scorer],
                     shown_per_group: int, out_dir: str,
                     code_bias: Sequence[Any] = (),
                     code_discount: Sequence[Any] = ()
                     ) -> tuple[sampling.TopPerClass, dict[int, list[Any]],
                                float]:
  """Draws, decodes and scores the candidates batch by batch.

  Args:
    config: the run's config (its sampling controls and seed).
    priors: (model, variables) per level, top first.
    decode: codes per level -> images.
    mesh: the devices the batches are split over.
    labels: each candidate's class, in class order, or None (unconditional).
    num_candidates: how many maps to draw.
    per_class: samples kept per class (or in all, when unconditional).
    scorer: scores each batch's candidates, or None (all score 0: the
      candidates are the samples).
    shown_per_group: how many of each class's first candidates to keep
      for the grid without rejection (0: none).
    out_dir: the run's directory, named when a preemption stops the loop.
    code_bias: the sampler's logit bias per level (`api.Pipeline.code_bias`
      of sampling.contrast), or ().
    code_discount: its discount per level (`api.Pipeline.code_discount` of
      sampling.discount), or ().

  Returns:
    (the selector holding each class's best-scoring candidates, label ->
    its first candidates' images, the seconds the loop took).

  Raises:
    errors.Preempted: a preemption notice came between two batches (nothing
      is written).
  """
  s = config.sampling
  group_labels = (np.full(num_candidates, -1, np.int32)
                  if labels is None else labels)
  selector = sampling.TopPerClass(
      {int(c): per_class for c in np.unique(group_labels)})
  unfiltered = {}
  # No bigger than needed (rounded up to split over the mesh's devices).
  batch = min(s.batch_size, -(-num_candidates // mesh.size) * mesh.size)
  noun = 'candidates' if shown_per_group else 'maps'
  start = time.time()

  def stop_if_preempted(begin):
    if parallel.preempted():  # A run is written whole or not at all.
      raise errors.Preempted(
          f'sample: stopped by a preemption notice (SIGTERM) after {begin} '
          f'of {num_candidates} maps; nothing was written to {out_dir}. Run '
          'the same command again to sample them.', step=0)

  begin = 0
  stop_if_preempted(begin)
  # The batches are made lazily: a notice stops the loop between two.
  for codes, images in sampling.decoded_batches(
      priors, builders.level_shapes(config), decode,
      num_maps=num_candidates, labels=labels, batch_size=batch,
      rng=jax.random.PRNGKey(config.seed), temperature=s.temperature,
      top_k=s.top_k, top_p=s.top_p, mesh=mesh, unroll=s.unroll,
      guidance=builders.sampling_guidance(config), code_bias=code_bias,
      code_discount=code_discount, step_kernel=s.get('step_kernel', 'xla')):
    n = len(images)
    batch_labels = group_labels[begin:begin + n]
    if scorer is None:
      scores = np.zeros((n,))
    else:
      scores = np.asarray(scorer(
          images, codes, None if labels is None else batch_labels),
                          np.float64).reshape(-1)
    selector.add([*codes, images], batch_labels, scores)
    if shown_per_group:
      for label, image in zip(batch_labels, images):
        shown = unfiltered.setdefault(int(label), [])
        if len(shown) < shown_per_group:
          shown.append(image)
    begin += n
    elapsed = time.time() - start
    logging.info('Sampled %d/%d %s (%.1f s, ETA %.0f s)', begin,
                 num_candidates, noun, elapsed,
                 elapsed / begin * (num_candidates - begin))
    if begin < num_candidates:
      stop_if_preempted(begin)
  return selector, unfiltered, time.time() - start


def _level_rows(vqvae: Any, variables: Any, images: np.ndarray,
                codes: Sequence[np.ndarray], view: int) -> list[np.ndarray]:
  """levels.png's rows: the first `view` samples from every level, then
  decoded from the top l levels alone, for l = L-1 down to 1."""
  decode_levels = jax.jit(
      functools.partial(vqvae.apply, method=vqvae.decode_levels),
      static_argnums=2)
  rows = [images[:view]]
  for keep_levels in range(len(codes) - 1, 0, -1):
    rows.append(parallel.to_host(decode_levels(
        variables, [c[:view] for c in codes], tuple(range(keep_levels)))))
  return rows


def _write_run_whole(out_dir: str, **run: Any) -> None:
  """`_write_run`, leaving no partial copy when the disk fills.

  Raises:
    errors.WorkdirError: the disk filled; the message says how much the run
      needs and that a rerun samples it.
  """
  try:
    _write_run(out_dir, **run)
  except Exception as e:  # pylint: disable=broad-except
    if not files.is_disk_full(e):
      raise
    # The run is written whole or not at all: its partial copy goes.
    shutil.rmtree(out_dir + '.tmp', ignore_errors=True)
    arrays = [*run['codes'], run['shown'], run['levels']]
    if run['before'] is not None:
      arrays.append(run['before'])
    raise files.disk_full_error(
        os.path.dirname(out_dir), e, f'the sample run {out_dir} was not '
        'written (no partial files are left; earlier runs are as they '
        'were) and a rerun samples it again',
        needed=sum(np.asarray(a).nbytes for a in arrays)) from e


def _write_run(out_dir: str, *, meta: dict[str, Any], shown: np.ndarray,
               before: Optional[np.ndarray], levels: np.ndarray, view: int,
               grid_cols: int, codes: Sequence[np.ndarray],
               labels: Optional[np.ndarray]) -> None:
  """Writes a sample run into <out_dir>.tmp and renames it to `out_dir`.

  Args:
    out_dir: the run's directory (absent until the rename).
    meta: meta.json's contents.
    shown: the images of samples.png; `before`: those of
      samples_without_rejection.png (and comparison.png), or None without
      rejection sampling.
    levels: the rows of levels.png, `view` images each.
    grid_cols: images per row of the sample grids.
    codes: every sample's codes per level, top first.
    labels: the samples' labels (conditional runs), else None.
  """
  tmp_dir = out_dir + '.tmp'
  if os.path.exists(tmp_dir):
    shutil.rmtree(tmp_dir)
  os.makedirs(tmp_dir)
  images_lib.write_image_grid(os.path.join(tmp_dir, 'samples.png'), shown,
                              grid_cols)
  if before is not None:
    images_lib.write_image_grid(
        os.path.join(tmp_dir, 'samples_without_rejection.png'), before,
        grid_cols)
    images_lib.write_side_by_side(os.path.join(tmp_dir, 'comparison.png'),
                                  images_lib.image_grid(before, grid_cols),
                                  images_lib.image_grid(shown, grid_cols))
  images_lib.write_image_grid(os.path.join(tmp_dir, 'levels.png'), levels,
                              view)
  writer = console.create_writer(tmp_dir)  # The grids in TensorBoard too.
  writer.write_images(0, {
      'samples': images_lib.image_grid(shown, grid_cols)[None],
      'levels': images_lib.image_grid(levels, view)[None]})
  writer.close()
  arrays = {f'codes_{l}': c for l, c in enumerate(codes)}
  if labels is not None:
    arrays['labels'] = labels
  np.savez(os.path.join(tmp_dir, 'codes.npz'), **arrays)
  files.write_json(os.path.join(tmp_dir, 'meta.json'), meta)
  os.rename(tmp_dir, out_dir)


def read_run(run_dir: str, num_levels: int
             ) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
  """A finished sample run's codes.npz.

  Returns:
    (every sample's codes per level [n, h_l, w_l], top first; the labels [n]
    of a conditional run, else None).

  Raises:
    KeyError: the run holds fewer than `num_levels` levels.
  """
  with np.load(os.path.join(run_dir, 'codes.npz')) as data:
    codes = [data[f'codes_{l}'] for l in range(num_levels)]
    labels = data['labels'] if 'labels' in data else None
  return codes, labels


def sampled_codes(config: ml_collections.ConfigDict, workdir: str
                  ) -> tuple[list[np.ndarray], Optional[np.ndarray],
                             dict[str, Any]]:
  """The samples of the run `config` names: reused when finished, else
  drawn and written (`sample_and_save`).

  Returns:
    (every sample's codes per level [n, h_l, w_l], top first; their labels
    [n] or None when unconditional; the run's meta.json).
  """
  meta = sample_and_save(config, workdir)
  codes, labels = read_run(meta['dir'], builders.num_levels(config))
  return codes, labels, meta


def _grid_images(images: np.ndarray, labels: np.ndarray, per_group: int
                 ) -> np.ndarray:
  """The first `per_group` images of each label, label by label."""
  return np.concatenate([images[labels == k][:per_group]
                         for k in np.unique(labels)])

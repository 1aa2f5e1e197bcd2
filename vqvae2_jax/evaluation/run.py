r"""--mode=eval: how good are the reconstructions, the priors and the samples.

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=eval

Loads what the workdir holds (stage 1, the priors, sample runs, and the
domain classifier of --mode=classifier unless the judge is the ruler; or,
in a workdir holding only --mode=export's file under export/, that
pipeline, as --mode=sample reads it) and writes workdir/eval/report.json
and report.md:

- reconstructions of the held-out split: MSE and PSNR (also over the
  dataset's original area, e.g. the 28x28 centre of padded Fashion-MNIST),
  per-level code usage and perplexity, rFID (reconstructions vs originals);
- priors: bits per code per level, held-out and train split (from their
  metrics.json; of an exported file, the held-out bits measured here);
- samples (config.eval.num_samples, drawn with config.sampling's controls,
  classes balanced; a finished sample run of the same settings is reused):
  FID, KID, Inception Score, improved precision and recall, and class
  agreement, against the held-out split;
- the real-vs-real floor: as many training images as samples, scored the
  same way against the held-out split;
- with config.eval.cas: the Classification Accuracy Score, a classifier
  trained on samples only, beside one trained on reconstructions and the
  domain classifier trained on real data, all tested on the held-out split.

The ruler (config.eval.features): 'judge', a fixed network shipped with the
package for the dataset (Fashion-MNIST's default; `evaluation.judges`, its
sha256 checked), gives both the features (FID, KID, precision/recall) and
the class probabilities (IS, class agreement), and is never the network
that scored rejection candidates. Otherwise the probabilities come from the
workdir's domain classifier, and the features from it ('classifier') or
from FID's Inception-v3 ('inception', config.eval.inception_weights).
'auto' is the judge where one ships for the data and its image size, else
the domain classifier (`judges.ruler`).
"""

from collections.abc import Callable, Iterator, Mapping
import functools
import hashlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import generate
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import layout
from vqvae2_jax.evaluation import judges
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import real_features as real_features_lib
from vqvae2_jax.evaluation import reconstruction
from vqvae2_jax.models import classifier as classifier_lib

# Held-out features kept for KID and precision/recall (ImageNet's 50,000 x
# 2048 Inception features: 800 MB in float64).
MAX_REAL_FEATURES = 50_000

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Trains a classifier on in-memory examples and scores the held-out split
# (the CAS recipe): (config, directory, images, labels, *, name, provenance,
# mesh) -> final metrics; `train.classifier_trainer.train_on_arrays`.
TrainClassifier = Callable[..., dict[str, Any]]


def feature_fn(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh
                ) -> tuple[FeatureFn, dict[str, Any]]:
  """The eval's ruler (config.eval.features) and what it is.

  'judge': the shipped judge of config.data.name gives features and
  probabilities, and the workdir's domain classifier is not needed.
  'classifier' and 'inception': the domain classifier gives the
  probabilities, and its own or Inception-v3's pool features the features.

  Returns:
    (images [n, h, w, c] in [-1, 1] -> (features float64 [n, d],
    probabilities float64 [n, C]), a description for the report: the
    features' name, and the judge (name, digest) or the classifier's step
    and fingerprint).

  Raises:
    judges.JudgeFileError: the judge's file is missing or not the shipped
      one.
  """
  batch = int(config.eval.batch_size)
  ruler = judges.config_ruler(config)
  if ruler == 'judge':
    return _judge_fn(config.data.name, batch)

  classifier = loading.load_classifier(config, workdir, mesh)
  about = {'classifier_step': classifier.step,
           'classifier_fingerprint': builders.classifier_fingerprint(config)}

  def classify(images):
    return loading.predict_batches(classifier, images, batch)

  if ruler == 'classifier':
    about['features'] = 'domain classifier (pooled, %d-d)' % (
        classifier.model.width * 2**(len(classifier.model.stage_sizes) - 1))
    return classify, about

  from vqvae2_jax.models import inception  # pylint: disable=g-import-not-at-top
  net, variables = inception.load_fid_inception(config.eval.inception_weights)
  pool = jax.jit(lambda v, x: net.apply(v, x))
  about['features'] = 'Inception-v3 pool3 (2048-d, FID weights)'

  def both(images):
    feats = [np.asarray(pool(variables, jnp.asarray(images[i:i + batch])),
                        np.float64) for i in range(0, len(images), batch)]
    return np.concatenate(feats), classify(images)[1]

  return both, about


def judge_program(module: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Jitted (variables, images) -> (the judge's features, its softmax), in
  full float32 on every backend (`classifier.features_and_probabilities`).
  """
  return jax.jit(functools.partial(classifier_lib.features_and_probabilities,
                                   module))


def _judge_fn(dataset: str, batch: int) -> tuple[FeatureFn, dict[str, Any]]:
  """The shipped judge's features and softmax, its digest checked."""
  module, variables, spec = judges.load(dataset)
  apply = judge_program(module)

  def judge(images):
    out = [jax.device_get(apply(variables, jnp.asarray(images[i:i + batch])))
           for i in range(0, len(images), batch)]
    return tuple(np.concatenate([o[k] for o in out]).astype(np.float64)
                 for k in (0, 1))

  about = {'features': f'judge (pooled, {spec.widths[-1]}-d)',
           'judge': spec.describe(), 'judge_sha256': spec.sha256,
           'judge_test_accuracy': spec.test_accuracy}
  return judge, about


def real_batches(config: ml_collections.ConfigDict, mesh: Mesh, split: str,
                  limit: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, jax.Array]]:
  """(images, labels) on the host plus the sharded batch, padding dropped."""
  # tf.data reads them: imported here, so that evaluating against a saved
  # real-features file needs no TensorFlow.
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  seen = 0
  for batch in input_pipeline.create_eval_iterator(
      config.data, split=split, global_batch_size=config.eval.batch_size,
      mesh=mesh):
    mask = np.asarray(parallel.to_host(batch['mask']))
    images = np.asarray(parallel.to_host(batch['image']))[mask]
    labels = np.asarray(parallel.to_host(batch['label']))[mask]
    if limit is not None:
      images, labels = images[:limit - seen], labels[:limit - seen]
    seen += len(images)
    yield images, labels, batch
    if limit is not None and seen >= limit:
      return


def held_out_stats(config: ml_collections.ConfigDict, mesh: Mesh,
                   features: FeatureFn) -> metrics_lib.FeatureStats:
  """Features and probabilities of the whole held-out split."""
  real = metrics_lib.FeatureStats(max_features=MAX_REAL_FEATURES)
  for images, _, _ in real_batches(config, mesh, config.data.eval_split):
    real.add(*features(images))
  return real


def floor_stats(config: ml_collections.ConfigDict, mesh: Mesh,
                features: FeatureFn, n: int) -> metrics_lib.FeatureStats:
  """The real-vs-real floor's features: the first `n` training images."""
  logging.info('Eval: real-vs-real floor (%d training images)', n)
  floor = metrics_lib.FeatureStats(max_features=n)
  for images, _, _ in real_batches(config, mesh, config.data.train_split,
                                    limit=n):
    floor.add(*features(images))
  return floor


def _reconstruction_pass(config, mesh, vqvae, variables, features: FeatureFn,
                         max_features: int):
  """One pass over the held-out split: originals, reconstructions, metrics.

  Keeps up to `max_features` of the originals' features (KID and
  precision/recall need them); of the reconstructions only the moments.
  """
  area = layout.original_area(config.data)

  def recon_fn(variables, images, mask):
    recon, aux = vqvae.apply(variables, images, train=False)
    sums = reconstruction.batch_sums(images, recon, aux['codes'], mask,
                                     vqvae.num_embeddings, area)
    return recon, sums

  recon_fn = jax.jit(recon_fn)
  real = metrics_lib.FeatureStats(max_features=max_features)
  recon_stats = metrics_lib.FeatureStats()
  labels, total = [], None
  for images, batch_labels, batch in real_batches(
      config, mesh, config.data.eval_split):
    recon, sums = recon_fn(variables, batch['image'], batch['mask'])
    mask = np.asarray(parallel.to_host(batch['mask']))
    recon = np.clip(np.asarray(parallel.to_host(recon), np.float32)[mask],
                    -1.0, 1.0)
    total = reconstruction.add_sums(total, sums)
    real.add(*features(images))
    recon_stats.add(*features(recon))
    labels.append(batch_labels)
  return real, recon_stats, np.concatenate(labels), reconstruction.summarize(
      total)


def sample_metrics(config: ml_collections.ConfigDict, real: metrics_lib.FeatureStats,
            fake: metrics_lib.FeatureStats,
            requested: np.ndarray | None) -> dict[str, float]:
  """FID, KID, IS, precision/recall (and class agreement) of `fake`.

  Args:
    config: its eval section sets KID subsets and the k of precision/recall.
    real: the reference set's features (kept, not only moments).
    fake: the samples' features and probabilities.
    requested: the classes the samples were drawn for, or None.
  """
  e = config.eval
  kid = metrics_lib.kid(real.features, fake.features,
                        num_subsets=e.kid_subsets,
                        subset_size=e.kid_subset_size, seed=config.seed)
  # Samples come class by class: shuffled, so no split holds one class.
  inception_score = metrics_lib.inception_score(fake.probs,
                                                shuffle_seed=config.seed)
  pr = metrics_lib.precision_recall(real.features, fake.features,
                                    k=e.precision_recall_k)
  out = {'num_examples': fake.count, 'fid': metrics_lib.fid(real, fake),
         'kid': kid.mean, 'kid_std': kid.std,
         'inception_score': inception_score.mean,
         'inception_score_std': inception_score.std,
         'precision': pr.precision, 'recall': pr.recall}
  if requested is not None:
    out['class_agreement'] = metrics_lib.class_agreement(fake.probs,
                                                         requested)
  return out


def sample_images(config: ml_collections.ConfigDict, workdir: str,
                  num_samples: int, mesh: Mesh, vqvae, variables
                  ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
  """`num_samples` decoded samples (classes balanced when conditional).

  A sample run of these settings (--mode=sample's directory naming) is
  reused when finished, and written otherwise.

  Returns:
    (images float32 [n, h, w, c] in [-1, 1], requested labels int32 [n] or
    None, the run's meta.json).
  """
  num_classes = int(config.data.num_classes)
  conditional = bool(config.sampling.conditional and num_classes)
  per_class = math.ceil(num_samples / num_classes) if conditional else (
      num_samples)
  run_config = config.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.sampling.num_samples_per_class = per_class
  codes, labels, meta = generate.sampled_codes(run_config, workdir)
  decode = jax.jit(functools.partial(vqvae.apply, method=vqvae.decode_codes))
  batch = max(int(config.eval.batch_size) // mesh.size, 1) * mesh.size
  images = []
  for begin in range(0, len(codes[0]), batch):
    chunk = [c[begin:begin + batch] for c in codes]
    images.append(np.clip(np.asarray(decode(variables, chunk), np.float32),
                          -1.0, 1.0))
  images = np.concatenate(images)
  if labels is not None and len(images) > num_samples:
    order = balanced_subset(per_class, num_classes, num_samples)
    images, labels = images[order], labels[order]
  return images[:num_samples], (None if labels is None
                                else labels[:num_samples]), meta


def balanced_subset(per_class: int, num_classes: int,
                    num_samples: int) -> np.ndarray:
  """Which `num_samples` of a class-by-class draw of `per_class` each to keep.

  The first of each class, in turn, so that the classes stay balanced when
  `num_samples` is not a multiple of `num_classes`.
  """
  return np.argsort(np.tile(np.arange(per_class), num_classes),
                    kind='stable')[:num_samples]


def pipeline_samples(pipe: Any, num_samples: int, features: FeatureFn, *,
                     rng: jax.Array, temperature: float, top_k: int,
                     top_p: float, guidance: float | tuple[float, ...],
                     contrast: float | tuple[float, ...] = 0.0,
                     discount: float | tuple[float, ...] = 0.0
                     ) -> tuple[metrics_lib.FeatureStats, np.ndarray | None,
                                list[np.ndarray]]:
  """`num_samples` samples of a loaded `api.Pipeline`, drawn as --mode=eval
  draws them, and their features.

  Classes balanced as `sample_images` balances them (ceil(n / classes) of
  each drawn class by class, the first of each kept in turn), in batches of
  config.sampling.batch_size as --mode=sample makes them (batch i from
  `fold_in(rng, i)`), so that the config's seed, controls, guidance and
  contrast (`api.Pipeline.code_bias`) and discount
  (`api.Pipeline.code_discount`) give
  --mode=eval's samples (from the pipeline's weights as loaded, computing
  in config.sampling.dtype where set). The plain sampler: no rejection.

  Returns:
    (their features and probabilities, the requested labels [n] or None
    when unconditional, their codes per level [n, h_l, w_l], top first).
  """
  config, mesh = pipe.config, pipe.mesh
  num_classes = int(config.data.num_classes)
  conditional = bool(config.sampling.conditional and num_classes)
  per_class = math.ceil(num_samples / num_classes) if conditional else (
      num_samples)
  labels = generate.sample_labels(num_classes, per_class, conditional)
  num_maps = num_samples if labels is None else len(labels)
  batch = min(int(config.sampling.batch_size),
              -(-num_maps // mesh.size) * mesh.size)
  priors = pipe.priors
  if config.sampling.dtype:  # As --mode=sample draws (`generate`).
    priors = [sampling.cast_prior(m, v, config.sampling.dtype)
              for m, v in priors]
  progress = console.Progress('Evaluate', 0, num_maps, unit='sample')
  feats, probs, codes, done = [], [], [], 0
  try:
    for batch_codes, images in sampling.decoded_batches(
        priors, pipe.level_shapes,
        lambda c: jnp.clip(jnp.asarray(pipe.decode(c)), -1.0, 1.0),
        num_maps=num_maps, labels=labels, batch_size=batch, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, mesh=mesh,
        unroll=config.sampling.unroll,
        guidance=guidance if conditional else 1.0,
        code_bias=pipe.code_bias(contrast),
        code_discount=pipe.code_discount(discount),
        step_kernel=config.sampling.get('step_kernel', 'xla')):
      f, p = features(np.asarray(images, np.float32))
      feats.append(f)
      probs.append(p)
      codes.append(batch_codes)
      done += len(images)
      progress.update(done, {})
  finally:
    progress.close()
  order = (balanced_subset(per_class, num_classes, num_samples)
           if num_maps > num_samples else np.arange(num_samples))
  stats = metrics_lib.FeatureStats(max_features=num_samples)
  stats.add(np.concatenate(feats)[order], np.concatenate(probs)[order])
  codes = [np.concatenate(level)[order] for level in zip(*codes)]
  return stats, None if labels is None else labels[order], codes


RULERS = ('auto', 'judge', 'classifier', 'inception')  # config.eval.features


def _pipeline_ruler(pipe: Any, features: str | None
                    ) -> tuple[ml_collections.ConfigDict, FeatureFn,
                               dict[str, Any]]:
  """(the config with the ruler `features` set, its FeatureFn, what it is)
  for a loaded pipeline; `features` None keeps the config's.

  Raises:
    errors.ConfigError: an unknown ruler, or one that needs the domain
      classifier for a pipeline without a workdir (a file).
  """
  config = pipe.config
  if features is not None:
    if features not in RULERS:
      raise errors.ConfigError(
          f'features is {features!r}. Fix: one of {", ".join(RULERS)} (see '
          'config.eval.features).')
    config = config.copy_and_resolve_references()
    config.eval.features = features
  ruler = judges.config_ruler(config)
  if ruler != 'judge' and pipe.workdir is None:
    raise errors.ConfigError(
        f'The ruler is {ruler!r}, which takes the class probabilities from '
        'the domain classifier of a workdir, and this pipeline was loaded '
        'from a file, which holds none. Fix: evaluate(features=\'judge\') '
        'where a judge ships for the data, or load the workdir instead.')
  features_of, about = feature_fn(config, pipe.workdir, pipe.mesh)
  return config, features_of, about


def _real_header(config: ml_collections.ConfigDict,
                 about: Mapping[str, Any]) -> dict[str, Any]:
  """What a real-features file records of the ruler and the data."""
  return {'dataset': config.data.name,
          'held_out_split': config.data.eval_split,
          'floor_split': config.data.train_split, **about}


def write_real_features(pipe: Any, path: str, num_floor: int, *,
                        features: str | None = None) -> dict[str, Any]:
  """`api.Pipeline.write_real_features`: the ruler's outputs for the whole
  held-out split and the first `num_floor` training images, batch by batch
  as `evaluate_pipeline` scores them, written to `path`
  (`real_features.write`). Returns the file's header."""
  config, features_of, about = _pipeline_ruler(pipe, features)
  header = _real_header(config, about)
  parts = {}
  logging.info('Real features: held-out split')
  record, parts['held_out'] = real_features_lib.recorder(features_of)
  held_out_stats(config, pipe.mesh, record)
  record, parts['floor'] = real_features_lib.recorder(features_of)
  floor_stats(config, pipe.mesh, record, num_floor)
  if jax.process_index() == 0:  # Every process computed the same.
    real_features_lib.write(path, header, parts)
  return {**header, 'held_out_examples': sum(len(f) for f, _ in
                                              parts['held_out']),
          'floor_examples': sum(len(f) for f, _ in parts['floor'])}


def evaluate_pipeline(pipe: Any, num_samples: int, *, rng: jax.Array,
                      temperature: float, top_k: int, top_p: float,
                      guidance: float | tuple[float, ...],
                      contrast: float | tuple[float, ...] = 0.0,
                      discount: float | tuple[float, ...] = 0.0,
                      features: str | None = None,
                      real_features: str | None = None) -> dict[str, Any]:
  """`api.Pipeline.evaluate`: the sample section of --mode=eval's report
  for a loaded pipeline (a workdir's, an exported file's or a shipped one).

  The ruler (`features`, else config.eval.features: the judge, or the
  domain classifier, which needs the pipeline's workdir) scores
  `pipeline_samples` and as many training images (the real-vs-real floor)
  against the whole held-out split; the real images' side comes from the
  file `real_features` where given (`write_real_features`), else from the
  dataset.

  Raises:
    errors.ConfigError: an unknown ruler, or one that needs the domain
      classifier for a pipeline without a workdir (a file).
    real_features_lib.RealFeaturesError: a file of another ruler or data,
      or with fewer floor images than `num_samples`.
  """
  start = time.time()
  mesh = pipe.mesh
  config, features_of, about = _pipeline_ruler(pipe, features)
  if real_features is not None:
    logging.info('Evaluate: real images from %s', real_features)
    real, floor = real_features_lib.load(
        real_features, _real_header(config, about), num_samples,
        MAX_REAL_FEATURES)
  else:
    logging.info('Evaluate: held-out split (features)')
    real = held_out_stats(config, mesh, features_of)
    floor = floor_stats(config, mesh, features_of, num_samples)
  fake, labels, _ = pipeline_samples(
      pipe, num_samples, features_of, rng=rng, temperature=temperature,
      top_k=top_k, top_p=top_p, guidance=guidance, contrast=contrast,
      discount=discount)
  return {
      **about, 'held_out_split': config.data.eval_split,
      'held_out_examples': real.count,
      'samples': {**sample_metrics(config, real, fake, labels),
                  'temperature': temperature, 'top_k': top_k,
                  'top_p': top_p,
                  'guidance': guidance if labels is not None else 1.0,
                  'contrast': contrast, 'discount': discount,
                  'conditional': labels is not None},
      'real_vs_real': {**sample_metrics(config, real, floor, None),
                       'split': config.data.train_split},
      'seconds': time.time() - start}


def _cas(config, workdir, mesh, vqvae, variables, domain_metrics,
         train_classifier: TrainClassifier):
  """Classification Accuracy Score: train on samples, test on real data."""
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  e = config.eval
  num_classes = int(config.data.num_classes)
  train_count = input_pipeline.num_examples(config.data,
                                            config.data.train_split)
  per_class = int(e.cas_samples_per_class) or math.ceil(train_count /
                                                         num_classes)
  images, labels, meta = sample_images(
      config, workdir, per_class * num_classes, mesh, vqvae, variables)
  wd = workdir_lib.Workdir(workdir)
  rows = {'real': {'accuracy': domain_metrics.get('eval/accuracy'),
                   'top5_accuracy': domain_metrics.get('eval/top5_accuracy'),
                   'train_examples': train_count}}
  run = os.path.basename(meta['dir'])
  samples = train_classifier(
      config, wd.cas('samples', run), images, labels,
      name='CAS classifier on samples', provenance={'sample_run': run},
      mesh=mesh)
  rows['samples'] = {'accuracy': samples['eval/accuracy'],
                     'top5_accuracy': samples['eval/top5_accuracy'],
                     'train_examples': len(images)}
  # Reconstructions of the training split, as many as the samples.
  recon_fn = jax.jit(lambda v, x: vqvae.apply(v, x, train=False)[0])
  recons, recon_labels = [], []
  for real_images, real_labels, batch in real_batches(
      config, mesh, config.data.train_split, limit=len(images)):
    mask = np.asarray(parallel.to_host(batch['mask']))
    recon = np.asarray(parallel.to_host(recon_fn(variables, batch['image'])))
    recons.append(np.clip(recon[mask][:len(real_images)], -1.0, 1.0))
    recon_labels.append(real_labels)
  recon_result = train_classifier(
      config, wd.cas('reconstructions'),
      np.concatenate(recons), np.concatenate(recon_labels),
      name='CAS classifier on reconstructions',
      provenance={'reconstructions_of': config.data.train_split}, mesh=mesh)
  rows['reconstructions'] = {
      'accuracy': recon_result['eval/accuracy'],
      'top5_accuracy': recon_result['eval/top5_accuracy'],
      'train_examples': int(sum(len(r) for r in recons))}
  return rows


def _prior_rows(config: ml_collections.ConfigDict, workdir: str
                ) -> dict[str, Any]:
  rows = {}
  for level in range(builders.num_levels(config)):
    prior_dir = workdir_lib.Workdir(workdir).prior(level)
    m = files.read_json(workdir_lib.metrics_json(prior_dir))
    if m is None:
      raise errors.MissingStageError(
          f'No finished prior of level {level} in '
          f'{prior_dir}. Fix: run --mode=prior with '
          'the same --workdir first.')
    rows[f'level_{level}'] = {
        'held_out_bits_per_code': m.get('eval/bits_per_code'),
        'train_bits_per_code': m.get('eval_train/bits_per_code'),
        'uniform_bits_per_code': m.get('baseline/uniform_bits_per_code'),
        'step': m.get('step')}
  return rows


def _exported_prior_rows(config: ml_collections.ConfigDict, pipe: Any
                         ) -> dict[str, Any]:
  """`_prior_rows` of an exported pipeline (no training metrics): its
  priors' held-out bits per code, the held-out split encoded by its VQ-VAE
  and scored with the true labels where the data has classes."""
  num_classes = int(config.data.num_classes)
  bits, count = 0.0, 0
  for images, labels, _ in real_batches(config, pipe.mesh,
                                        config.data.eval_split):
    bits = bits + pipe.log_prob_codes(
        pipe.encode(images), labels if num_classes else None).sum(axis=1)
    count += len(images)
  uniform = math.log2(int(config.model.num_embeddings))
  return {f'level_{level}': {
      'held_out_bits_per_code': float(bits[level]) / count / math.prod(
          pipe.level_shapes[level]),
      'train_bits_per_code': None, 'uniform_bits_per_code': uniform,
      'step': pipe.steps[f'prior_{level}']}
          for level in range(len(pipe.priors))}


def report_inputs(config: ml_collections.ConfigDict, workdir: str
                  ) -> dict[str, Any]:
  """What a report was computed from: the config and each stage's last step.

  Reads small files only. The config's digest leaves out eval.force (which
  asks for a new report, not another one); the steps are those of the
  finished stages' metrics.json (None where a stage has none). Fields
  added since reports were first written leave the digest unchanged at
  their defaults (sampling.guidance 1.0, guidance_per_level (), contrast
  (), discount ()), so older reports stay current.
  """
  settings = config.to_dict()
  settings.get('eval', {}).pop('force', None)
  sampling = settings.get('sampling', {})
  if sampling.get('guidance', 1.0) == 1.0:
    sampling.pop('guidance', None)
  if not sampling.get('guidance_per_level', ()):
    sampling.pop('guidance_per_level', None)
  for name in ('contrast', 'discount'):
    if not sampling.get(name, ()):
      sampling.pop(name, None)
  text = json.dumps(files.normalise_json(settings), sort_keys=True)
  wd = workdir_lib.Workdir(workdir)
  stage_dirs = {'vqvae': wd.vqvae, 'classifier': wd.classifier}
  stage_dirs.update({f'prior_{level}': wd.prior(level)
                     for level in range(builders.num_levels(config))})
  steps = {}
  for name, directory in stage_dirs.items():
    metrics = files.read_json(workdir_lib.metrics_json(directory))
    steps[name] = None if metrics is None else metrics.get('step')
  inputs = {'config_sha256': hashlib.sha256(text.encode()).hexdigest(),
            'stage_steps': steps}
  exported = wd.exported_files()
  if exported and not os.path.isdir(workdir_lib.checkpoint_dir(wd.vqvae)):
    # A workdir of an exported pipeline only (`generate.exported_pipeline`).
    inputs['exported_pipeline'] = {
        'file': os.path.basename(exported[-1]),
        'sha256': files.sha256_file(exported[-1])}
  return inputs


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             train_classifier: TrainClassifier | None = None
             ) -> dict[str, Any]:
  """--mode=eval: writes workdir/eval/report.json and report.md.

  A report already there for the same config and the same finished stages
  (`report_inputs`) is read, not computed again, so a finished workdir can
  be evaluated on read-only storage; config.eval.force computes it again.

  Args:
    config: a validated config.
    workdir: holds vqvae/, prior_<i>/ and classifier/ of finished stages.
    train_classifier: how CAS trains its classifiers (`stages` passes
      `train.classifier_trainer.train_on_arrays`); needed only with
      config.eval.cas.

  Returns:
    The report (as report.json).

  Raises:
    errors.MissingStageError: a stage the report needs has not run; the
      message names the --mode that makes it.
  """
  if config.eval.cas and train_classifier is None:
    raise errors.ConfigError(
        'config.eval.cas trains classifiers, and evaluate() was given no '
        'train_classifier. Fix: run --mode=eval (or stages.evaluate), or pass '
        'train_classifier=train.classifier_trainer.train_on_arrays.')
  start = time.time()
  mesh = parallel.create_mesh(config.mesh)
  wd = workdir_lib.Workdir(workdir)
  out_dir = wd.eval
  # A workdir holding only --mode=export's file (as --mode=sample reads it).
  exported = generate.exported_pipeline(config, workdir, mesh)
  if exported is None:
    priors = _prior_rows(config, workdir)  # Reads only; names what's missing.
  elif len(exported.priors) < builders.num_levels(config):
    raise errors.MissingStageError(
        f'The exported pipeline in {wd.export} has no priors to sample. Fix: '
        'export a workdir with trained priors (--mode=export).')
  # Then the ruler: a damaged judge or weights file is refused even where a
  # report exists, and the report must be of this ruler.
  features, about = feature_fn(config, workdir, mesh)
  inputs = report_inputs(config, workdir)
  try:
    done = files.read_json(wd.report_json)
  except ValueError:  # A damaged report is computed again.
    done = None
  if (done is not None and done.get('inputs') == files.normalise_json(inputs)
      and all(done.get(k) == v
              for k, v in files.normalise_json(about).items())
      and not config.eval.get('force', False)):
    console.say('Evaluation report in %s is up to date (nothing to do; '
                '--config.eval.force=True computes it again)', out_dir)
    for line in summary_lines(done, out_dir):
      console.say('%s', line)
    return done
  files.ensure_writable(out_dir, 'the evaluation report')
  if exported is None:
    vqvae, variables, vq_step = loading.load_vqvae(config, workdir, mesh)
  else:
    vqvae, variables = exported.vqvae, exported.vqvae_variables
    vq_step = exported.steps['vqvae']
    logging.info('Eval: the priors\' held-out bits per code')
    priors = _exported_prior_rows(config, exported)
  n = int(config.eval.num_samples)
  s = config.sampling

  logging.info('Eval: held-out split (reconstructions, features)')
  real, recon, _, recon_metrics = _reconstruction_pass(
      config, mesh, vqvae, variables, features,
      max_features=MAX_REAL_FEATURES)
  recon_metrics['rfid'] = metrics_lib.fid(real, recon)

  floor = floor_stats(config, mesh, features, n)

  logging.info('Eval: %d samples', n)
  images, labels, meta = sample_images(config, workdir, n, mesh, vqvae,
                                       variables)
  sample_stats = metrics_lib.FeatureStats(max_features=n)
  sample_stats.add(*features(images))

  report = {
      'workdir': wd.root, 'vqvae_step': vq_step, **about,
      'held_out_split': config.data.eval_split,
      'held_out_examples': real.count,
      'reconstructions': recon_metrics,
      'priors': priors,
      'samples': {**sample_metrics(config, real, sample_stats, labels),
                  'sample_run': meta['dir'], 'temperature': s.temperature,
                  'top_k': s.top_k, 'top_p': s.top_p,
                  'guidance': meta.get('guidance', 1.0),
                  'contrast': meta.get('contrast', ()),
                  'discount': meta.get('discount', ()),
                  'conditional': labels is not None},
      'real_vs_real': {**sample_metrics(config, real, floor, None),
                       'split': config.data.train_split},
      'held_out_inception_score': metrics_lib.inception_score(
          real.probs).mean,
  }
  if config.eval.cas:
    domain = files.read_json(workdir_lib.metrics_json(wd.classifier)) or {}
    report['cas'] = _cas(config, workdir, mesh, vqvae, variables, domain,
                         train_classifier)
  report['seconds'] = time.time() - start
  report['inputs'] = inputs
  if jax.process_index() == 0:
    markdown = report_markdown(report).encode()
    try:
      # report.md first: report.json marks the report done (`inputs`).
      files.atomic_write(wd.report_md, lambda f: f.write(markdown))
      files.write_json(wd.report_json, report)
    except OSError as e:
      if not files.is_disk_full(e):
        raise
      raise files.disk_full_error(
          out_dir, e, 'report.json was not written (an earlier one is as it '
          'was) and a rerun computes the report again',
          needed=len(markdown) + len(json.dumps(
              files.normalise_json(report), indent=2))) from e
  logging.info('Eval report in %s:\n%s', out_dir, report_markdown(report))
  for line in summary_lines(report, out_dir):
    console.say('%s', line)
  return report


def summary_lines(report: Mapping[str, Any], out_dir: str) -> list[str]:
  """A few lines of the report's key figures, for the console."""
  lines = []
  s = report.get('samples') or {}
  floor = report.get('real_vs_real') or {}
  names = (('fid', 'FID'), ('kid', 'KID'), ('inception_score', 'IS'),
           ('precision', 'precision'), ('recall', 'recall'))
  if s:
    lines.append('Samples: ' + ', '.join(
        f'{label} {_fmt(s.get(key))} (floor {_fmt(floor.get(key))})'
        for key, label in names if key in s))
    if s.get('class_agreement') is not None:
      lines[-1] += f', class agreement {_fmt(s["class_agreement"])}'
  r = report.get('reconstructions') or {}
  if r:
    lines.append('Reconstructions: ' + ', '.join(
        f'{label} {_fmt(r[key])}' for key, label in (
            ('psnr', 'PSNR'), ('psnr_area', 'PSNR original area'),
            ('rfid', 'rFID')) if key in r))
  lines.append(f'Report: {os.path.join(out_dir, "report.md")}')
  return lines


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.{digits}g}'
  return str(value)


def report_markdown(report: Mapping[str, Any]) -> str:
  """The report as Markdown tables (what report.md holds)."""
  r = report['reconstructions']
  lines = [
      '# Evaluation report', '',
      f'Workdir `{report["workdir"]}`, VQ-VAE step {report["vqvae_step"]}, '
      f'features: {report["features"]}; held-out split '
      f'`{report["held_out_split"]}` ({int(report["held_out_examples"])} '
      'images).', '']
  if report.get('judge'):
    lines += [f'Ruler of the sample metrics: the {report["judge"]}.', '']
  lines += [
      '## Reconstructions (held-out split)', '',
      '| metric | value |', '|---|---|',
      f'| MSE, pixels in [-1, 1], whole image | {_fmt(r["mse"])} |',
      f'| PSNR, whole image (dB) | {_fmt(r["psnr"])} |']
  if 'psnr_area' in r:
    lines += [f'| MSE, pixels in [0, 1], original area | '
              f'{_fmt(r["mse01_area"])} |',
              f'| PSNR, original area (dB) | {_fmt(r["psnr_area"])} |']
  level = 0
  while f'used_fraction_level{level}' in r:
    lines.append(f'| level {level}: codes used / perplexity | '
                 f'{r[f"used_fraction_level{level}"]:.1%} / '
                 f'{r[f"perplexity_level{level}"]:.1f} |')
    level += 1
  lines += [f'| rFID (reconstructions vs originals) | {_fmt(r["rfid"])} |',
            '', '## Priors (bits per code)', '',
            '| level | held-out | train split | uniform |', '|---|---|---|---|']
  for name, p in report['priors'].items():
    lines.append(f'| {name} | {_fmt(p["held_out_bits_per_code"])} | '
                 f'{_fmt(p["train_bits_per_code"])} | '
                 f'{_fmt(p["uniform_bits_per_code"])} |')
  s, f = report['samples'], report['real_vs_real']
  lines += [
      '', '## Samples vs the held-out split', '',
      f'Samples: {int(s["num_examples"])} at temperature {s["temperature"]}, '
      f'top-k {s["top_k"]}, top-p {s["top_p"]}, '
      + (f'guidance {builders.guidance_text(s["guidance"])}, '
         if s.get('guidance', 1.0) != 1.0 else '')
      + (f'contrast {builders.guidance_text(s["contrast"])}, '
         if any(s.get('contrast', ())) else '')
      + (f'discount {builders.guidance_text(s["discount"])}, '
         if any(s.get('discount', ())) else '')
      + f'{"class-conditional (classes balanced)" if s["conditional"] else "unconditional"}'
      f' (`{os.path.basename(s["sample_run"])}`); floor: '
      f'{int(f["num_examples"])} images of the `{f["split"]}` split.', '',
      '| metric | samples | real-vs-real floor |', '|---|---|---|']
  for key, name in (('fid', 'FID'), ('kid', 'KID'),
                    ('inception_score', 'Inception Score'),
                    ('precision', 'precision (k=3)'),
                    ('recall', 'recall (k=3)'),
                    ('class_agreement', 'class agreement')):
    lines.append(f'| {name} | {_fmt(s.get(key))} | {_fmt(f.get(key))} |')
  if 'cas' in report:
    lines += ['', '## Classification Accuracy Score (held-out split)', '',
              '| trained on | examples | top-1 | top-5 |', '|---|---|---|---|']
    for name, row in report['cas'].items():
      lines.append(f'| {name} | {row["train_examples"]} | '
                   f'{_fmt(row["accuracy"])} | {_fmt(row["top5_accuracy"])} |')
  lines += ['', f'Evaluated in {report["seconds"]:.0f} s.', '']
  return '\n'.join(lines)

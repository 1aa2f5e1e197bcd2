"""The domain classifier's training: config, sharded step, training, loading.

conftest.py gives the session 8 fake CPU devices; single-device runs use a
mesh over jax.devices()[:1].
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from vqvae2_jax import builders
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.train import classifier_trainer
from vqvae2_jax.train import common


def _config():
  config = fashion_mnist.get_config('tiny')
  config.data.train_split = 'train[:256]'
  config.data.eval_split = 'test[:100]'  # Not a multiple of the eval batch.
  config.classifier.eval_batch_size = 64
  return config


def test_default_config_crops_to_the_source_area():
  # Padded Fashion-MNIST is cropped to its 28x28 source; a classifier that
  # looked at the whole canvas is a different one.
  config = fashion_mnist.get_config()
  assert builders.build_classifier(config).crop == (2, 2, 28, 28)
  whole = fashion_mnist.get_config()
  whole.classifier.original_area_only = False
  assert builders.build_classifier(whole).crop is None
  assert (builders.classifier_fingerprint(config)
          != builders.classifier_fingerprint(whole))


def test_batch_sums_hand_made():
  logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0],
                      [9.0, 0.0, 0.0]])
  labels = jnp.array([0, 1, 1, 2])
  mask = jnp.array([True, True, True, False])
  sums = jax.device_get(classifier_trainer.batch_sums(logits, labels, mask))
  assert sums['count'] == 3 and sums['top1'] == 2  # Rows 0 and 2.
  assert sums['top5'] == 3  # 3 classes: top-5 is every class.
  expected_nll = sum(-jax.nn.log_softmax(logits[i])[labels[i]]
                     for i in range(3))
  np.testing.assert_allclose(sums['nll'], expected_nll, rtol=1e-6)


def test_sharded_step_matches_one_device():
  config = _config()
  # The whole 32x32 canvas: with the 28x28 crop the maps are 14, 7 and 4
  # wide, XLA sums in another order per mesh, and Adam's normalisation turns
  # rounding-level gradient differences of near-zero entries into 4e-6
  # parameter differences after three steps. The crop itself is a slice
  # (test_crop_looks_only_at_the_source_area).
  config.classifier.original_area_only = False
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh(devices=devices)
    progs = classifier_trainer.programs(config, mesh)
    state = progs.init(jax.random.PRNGKey(0))
    for _ in range(3):
      state, metrics = progs.train_step(
          state, parallel.shard_batch(batch, mesh))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)


def test_array_iterator_is_deterministic_and_resumable():
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  labels = np.arange(10, dtype=np.int32)
  kwargs = dict(global_batch_size=4, mesh=mesh, seed=3)
  it = classifier_trainer.array_train_iterator(images, labels, **kwargs)
  first = [np.asarray(next(it)['label']) for _ in range(5)]
  # An epoch of 10 examples is a permutation: the first 8 positions are
  # distinct, and images follow their labels.
  assert len(set(np.concatenate(first[:2]).tolist())) == 8
  resumed = classifier_trainer.array_train_iterator(
      images, labels, start_step=3, **kwargs)
  batch = next(resumed)
  np.testing.assert_array_equal(batch['label'], first[3])
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], first[3])
  with pytest.raises(ValueError, match='classifier.batch_size'):
    next(classifier_trainer.array_train_iterator(
        images[:2], labels[:2], **kwargs))


def test_train_resume_load_and_refusals(tmp_path):
  config = _config()
  workdir = str(tmp_path)
  result = classifier_trainer.train_and_evaluate(config, workdir)
  assert result['step'] == config.classifier.num_train_steps
  assert result['eval/num_examples'] == 100
  for key in ('eval/accuracy', 'eval/top5_accuracy', 'eval/loss',
              'steps_per_sec', 'train/loss'):
    assert np.isfinite(result[key]), key
  with open(workdir_lib.metrics_json(
      workdir_lib.Workdir(workdir).classifier)) as f:
    assert json.load(f)['step'] == result['step']

  # Training longer resumes from the saved step; the loaded params are the
  # newest checkpoint's.
  longer = _config()
  longer.classifier.num_train_steps = 9
  longer.classifier.checkpoint_every = 3
  assert classifier_trainer.train_and_evaluate(longer, workdir)['step'] == 9
  mesh = parallel.create_mesh(config.mesh)
  classifier = loading.load_classifier(longer, workdir, mesh)
  assert classifier.step == 9
  images = np.random.default_rng(0).uniform(-1, 1, (20, 32, 32, 1))
  features, probs = loading.predict_batches(
      classifier, images.astype(np.float32), batch_size=16)
  assert features.shape == (20, 16) and probs.shape == (20, 10)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  _, direct = classifier.model.apply(
      {'params': jax.device_get(classifier.params)},
      jnp.asarray(images[:4], jnp.float32))
  np.testing.assert_allclose(probs[:4], jax.nn.softmax(direct), rtol=1e-4,
                             atol=1e-6)

  # A classifier of another image size (or dataset) is refused by name.
  other = _config()
  other.data.image_size = 64
  with pytest.raises(ValueError, match='data.image_size'):
    loading.load_classifier(other, workdir, mesh)
  with pytest.raises(FileNotFoundError, match='--mode=classifier'):
    loading.load_classifier(config, str(tmp_path / 'none'), mesh)


def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
  config = _config()
  whole = classifier_trainer.train_and_evaluate(config, str(tmp_path / 'a'))

  class Killed(Exception):
    pass

  real = common.train_loop

  def dying_loop(**kwargs):
    steps = kwargs['train_iter']

    def stream():
      for i, batch in enumerate(steps):
        if kwargs['start_step'] + i == 4:  # After the step-3 checkpoint.
          raise Killed()
        yield batch

    return real(**{**kwargs, 'train_iter': stream()})

  monkeypatch.setattr(common, 'train_loop', dying_loop)
  with pytest.raises(Killed):
    classifier_trainer.train_and_evaluate(config, str(tmp_path / 'b'))
  monkeypatch.setattr(common, 'train_loop', real)
  resumed = classifier_trainer.train_and_evaluate(config, str(tmp_path / 'b'))
  for key in ('eval/accuracy', 'eval/loss', 'train/loss'):
    assert resumed[key] == whole[key], key


def test_train_on_arrays_scores_the_held_out_split(tmp_path):
  config = _config()
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (40, 32, 32, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 40).astype(np.int32)
  result = classifier_trainer.train_on_arrays(
      config, str(tmp_path / 'cas'), images, labels, name='test',
      provenance={'what': 'noise'})
  assert result['step'] == config.classifier.num_train_steps
  assert result['eval/num_examples'] == 100
  # Other examples never resume this run: the fingerprint names them.
  with pytest.raises(ValueError, match='examples.what'):
    classifier_trainer.train_on_arrays(
        config, str(tmp_path / 'cas'), images, labels, name='test',
        provenance={'what': 'other noise'})

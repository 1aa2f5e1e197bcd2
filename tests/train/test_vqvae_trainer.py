"""Tests of the stage-1 trainer: sharded step, end to end, resume, failures.

The skeleton every trainer runs in is tested in test_common.py, the pieces
they share in test_optimizer.py, test_train_state.py and test_step_metrics.py.

conftest.py gives the session 8 fake CPU devices; the single-device runs use
a mesh over jax.devices()[:1].
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from vqvae2_jax import api
from vqvae2_jax import checkpoints
from vqvae2_jax import errors
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.train import step_metrics
from vqvae2_jax.train import train_state
from vqvae2_jax.train import vqvae_trainer


_EVAL_EXAMPLES = 200  # Not a multiple of the eval batch: the last is padded.


def _config():
  config = fashion_mnist.get_config('tiny')
  config.data.eval_split = f'test[:{_EVAL_EXAMPLES}]'
  return config


# Steps of the sharded-step test: past warm-up (2 steps) and past the dead-code
# window (4 steps), so that restarts are part of what must match.
_SHARDED_STEPS = 6


def _restore_state(config, workdir, step=None):
  """The full TrainState of checkpoint `step` (default newest) on 1 device."""
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  target = train_state.restore_target(vqvae_trainer.programs(config, mesh))
  manager = checkpoints.create_manager(
      workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).vqvae),
      read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    restored = checkpoints.restore_step(manager, step, target)
  finally:
    manager.close()
  return jax.device_get(restored)


def _train_batches(config, num, seed=0):
  rng = np.random.default_rng(seed)
  size, channels = config.data.image_size, config.data.channels
  # Smooth random images (blocky noise), in [-1, 1].
  coarse = rng.uniform(-1, 1, (num, config.vqvae_train.batch_size, size // 4,
                               size // 4, channels)).astype(np.float32)
  return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def _run_steps(config, mesh, batches):
  progs = vqvae_trainer.programs(config, mesh)
  state = progs.init(jax.random.PRNGKey(config.seed))
  restarted = 0.0
  for images in batches:
    batch = parallel.shard_batch({'image': images}, mesh)
    state, metrics = progs.train_step(state, batch)
    restarted += sum(float(v) for k, v in metrics.items()
                     if k.startswith('restarted'))
  return jax.device_get(state), jax.device_get(metrics), restarted


def _assert_trees_close(actual, expected, rtol):
  leaves_a = jax.tree_util.tree_leaves_with_path(actual)
  leaves_e = jax.tree.leaves(expected)
  assert len(leaves_a) == len(leaves_e)
  for (path, a), e in zip(leaves_a, leaves_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12)
    assert err <= rtol, (jax.tree_util.keystr(path), err)


@pytest.fixture(scope='module')
def single_device_run():
  config = _config()
  one = parallel.create_mesh(devices=jax.devices()[:1])
  return _run_steps(config, one, _train_batches(config, num=_SHARDED_STEPS))


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_sharded_step_matches_single_device(mesh_shape, single_device_run,
                                            monkeypatch):
  config = _config()
  batches = _train_batches(config, num=_SHARDED_STEPS)
  many = jax.sharding.Mesh(
      np.asarray(jax.devices()).reshape(mesh_shape), parallel.DATA_AXES)
  # Let the tiny model's larger kernels be split over 'fsdp' (2 devices).
  monkeypatch.setattr(parallel, '_MIN_FSDP_SIZE', 64)
  state_n, metrics_n, restarted_n = _run_steps(config, many, batches)
  state_1, metrics_1, restarted_1 = single_device_run
  assert int(state_n.step) == len(batches)
  assert restarted_1 > 0  # The restart is part of what must match.
  assert restarted_n == restarted_1
  _assert_trees_close(state_n.params, state_1.params, rtol=1e-5)
  _assert_trees_close(state_n.extra, state_1.extra, rtol=1e-5)
  for key in ('loss', 'mse', 'grad_norm'):
    np.testing.assert_allclose(metrics_n[key], metrics_1[key], rtol=1e-5)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """An uninterrupted tiny run: (config, workdir, returned metrics)."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  metrics = vqvae_trainer.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_end_to_end_writes_checkpoints_metrics_and_images(finished_run):
  config, workdir, metrics = finished_run
  out = pathlib.Path(workdir_lib.Workdir(workdir).vqvae)
  steps = config.vqvae_train.num_train_steps
  assert metrics['step'] == steps
  ckpts = sorted(int(p.name) for p in (out / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert ckpts == [3, 6]  # checkpoint_every=3, keep_checkpoints=2.
  with open(out / 'metrics.json') as f:
    assert json.load(f) == pytest.approx(metrics)
  assert metrics['eval/num_examples'] == _EVAL_EXAMPLES
  num_levels = len(config.model.downsample_factors)
  for i in range(num_levels):
    assert 0 < metrics[f'eval/used_fraction_level{i}'] <= 1
    assert f'train/perplexity_level{i}' in metrics
  assert metrics['eval/psnr'] == pytest.approx(
      10 * np.log10(4 / metrics['eval/mse']))
  assert np.isfinite(metrics['train/grad_norm'])
  assert (out / 'images' / f'recon_{steps:07d}.png').exists()
  assert any(p.name.startswith('events.out.tfevents') for p in out.iterdir())


def test_rerun_of_finished_run_only_reads(finished_run):
  config, workdir, metrics = finished_run
  again = vqvae_trainer.train_and_evaluate(config, workdir)
  assert again == pytest.approx(metrics)
  assert again['steps_per_sec'] > 0
  ckpts = pathlib.Path(workdir_lib.Workdir(workdir).vqvae) / 'checkpoints'
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == [
      '3', '6']


def test_stage_1_from_an_exported_file(finished_run, tmp_path,
                                      forbid_random_init):
  # A pipeline's exported VQ-VAE starts stage 1 of another workdir: the
  # same weights and provenance (so the same codes), the same held-out
  # metrics as the run it came from, and no random init for weights the
  # file replaces.
  config, workdir, metrics = finished_run
  forbid_random_init(vqvae_trainer)
  path = str(tmp_path / 'stage1.msgpack')
  api.Pipeline.load(workdir, config, priors=False).export(path)
  imported = config.copy_and_resolve_references()
  imported.vqvae_train.from_export = path
  other = str(tmp_path / 'other')
  got = vqvae_trainer.train_and_evaluate(imported, other)
  assert got['step'] == metrics['step']
  evals = [k for k in metrics if k.startswith('eval/')]
  assert evals and got == pytest.approx(
      {**got, **{k: metrics[k] for k in evals}}, rel=1e-6)
  assert (loading.current_vqvae_provenance(config, other) ==
          loading.current_vqvae_provenance(config, workdir))
  # A rerun resumes from the workdir's checkpoint: the file is not read.
  os.remove(path)
  again = vqvae_trainer.train_and_evaluate(imported, other)
  assert {k: again[k] for k in ['step', *evals]} == pytest.approx(
      {k: got[k] for k in ['step', *evals]})
  # More steps train on from the file's weights (the optimizer afresh).
  api.Pipeline.load(workdir, config, priors=False).export(path)
  longer = imported.copy_and_resolve_references()
  longer.vqvae_train.num_train_steps = metrics['step'] + 2
  more = vqvae_trainer.train_and_evaluate(longer, str(tmp_path / 'longer'))
  assert more['step'] == metrics['step'] + 2
  assert np.isfinite(more['train/loss'])
  # A file of another model is refused, naming the field and the fix.
  wrong = imported.copy_and_resolve_references()
  wrong.model.num_hiddens *= 2
  hiddens = config.model.num_hiddens
  with pytest.raises(errors.ConfigError, match=(
      rf'another model config than --config \(model\.num_hiddens: file '
      rf'{hiddens}, here {2 * hiddens}\)\. Fix: pass the config')):
    vqvae_trainer.train_and_evaluate(wrong, str(tmp_path / 'wrong'))


def _interrupting(create, *, fail_at_step, nan_at_step=None):
  """Wraps create_train_iterator: NaN images or an exception at a step."""

  @functools.wraps(create)
  def wrapped(*args, start_step=0, **kwargs):
    def batches():
      for step, batch in enumerate(create(*args, start_step=start_step,
                                          **kwargs), start=start_step + 1):
        if step == fail_at_step:
          raise RuntimeError(f'simulated crash before step {step}')
        if step == nan_at_step:
          batch = dict(batch, image=batch['image'] * jnp.nan)
        yield batch
    return batches()

  return wrapped


def test_resumed_run_ends_identical(finished_run, tmp_path, monkeypatch):
  config, done_dir, _ = finished_run
  workdir = str(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(input_pipeline, 'create_train_iterator', _interrupting(
        input_pipeline.create_train_iterator, fail_at_step=5))
    with pytest.raises(RuntimeError, match='simulated crash'):
      vqvae_trainer.train_and_evaluate(config, workdir)
  ckpt_dir = pathlib.Path(workdir_lib.Workdir(workdir).vqvae) / 'checkpoints'
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == [
      '3']
  metrics = vqvae_trainer.train_and_evaluate(config, workdir)
  assert metrics['step'] == config.vqvae_train.num_train_steps
  resumed, uninterrupted = (_restore_state(config, workdir),
                            _restore_state(config, done_dir))
  # Same params, codebooks, optimizer state, RNG and step, bit for bit.
  for a, e in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(a, e)


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path,
                                                          monkeypatch):
  config = _config()
  workdir = str(tmp_path)
  monkeypatch.setattr(input_pipeline, 'create_train_iterator', _interrupting(
      input_pipeline.create_train_iterator, fail_at_step=-1, nan_at_step=5))
  with pytest.raises(step_metrics.NonFiniteError, match=r'at step 5\b'):
    vqvae_trainer.train_and_evaluate(config, workdir)
  ckpt_dir = pathlib.Path(workdir_lib.Workdir(workdir).vqvae) / 'checkpoints'
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['3']
  state = _restore_state(config, workdir)
  assert int(state.step) == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_checkpoint_of_other_model_config_is_refused(finished_run):
  config, workdir, _ = finished_run
  other = _config()
  other.model.num_hiddens = 2 * config.model.num_hiddens
  other.model.num_embeddings = 2 * config.model.num_embeddings
  with pytest.raises(ValueError, match=r'model\.num_embeddings.*'
                     r'model\.num_hiddens.*another --workdir'):
    vqvae_trainer.train_and_evaluate(other, workdir)
  with pytest.raises(ValueError, match=r'model\.num_hiddens'):
    loading.load_vqvae(other, workdir)
  # Training knobs may change between runs: the same checkpoint loads.
  knobs = _config()
  knobs.model.dtype = 'bfloat16'
  knobs.model.dead_code_window = 7
  # Shapes the optimizer state (no clipping: one transform less); the
  # loader reads the variables only.
  knobs.vqvae_train.grad_clip_norm = 0.0
  assert config.vqvae_train.grad_clip_norm > 0
  _, variables, step = loading.load_vqvae(knobs, workdir)
  assert step == config.vqvae_train.num_train_steps
  assert set(variables) == {'params', 'vq_stats'}
  full = _restore_state(config, workdir)
  for got, want in zip(jax.tree.leaves(jax.device_get(variables)),
                       jax.tree.leaves(full.variables()), strict=True):
    np.testing.assert_array_equal(got, want)


def test_reconstruction_summary_masks_padding():
  from vqvae2_jax.evaluation import reconstruction
  images = jnp.zeros((3, 2, 2, 1))
  recon = jnp.stack([jnp.full((2, 2, 1), 1.0), jnp.full((2, 2, 1), 0.5),
                     jnp.full((2, 2, 1), 9.0)])
  codes = [jnp.array([[[0]], [[1]], [[2]]], jnp.int32)]
  mask = jnp.array([True, True, False])
  first = reconstruction.batch_sums(images[:2], recon[:2], [codes[0][:2]],
                                    mask[:2], num_embeddings=4)
  total = reconstruction.add_sums(
      first, reconstruction.batch_sums(images, recon, codes, mask, 4))
  metrics = reconstruction.summarize(total)
  assert metrics['num_examples'] == 4
  assert metrics['mse'] == pytest.approx((1.0 + 0.25) / 2)
  assert metrics['psnr'] == pytest.approx(10 * np.log10(4 / 0.625))
  assert metrics['used_fraction_level0'] == 0.5  # Code 2 only in padding.
  assert metrics['perplexity_level0'] == pytest.approx(2.0)

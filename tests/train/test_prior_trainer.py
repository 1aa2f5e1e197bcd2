"""Prior trainer (--mode=prior): sharded step, exact resume, loading."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax import builders
from vqvae2_jax import checkpoints
from vqvae2_jax import console
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import code_iterators
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.train import extract
from vqvae2_jax.train import prior_trainer
from vqvae2_jax.train import train_state
from vqvae2_jax.train import vqvae_trainer


@pytest.fixture(scope='module')
def config(stage2_config):
  return stage2_config


@pytest.fixture(scope='module')
def codes_workdir(tmp_path_factory, config, save_vqvae_checkpoint):
  """A workdir with an (untrained) stage-1 checkpoint and its codes."""
  workdir = str(tmp_path_factory.mktemp('stage2'))
  save_vqvae_checkpoint(config, workdir)
  extract.extract_codes(config, workdir)
  return workdir


def test_levels_to_train(config):
  assert prior_trainer.levels_to_train(config) == [0, 1]
  config = config.copy_and_resolve_references()
  config.prior.level = 1
  assert prior_trainer.levels_to_train(config) == [1]


def test_label_dropout_and_polyak_ramp():
  labels = jnp.arange(64) % 10
  rng = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(
      prior_trainer.drop_labels(labels, rng, 0.0, 10), labels)
  np.testing.assert_array_equal(
      prior_trainer.drop_labels(labels, rng, 1.0, 10), 10)
  half = np.asarray(prior_trainer.drop_labels(labels, rng, 0.5, 10))
  kept = half != 10
  assert 0 < kept.sum() < 64
  np.testing.assert_array_equal(half[kept], np.asarray(labels)[kept])
  assert float(prior_trainer.polyak_decay_at(0.999, 0)) == pytest.approx(0.1)
  assert float(prior_trainer.polyak_decay_at(0.999, 90)) == pytest.approx(
      0.91)
  assert float(prior_trainer.polyak_decay_at(0.999, 10**6)) == pytest.approx(
      0.999)


def _run_steps(config, level, mesh, batches, num_steps, code_weights=None):
  model = builders.build_prior(config, level)
  tx, schedule = prior_trainer.create_optimizer(config)
  shapes = [(4, 4), (8, 8)]
  init_fn = prior_trainer.make_init_fn(model, tx, level=level,
                                       level_shapes=shapes, use_polyak=True)
  state, shardings = train_state.create_sharded_state(init_fn, mesh,
                                                       jax.random.PRNGKey(1))
  step = train_state.jit_train_step(
      prior_trainer.make_train_step(model, tx, schedule, label_drop_rate=0.5,
                                    polyak_decay=0.999,
                                    code_weights=code_weights),
      shardings, mesh)
  batches = [parallel.shard_batch(b, mesh) for b in batches[:num_steps]]
  # Unoptimised machine code compiles in half the time; both meshes get it.
  step = step.lower(state, batches[0]).compile(
      {'xla_backend_optimization_level': 0})
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  return jax.device_get((state, metrics))


def _relative_error(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)


def _is_key_bias(path):
  return jax.tree_util.keystr(path).endswith("['key']['bias']")


@pytest.mark.parametrize('kind', builders.PRIOR_KINDS)
def test_train_step_on_8_devices_matches_one_device(config, kind):
  """3 steps of the bottom prior, with every layer type, on 1 and 8 devices."""
  assert jax.device_count() == 8
  config = config.copy_and_resolve_references()
  config.prior.level_1.attention_layers = 1  # Attention + conditioning stack.
  config.prior.level_1.kind = kind
  rng = np.random.default_rng(0)
  batches = [{'codes': [rng.integers(0, 16, (16, 4, 4), dtype=np.int32),
                        rng.integers(0, 16, (16, 8, 8), dtype=np.int32)],
              'label': rng.integers(0, 10, 16, dtype=np.int32)}
             for _ in range(3)]
  one = _run_steps(config, 1, parallel.create_mesh(devices=jax.devices()[:1]),
                   batches, 3)
  eight = _run_steps(config, 1, parallel.create_mesh(), batches, 3)
  assert int(eight[0].step) == 3
  for got, want in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    assert _relative_error(got, want) <= 1e-5  # Loss, bits, norms, ...
  # An attention key bias adds the same number to every logit of a query's
  # softmax, so its exact gradient is 0 and Adam's normalisation turns the
  # float rounding left in it into full-size, mesh-dependent steps. Such a
  # leaf is checked to be that null direction instead of compared.
  mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      one[0].opt_state)[0] if _is_key_bias(path)]
  for leaf in mu:  # Adam's moments of the key bias: rounding only.
    assert np.max(np.abs(leaf)) < 1e-6 * float(one[1][0]['grad_norm'])
  compared = 0
  for tree in ('params', 'polyak'):
    leaves_one = jax.tree_util.tree_flatten_with_path(getattr(one[0], tree))[0]
    leaves_eight = jax.tree.leaves(getattr(eight[0], tree))
    for (path, want), got in zip(leaves_one, leaves_eight):
      if not _is_key_bias(path):
        assert _relative_error(got, want) <= 1e-5, jax.tree_util.keystr(path)
        compared += 1
  assert compared >= 2 * (len(jax.tree.leaves(one[0].params)) - 1)
  # The steps did something, and the Polyak weights trail the params.
  assert not np.allclose(jax.tree.leaves(eight[0].params)[-1],
                         jax.tree.leaves(eight[0].polyak)[-1])


def test_a_weighted_loss_weighs_each_target_and_reports_plain_bits(config):
  """prior.code_weight's step: 'loss' is the weighted mean, 'bits_per_code'
  the plain one, on the same logits (the first step's)."""
  rng = np.random.default_rng(0)
  batches = [{'codes': [rng.integers(0, 16, (8, 4, 4), dtype=np.int32),
                        rng.integers(0, 16, (8, 8, 8), dtype=np.int32)],
              'label': rng.integers(0, 10, 8, dtype=np.int32)}]
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  k = int(config.model.num_embeddings)
  plain = _run_steps(config, 1, mesh, batches, 1)[1][0]
  ones = _run_steps(config, 1, mesh, batches, 1, np.ones(k))[1][0]
  twice = _run_steps(config, 1, mesh, batches, 1, np.full(k, 2.0))[1][0]
  # Code 3 weighs 100, the others 1: the loss grows by 99 times the summed
  # cross-entropy of the targets that are code 3 (about 1/16 of them, each
  # near the mean) over the count of all.
  tilted = np.ones(k)
  tilted[3] = 100.0
  assert np.any(batches[0]['codes'][1] == 3)
  skewed = _run_steps(config, 1, mesh, batches, 1, tilted)[1][0]
  assert ones == plain
  assert twice['loss'] == pytest.approx(2 * plain['loss'], rel=1e-6)
  for got in (twice, skewed):
    assert got['bits_per_code'] == plain['bits_per_code']
    assert got['loss'] != plain['loss']
  assert plain['loss'] == pytest.approx(plain['bits_per_code'] * np.log(2),
                                        rel=1e-6)
  assert skewed['loss'] > 3 * plain['loss']


class _Killed(Exception):
  pass


def _restored_state(config, workdir, level, vqvae):
  """The whole train state of level `level`'s newest checkpoint."""
  mesh = parallel.create_mesh(config.mesh)
  target = train_state.restore_target(
      prior_trainer.programs(config, level, mesh))
  manager = checkpoints.create_manager(
      workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).prior(level)),
      read_only=True)
  try:
    fingerprint = builders.prior_fingerprint(config, level, vqvae)
    return jax.device_get(checkpoints.restore_latest(manager, target,
                                                     fingerprint))
  finally:
    manager.close()


@pytest.mark.parametrize('kind', builders.PRIOR_KINDS)
def test_training_resumes_exactly(config, codes_workdir, tmp_path,
                                  monkeypatch, kind):
  # The bottom level (its conditioning on the top codes included): 6 steps
  # uninterrupted, and killed while fetching the batch of step 5 (step 3 was
  # checkpointed, step 4 logged), then resumed. The curves go to
  # scalars.jsonl, as on a machine without clu.
  monkeypatch.setattr(console, 'create_writer', console.JsonLinesWriter)
  config = config.copy_and_resolve_references()
  config.prior.level = 1
  config.prior.level_1.kind = kind
  config.prior.train_eval_examples = 24  # Of the training split's 96.
  whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
  shutil.copytree(codes_workdir, whole)
  shutil.copytree(codes_workdir, killed)
  results = prior_trainer.train_priors(config, whole)
  assert sorted(results) == ['level_1']
  assert not os.path.exists(workdir_lib.Workdir(whole).prior(0))

  real_iterator = code_iterators.create_train_iterator

  def dying_iterator(*args, **kwargs):
    it = real_iterator(*args, **kwargs)
    for _ in range(4):
      yield next(it)
    raise _Killed()

  monkeypatch.setattr(code_iterators, 'create_train_iterator', dying_iterator)
  with pytest.raises(_Killed):
    prior_trainer.train_priors(config, killed)
  monkeypatch.setattr(code_iterators, 'create_train_iterator', real_iterator)
  resumed = prior_trainer.train_priors(config, killed)

  vqvae = loading.current_vqvae_provenance(config, whole)
  a = _restored_state(config, whole, 1, vqvae)
  b = _restored_state(config, killed, 1, vqvae)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  for key in ('eval/bits_per_code', 'eval_train/bits_per_code',
              'eval/bits_per_code_uncond', 'eval/bits_per_code_raw',
              'train/loss'):
    assert resumed['level_1'][key] == results['level_1'][key]
  # The resumed curves have the uninterrupted ones' lines: the killed run's
  # step 4, after its last checkpoint, is not there twice. (Its loss is the
  # mean of the steps since the last line that the resumed run took: step
  # 4 alone, not 3 and 4.)
  curves = []
  for workdir in (whole, killed):
    path = workdir_lib.scalars_jsonl(workdir_lib.Workdir(workdir).prior(1))
    with open(path) as f:
      curves.append([json.loads(line) for line in f])
  assert [(r['step'], sorted(r)) for r in curves[0]] == [
      (r['step'], sorted(r)) for r in curves[1]]
  assert [r['step'] for r in curves[0] if 'train/loss' in r] == [2, 4, 6]
  assert curves[0][0]['train/loss'] == curves[1][0]['train/loss']  # Step 2.

  metrics = results['level_1']
  assert metrics['baseline/uniform_bits_per_code'] == 4.0
  assert metrics['eval/num_examples'] == 40
  assert metrics['eval/num_codes'] == 40 * 64
  assert metrics['eval_train/num_examples'] == 24
  assert 0 < metrics['eval/bits_per_code'] < 10
  with open(os.path.join(whole, 'prior_1', 'metrics.json')) as f:
    assert json.load(f)['step'] == 6


def test_codes_from_a_different_vqvae_are_refused(config, codes_workdir,
                                                  tmp_path,
                                                  save_vqvae_checkpoint):
  workdir = str(tmp_path / 'w')
  shutil.copytree(codes_workdir, workdir)
  save_vqvae_checkpoint(config, workdir, seed=2, step=5)
  with pytest.raises(codes_lib.CodesMismatchError,
                     match='step: codes 1, checkpoint 5.*re-run --mode=codes'):
    prior_trainer.train_priors(config, workdir)


def _save_initial_prior(config, workdir, level, vqvae):
  """Writes level `level`'s initial train state under `config` as step 1."""
  mesh = parallel.create_mesh(config.mesh)
  state = prior_trainer.programs(config, level, mesh).init(
      jax.random.PRNGKey(4))
  state = state.replace(step=jnp.asarray(1, jnp.int32))
  if state.polyak is not None:  # Other numbers than the params.
    state = state.replace(polyak=jax.tree.map(lambda x: -x, state.polyak))
  manager = checkpoints.create_manager(
      workdir_lib.checkpoint_dir(workdir_lib.Workdir(workdir).prior(level)),
      async_save=False)
  try:
    checkpoints.save(manager, 1, state,
                     builders.prior_fingerprint(config, level, vqvae))
    manager.wait_until_finished()
  finally:
    manager.close()
  return jax.device_get(state)


def test_load_prior_reads_weights_whatever_the_training_knobs(config,
                                                              tmp_path):
  # Trained without Polyak weights or clipping; loaded under a config that
  # has both (other optimizer and state structures): the params load.
  vqvae = {'step': 3, 'digest': 'abc'}
  plain = config.copy_and_resolve_references()
  plain.prior.polyak_decay = 0.0
  plain.prior.grad_clip_norm = 0.0
  saved = _save_initial_prior(plain, str(tmp_path), 0, vqvae)
  assert saved.polyak is None
  now = config.copy_and_resolve_references()
  assert now.prior.polyak_decay > 0 and now.prior.grad_clip_norm > 0
  for use_polyak in (True, False):
    model, variables, step = loading.load_prior(
        now, str(tmp_path), 0, vqvae=vqvae, use_polyak=use_polyak)
    assert step == 1 and model == builders.build_prior(now, 0)
    for got, want in zip(jax.tree.leaves(jax.device_get(variables)),
                         jax.tree.leaves({'params': saved.params}),
                         strict=True):
      np.testing.assert_array_equal(got, want)
  # The reverse: Polyak weights saved, none configured now; use_polyak
  # decides which weights come back.
  other = str(tmp_path / 'polyak')
  saved = _save_initial_prior(config, other, 0, vqvae)
  assert saved.polyak is not None
  _, with_polyak, _ = loading.load_prior(plain, other, 0, vqvae=vqvae)
  _, raw, _ = loading.load_prior(plain, other, 0, vqvae=vqvae,
                                 use_polyak=False)
  for got, want in zip(jax.tree.leaves(jax.device_get(raw)),
                       jax.tree.leaves(saved.params), strict=True):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(jax.device_get(with_polyak)),
                       jax.tree.leaves(saved.polyak), strict=True):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='codes of VQ-VAE step 4'):
    loading.load_prior(plain, other, 0, vqvae={'step': 4, 'digest': 'abc'})
  with pytest.raises(FileNotFoundError, match='--mode=prior'):
    loading.load_prior(plain, str(tmp_path / 'none'), 0, vqvae=vqvae)


def test_priors_from_an_exported_file(config, stage2_workdir, codes_workdir,
                                      tmp_path, forbid_random_init):
  # A pipeline's exported stage 1 and top prior start a new workdir: the
  # top prior's weights and held-out bits are those of the run the file
  # came from, without training it (nor drawing a random init of either).
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import errors  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import stages  # pylint: disable=g-import-not-at-top
  workdir, results = stage2_workdir
  path = str(tmp_path / 'pipeline.msgpack')
  api.Pipeline.load(workdir, config).export(path)
  imported = config.copy_and_resolve_references()
  imported.vqvae_train.from_export = path
  imported.prior.from_export = path
  imported.prior.level = 0
  other = str(tmp_path / 'other')
  forbid_random_init(vqvae_trainer)
  forbid_random_init(prior_trainer)
  for mode in ('vqvae', 'codes', 'prior'):
    got = stages.run(mode, imported, other)[mode]
  want = results['prior']['level_0']
  assert got['level_0']['step'] == want['step']
  for key in ('eval/bits_per_code', 'eval/bits_per_code_uncond'):
    assert got['level_0'][key] == pytest.approx(want[key], rel=1e-6), key
  vqvae = loading.current_vqvae_provenance(config, other)
  assert vqvae == loading.current_vqvae_provenance(config, workdir)
  _, theirs, _ = loading.load_prior(config, workdir, 0, vqvae=vqvae)
  _, ours, _ = loading.load_prior(config, other, 0, vqvae=vqvae)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  # A level of another width: refused, naming the field and both values.
  wider = imported.copy_and_resolve_references()
  wider.prior.level = 1
  width = config.prior.level_1.num_channels
  wider.prior.level_1.num_channels = width + 8
  with pytest.raises(errors.ConfigError, match=(
      r'differ in prior\.level_1\.num_channels: file '
      rf'{width}, here {width + 8}\. Fix: pass the config')):
    stages.run('prior', wider, other)
  assert not os.path.exists(os.path.join(other, 'prior_1'))
  # Codes of another stage 1 (an untrained one): the file's prior is
  # refused, naming the fix.
  elsewhere = str(tmp_path / 'elsewhere')
  shutil.copytree(codes_workdir, elsewhere)
  with pytest.raises(errors.ConfigError, match=(
      r'holds no prior of level 0 for these codes: .*codes\.vqvae_digest: '
      r"file '[0-9a-f]+', here '[0-9a-f]+'.*Fix: start stage 1 from the "
      r'same file')):
    stages.run('prior', imported.copy_and_resolve_references(), elsewhere)

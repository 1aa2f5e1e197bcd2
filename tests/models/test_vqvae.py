"""Tests of the N-level VQ-VAE.

Compilation dominates on CPU, so each model configuration is compiled once:
`_run` computes everything the tests look at (eval call, train call, encode,
decode_codes) in one jitted function, and tests share two configurations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae2_jax.models import vqvae as vqvae_lib
import variables_util

TINY = dict(channels=1, num_hiddens=16, num_residual_layers=1,
            num_residual_hiddens=8, embedding_dim=8, num_embeddings=16)


def _model(factors=(8, 4), **kwargs):
  return vqvae_lib.VQVAE(downsample_factors=factors, **{**TINY, **kwargs})


# A 2-level grayscale model and a 3-level RGB one (on rectangular images).
TWO_LEVELS = _model((8, 4), dead_code_window=2)
THREE_LEVELS = _model((8, 4, 2), channels=3)


def _images(*shape, seed=0):
  # numpy, not jax.random: each threefry draw costs seconds to compile on CPU.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.0, 1.0, shape), jnp.float32)


def _two_level_images():
  return _images(4, 32, 32, 1)


def _three_level_images():
  return _images(2, 16, 32, 3, seed=1)


def _init(model, images):
  return variables_util.init_variables(model, images, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _run(model, variables, images, codes):
  """Eval and train calls on `images`, their encoding, and decoded `codes`."""
  (recon, aux), eval_stats = model.apply(variables, images, train=False,
                                         mutable=['vq_stats'])
  (train_recon, train_aux), train_stats = model.apply(
      variables, images, train=True, rngs={'vq': jax.random.key(2)},
      mutable=['vq_stats'])
  return {
      'recon': recon, 'aux': aux, 'eval_stats': eval_stats['vq_stats'],
      'train_recon': train_recon, 'train_aux': train_aux,
      'train_stats': train_stats['vq_stats'],
      'encoded': model.apply(variables, images, method=model.encode),
      'decoded': model.apply(variables, codes, method=model.decode_codes),
  }


def _zero_codes(model, images):
  return [jnp.zeros((images.shape[0], *s), jnp.int32)
          for s in model.latent_shapes(images.shape)]


def _transposed_conv_4x4_stride2(x, kernel, bias):
  """Reference: PyTorch's ConvTranspose2d(k=4, s=2, p=1) as a numpy scatter."""
  n, h, w, _ = x.shape
  out = np.zeros((n, 2 * h + 2, 2 * w + 2, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      # Input (i, j) lands on outputs 2i - 1 + t, 2j - 1 + s (+1 offset here).
      out[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum(
          'nc,tsco->ntso', x[:, i, j], kernel)
  return out[:, 1:-1, 1:-1] + bias


def test_upsample2x_is_a_4x4_stride2_transposed_conv():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  kernel4 = rng.normal(size=(4, 4, 4, 6)).astype(np.float32)
  bias = rng.normal(size=(6,)).astype(np.float32)
  # Tap (u, v) of phase (a, b) is tap (3 - 2u - a, 3 - 2v - b) of the 4x4.
  kernel = np.zeros((2, 2, 4, 2, 2, 6), np.float32)
  for u, v, a, b in np.ndindex(2, 2, 2, 2):
    kernel[u, v, :, a, b] = kernel4[3 - 2 * u - a, 3 - 2 * v - b]
  layer = vqvae_lib.Upsample2x(6)
  out = jax.jit(layer.apply)({'params': {'kernel': kernel, 'bias': bias}}, x)
  assert out.shape == (2, 6, 10, 6)
  np.testing.assert_allclose(out, _transposed_conv_4x4_stride2(x, kernel4, bias),
                             rtol=1e-5, atol=1e-5)


def test_variables_are_float32_params_and_one_codebook_per_level():
  for model, images, levels in ((TWO_LEVELS, _two_level_images(), 2),
                                (THREE_LEVELS, _three_level_images(), 3)):
    shapes = jax.eval_shape(
        lambda: model.init({'params': jax.random.key(0)}, images,
                           train=False))
    assert set(shapes) == {'params', 'vq_stats'}
    assert sorted(shapes['vq_stats']) == [f'quantizers_{i}'
                                          for i in range(levels)]
    for stats in shapes['vq_stats'].values():
      assert stats['codebook'].shape == (16, 8)
      assert stats['codebook'].dtype == jnp.float32
    for leaf in jax.tree.leaves(shapes['params']):
      assert leaf.dtype == jnp.float32
    for i in range(levels):
      assert f'encoders_{i}' in shapes['params']


@pytest.mark.parametrize('model,images,latent_shapes', [
    (TWO_LEVELS, _two_level_images, ((4, 4), (8, 8))),
    (THREE_LEVELS, _three_level_images, ((2, 4), (4, 8), (8, 16))),
], ids=['two_levels', 'three_levels'])
def test_output_shapes(model, images, latent_shapes):
  images = images()
  assert model.latent_shapes(images.shape) == list(latent_shapes)
  out = _run(model, _init(model, images), images, _zero_codes(model, images))

  batch = images.shape[0]
  for recon in (out['recon'], out['train_recon'], out['decoded']):
    assert recon.shape == images.shape and recon.dtype == jnp.float32
  for aux in (out['aux'], out['train_aux']):
    assert aux['loss'].shape == ()
    for name in ('codes', 'perplexity', 'used_fraction', 'commitment_loss',
                 'codebook_loss', 'restarted'):
      assert len(aux[name]) == len(latent_shapes), name
    for codes, shape in zip(aux['codes'], latent_shapes):
      assert codes.shape == (batch, *shape) and codes.dtype == jnp.int32
    # EMA quantizers: the loss is beta * commitment, summed over levels.
    np.testing.assert_allclose(
        aux['loss'], 0.25 * sum(aux['commitment_loss']), rtol=1e-6)


@pytest.mark.parametrize('quantizer', ['ema', 'vq'])
def test_encode_and_decode_codes_agree_with_call(quantizer):
  model = THREE_LEVELS.clone(quantizer=quantizer)
  images = _three_level_images()
  variables = _init(model, images)
  out = _run(model, variables, images, _zero_codes(model, images))
  for encoded, codes in zip(out['encoded'], out['aux']['codes']):
    np.testing.assert_array_equal(encoded, codes)
  decoded = _run(model, variables, images, out['encoded'])['decoded']
  np.testing.assert_allclose(decoded, out['recon'], rtol=1e-5, atol=1e-6)


def test_codebook_stats_change_in_train_calls_only():
  model, images = TWO_LEVELS, _two_level_images()
  variables = _init(model, images)
  out = _run(model, variables, images, _zero_codes(model, images))
  jax.tree.map(np.testing.assert_array_equal, out['eval_stats'],
               variables['vq_stats'])
  for level, stats in variables['vq_stats'].items():
    assert not np.array_equal(out['train_stats'][level]['codebook'],
                              stats['codebook'])
    assert not np.array_equal(out['train_stats'][level]['cluster_size'],
                              stats['cluster_size'])


def test_decode_levels_per_level_view():
  model, images = TWO_LEVELS, _two_level_images()
  variables = _init(model, images)
  codes = _run(model, variables, images, _zero_codes(model, images))['encoded']

  @jax.jit
  def views(codes):
    out = {name: model.apply(variables, codes, keep=keep,
                             method=model.decode_levels)
           for name, keep in (('both', (0, 1)), ('top', (0,)),
                              ('bottom', (1,)))}
    out['all'] = model.apply(variables, codes, method=model.decode_codes)
    return out

  out = views(codes)
  np.testing.assert_allclose(out['both'], out['all'], rtol=1e-5, atol=1e-6)
  assert out['top'].shape == out['bottom'].shape == images.shape
  assert not np.allclose(out['top'], out['all'])
  assert not np.allclose(out['bottom'], out['all'])
  # A dropped level's codes do not matter; a kept level's do.
  other = views([codes[0], (codes[1] + 1) % TINY['num_embeddings']])
  np.testing.assert_array_equal(other['top'], out['top'])
  assert not np.allclose(other['bottom'], out['bottom'])
  with pytest.raises(ValueError, match='keep=\\(2,\\)'):
    model.apply(variables, codes, keep=(2,), method=model.decode_levels)


def test_gradients_reach_every_encoder_through_the_quantizers():
  model, images = THREE_LEVELS, _three_level_images()
  variables = _init(model, images)

  @jax.jit
  def grads(params):
    def loss(params):
      recon, aux = model.apply({**variables, 'params': params}, images,
                               train=False)
      return jnp.mean(jnp.square(recon - images)) + aux['loss']
    return jax.grad(loss)(params)

  g = grads(variables['params'])
  # Every kernel of every level gets a gradient, the encoders' included (the
  # reconstruction loss reaches them only straight through the quantizers).
  for path, leaf in jax.tree_util.tree_leaves_with_path(g):
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      assert np.abs(leaf).sum() > 0, jax.tree_util.keystr(path)
  for i in range(3):
    assert np.abs(g[f'encoders_{i}']['down0']['kernel']).sum() > 0


def test_bfloat16_compute_keeps_float32_params_codebooks_and_search():
  model, images = TWO_LEVELS.clone(dtype=jnp.bfloat16), _two_level_images()
  variables = _init(model, images)
  out32 = _run(TWO_LEVELS, variables, images, _zero_codes(model, images))
  codes = out32['encoded']
  out16 = _run(model, variables, images, codes)

  for name in ('recon', 'train_recon', 'decoded'):
    assert out16[name].dtype == jnp.float32
  assert all(c.dtype == jnp.int32 for c in out16['train_aux']['codes'])
  for level in out16['train_stats'].values():
    assert level['codebook'].dtype == jnp.float32
    assert level['embed_sum'].dtype == jnp.float32
  # Decoding the same codes: bf16 convolutions, agreeing to bf16 precision.
  decoded32 = _run(TWO_LEVELS, variables, images, codes)['decoded']
  assert not np.array_equal(out16['decoded'], decoded32)
  np.testing.assert_allclose(out16['decoded'], decoded32, atol=0.05)


def test_bad_shapes_are_clear_errors():
  model = _model((8, 4))
  with pytest.raises(ValueError, match='28x28 is not divisible .* 8'):
    _init(model, jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match='\\[batch, height, width, 1\\]'):
    _init(model, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='top \\(coarsest, largest factor\\) '
                     'first'):
    _init(_model((4, 8)), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match='power of two'):
    _init(_model((6, 3)), jnp.zeros((1, 24, 24, 1)))
  variables = _init(model, jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match='Expected 2 code maps'):
    model.apply(variables, [jnp.zeros((1, 4, 4), jnp.int32)],
                method=model.decode_codes)
  with pytest.raises(ValueError, match='level 1 must be 2x'):
    model.apply(variables, [jnp.zeros((1, 4, 4), jnp.int32),
                            jnp.zeros((1, 4, 4), jnp.int32)],
                method=model.decode_codes)


def test_a_few_adam_steps_reduce_the_reconstruction_error():
  # The learned codebook, so its gradients are exercised end to end too.
  model = _model((4, 2), quantizer='vq', dead_code_window=5)
  # Smooth images (upsampled noise): learnable in a few steps.
  noise = np.random.default_rng(0).normal(size=(8, 4, 4, 1))
  images = jnp.asarray(np.tanh(np.kron(noise, np.ones((1, 4, 4, 1)))),
                       jnp.float32)
  variables = _init(model, images)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, stats, rng):
    def loss_fn(params):
      (recon, aux), new_stats = model.apply(
          {'params': params, **stats}, images, train=True, rngs={'vq': rng},
          mutable=['vq_stats'])
      mse = jnp.mean(jnp.square(recon - images))
      return mse + aux['loss'], (mse, new_stats)
    (_, (mse, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats, mse

  params, stats = variables['params'], {'vq_stats': variables['vq_stats']}
  opt_state = tx.init(params)
  mses = []
  for i in range(40):
    params, opt_state, stats, mse = step(params, opt_state, stats,
                                         jax.random.key(i))
    mses.append(float(mse))
  assert np.mean(mses[-5:]) < 0.5 * np.mean(mses[:5]), mses


def test_level_dropout_decodes_some_train_images_from_upper_levels_only():
  # The learned-codebook quantizer: a train call leaves its codebook as it
  # is (no restarts), so the train reconstruction can be rebuilt by hand.
  model = THREE_LEVELS.clone(quantizer='vq', level_dropout=0.7)
  images = _images(12, 16, 32, 3, seed=3)
  variables = _init(model, images)
  out = _run(model, variables, images, _zero_codes(model, images))
  codes = out['train_aux']['codes']
  after = {**variables, 'vq_stats': out['train_stats']}

  @jax.jit
  def views(codes):
    return [model.apply(after, codes, keep=keep, method=model.decode_levels)
            for keep in ((0, 1, 2), (0, 1), (0,))]

  views = np.stack([np.asarray(v) for v in views(codes)], axis=1)
  recon = np.asarray(out['train_recon'])
  matches = [[i for i in range(3)
              if np.allclose(recon[n], views[n, i], rtol=1e-5, atol=1e-5)]
             for n in range(len(images))]
  assert all(len(m) == 1 for m in matches), matches
  kinds = {m[0] for m in matches}
  assert kinds == {0, 1, 2}, matches  # Whole, top two levels, top only.
  # Evaluation is never dropped.
  np.testing.assert_allclose(out['recon'],
                             model.apply(variables, out['encoded'],
                                         method=model.decode_codes),
                             rtol=1e-5, atol=1e-6)


def test_remat_keeps_params_outputs_and_gradients():
  images = _three_level_images()
  plain, remat = _model((8, 4, 2), channels=3), _model((8, 4, 2), channels=3,
                                                        remat=True)
  key = jax.random.key(0)
  # Jitted: one program each, not a compilation per operation.
  init = lambda m: jax.jit(lambda: m.init({'params': key, 'vq': key}, images,
                                          train=False))()
  variables = init(plain)
  remat_variables = init(remat)
  assert (jax.tree.structure(remat_variables)
          == jax.tree.structure(variables))
  jax.tree.map(np.testing.assert_array_equal, remat_variables, variables)

  def forward(model, params):
    (recon, aux), stats = model.apply(
        {**variables, 'params': params}, images, train=True,
        rngs={'vq': key}, mutable=['vq_stats'])
    return recon, aux['loss'], stats

  def loss_and_grads(model, params):
    def loss(params):
      recon, quantizer_loss, _ = forward(model, params)
      return jnp.mean(jnp.square(recon - images)) + quantizer_loss
    return jax.value_and_grad(loss)(params)

  params = variables['params']
  # The forward pass (and the codebook statistics) bit for bit.
  jax.tree.map(np.testing.assert_array_equal,
               jax.jit(functools.partial(forward, remat))(params),
               jax.jit(functools.partial(forward, plain))(params))
  loss_p, grads_p = jax.jit(functools.partial(loss_and_grads, plain))(params)
  loss_r, grads_r = jax.jit(functools.partial(loss_and_grads, remat))(params)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  jax.tree.map(lambda r, p: np.testing.assert_allclose(
      r, p, rtol=1e-5, atol=1e-7), grads_r, grads_p)
  # One checkpoint per residual stack: 3 encoders, 2 conditioning decoders,
  # the decoder.
  text = str(jax.make_jaxpr(functools.partial(loss_and_grads, remat))(params))
  assert text.count('checkpoint[') + text.count('remat2[') == 6
  text = str(jax.make_jaxpr(functools.partial(loss_and_grads, plain))(params))
  assert text.count('checkpoint[') + text.count('remat2[') == 0

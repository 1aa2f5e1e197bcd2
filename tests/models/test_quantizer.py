"""Tests of the vector quantizers (EMA and learned codebooks)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax import parallel
from vqvae2_jax.models import quantizer as quantizer_lib
import variables_util

QUANTIZERS = [quantizer_lib.VectorQuantizerEMA, quantizer_lib.VectorQuantizer]


def _codebook(variables):
  """The codebook a quantizer searches, from its variables."""
  stats = variables['vq_stats']
  if 'codebook' in stats:
    return np.asarray(stats['codebook'])
  return np.asarray(variables['params']['codebook'] + stats['offset'])


def _normal(*shape, seed=0):
  # numpy, not jax.random: each threefry draw costs seconds to compile on CPU.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _init(module, inputs, seed=0):
  return variables_util.init_variables(module, inputs, train=False, seed=seed)


# Jitted: one compilation per test beats op-by-op dispatch on a busy CPU.


@functools.partial(jax.jit, static_argnums=0)
def _eval(module, variables, inputs):
  """One eval call; returns (outputs, vq_stats it would write)."""
  out, new_stats = module.apply(variables, inputs, train=False,
                                mutable=['vq_stats'])
  return out, new_stats['vq_stats']


@functools.partial(jax.jit, static_argnums=0)
def _train(module, variables, inputs, seed=0):
  """One train call; returns (outputs, variables with the new vq_stats)."""
  out, new_stats = module.apply(variables, inputs, train=True,
                                rngs={'vq': jax.random.key(seed)},
                                mutable=['vq_stats'])
  return out, {**variables, **new_stats}


def _set_stats(variables, **values):
  stats = dict(variables['vq_stats'])
  stats.update({k: jnp.asarray(v) for k, v in values.items()})
  return {**variables, 'vq_stats': stats}


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_real_init_follows_the_rules_tests_fill_variables_with(cls):
  module = cls(num_embeddings=32, embedding_dim=16)
  inputs = jnp.zeros((2, 16))
  real = jax.jit(lambda: module.init(jax.random.key(0), inputs,
                                     train=False))()
  fake = _init(module, inputs)
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or
               pytest.fail(f'{a.shape, a.dtype} != {b.shape, b.dtype}'),
               real, fake)
  codebook = _codebook(real)
  bound = np.sqrt(3 / 16)
  assert np.all(np.abs(codebook) <= bound) and codebook.std() > bound / 3
  stats = real['vq_stats']
  np.testing.assert_array_equal(stats['cluster_size'], 1.0)
  np.testing.assert_array_equal(stats['steps_unused'], 0)
  assert not bool(stats['initialized'])
  if cls is quantizer_lib.VectorQuantizerEMA:
    np.testing.assert_array_equal(stats['embed_sum'], stats['codebook'])
  else:
    np.testing.assert_array_equal(stats['offset'], 0.0)


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_each_input_maps_to_its_nearest_code(cls):
  module = cls(num_embeddings=13, embedding_dim=6)
  inputs = _normal(4, 5, 5, 6, seed=1)
  variables = _init(module, inputs)
  out, _ = _eval(module, variables, inputs)

  codebook = _codebook(variables).astype(np.float64)
  flat = np.asarray(inputs, np.float64).reshape(-1, 6)
  distances = np.sum((flat[:, None, :] - codebook[None]) ** 2, axis=-1)
  assert out['codes'].shape == (4, 5, 5)
  assert out['codes'].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out['codes']).ravel(),
                                np.argmin(distances, axis=1))
  np.testing.assert_array_equal(
      np.asarray(out['quantized']),
      codebook.astype(np.float32)[np.asarray(out['codes'])])
  np.testing.assert_array_equal(
      np.asarray(module.apply(variables, out['codes'], method=module.lookup)),
      np.asarray(out['quantized']))


def test_losses_perplexity_and_used_fraction_on_a_known_example():
  module = quantizer_lib.VectorQuantizer(num_embeddings=4, embedding_dim=2,
                                         commitment_cost=0.5)
  codebook = np.array([[0., 0.], [10., 0.], [0., 10.], [10., 10.]], np.float32)
  inputs = jnp.array([[1., 0.], [0., 1.], [10., 1.], [9., 0.]])
  variables = _init(module, inputs)
  variables = {'params': {'codebook': jnp.asarray(codebook)},
               'vq_stats': variables['vq_stats']}
  out, _ = _eval(module, variables, inputs)
  np.testing.assert_array_equal(out['codes'], [0, 0, 1, 1])
  # Every vector is at squared distance 1 from its code: mean over 8 elements.
  np.testing.assert_allclose(out['commitment_loss'], 4 / 8)
  np.testing.assert_allclose(out['codebook_loss'], 4 / 8)
  np.testing.assert_allclose(out['loss'], 0.5 * 4 / 8 + 4 / 8)
  np.testing.assert_allclose(out['perplexity'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(out['used_fraction'], 0.5)
  assert int(out['restarted']) == 0


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_stats_change_in_train_calls_and_never_in_eval_calls(cls):
  module = cls(num_embeddings=8, embedding_dim=4, dead_code_window=2)
  variables = _init(module, jnp.zeros((1, 4)))
  for step in range(3):
    inputs = _normal(16, 4, seed=step)
    _, trained = _train(module, variables, inputs, seed=step)
    assert not np.array_equal(trained['vq_stats']['cluster_size'],
                              variables['vq_stats']['cluster_size'])
    if cls is quantizer_lib.VectorQuantizerEMA:
      assert not np.array_equal(trained['vq_stats']['codebook'],
                                variables['vq_stats']['codebook'])
    variables = trained

  for step in range(3):
    inputs = _normal(16, 4, seed=10 + step)
    _, new_stats = _eval(module, variables, inputs)
    jax.tree.map(np.testing.assert_array_equal, new_stats,
                 variables['vq_stats'])


def test_ema_update_equals_a_hand_computed_one():
  decay, eps = 0.5, 0.1
  module = quantizer_lib.VectorQuantizerEMA(num_embeddings=3, embedding_dim=2,
                                            decay=decay, epsilon=eps)
  codebook = np.array([[0., 0.], [4., 0.], [0., 4.]], np.float32)
  cluster_size = np.array([2., 1., 3.], np.float32)
  embed_sum = np.array([[1., 1.], [4., 0.], [0., 9.]], np.float32)
  inputs = np.array([[0.5, 0.], [1., 1.], [3., 1.], [-1., 0.]], np.float32)
  variables = _set_stats(_init(module, inputs), codebook=codebook,
                         cluster_size=cluster_size, embed_sum=embed_sum)

  out, trained = _train(module, variables, jnp.asarray(inputs))

  np.testing.assert_array_equal(out['codes'], [0, 0, 1, 0])
  counts = np.array([3., 1., 0.])
  sums = np.array([[0.5, 1.], [3., 1.], [0., 0.]])
  new_size = decay * cluster_size + (1 - decay) * counts  # [2.5, 1, 1.5]
  new_sum = decay * embed_sum + (1 - decay) * sums
  total = new_size.sum()
  smoothed = (new_size + eps) / (total + 3 * eps) * total
  stats = trained['vq_stats']
  np.testing.assert_allclose(stats['cluster_size'], new_size, rtol=1e-6)
  np.testing.assert_allclose(stats['embed_sum'], new_sum, rtol=1e-6)
  np.testing.assert_allclose(stats['codebook'], new_sum / smoothed[:, None],
                             rtol=1e-6)
  np.testing.assert_array_equal(stats['steps_unused'], [0, 0, 0])
  # The output of the call used the codebook from before the update.
  np.testing.assert_array_equal(out['quantized'], codebook[[0, 0, 1, 0]])


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_dead_codes_are_restarted_from_inputs_and_then_used(cls):
  window = 2
  module = cls(num_embeddings=8, embedding_dim=3, dead_code_window=window)
  inputs = _normal(32, 3, seed=3)
  variables = _init(module, inputs)
  # Codes 0..3 are inputs (always chosen); 4..7 are far from every input.
  codebook = np.concatenate([np.asarray(inputs[:4]),
                             np.asarray(inputs[4:8]) + 100.0])
  if cls is quantizer_lib.VectorQuantizerEMA:
    variables = _set_stats(variables, codebook=codebook, embed_sum=codebook)
  else:
    variables = {**variables, 'params': {'codebook': jnp.asarray(codebook)}}

  out, variables = _train(module, variables, inputs, seed=1)
  assert int(out['restarted']) == 0
  np.testing.assert_array_equal(variables['vq_stats']['steps_unused'][4:], 1)
  out, variables = _train(module, variables, inputs, seed=2)
  assert int(out['restarted']) == 4

  new_codes = _codebook(variables)[4:]
  flat = np.asarray(inputs)
  # Each restarted code is a distinct input vector.
  matches = [np.flatnonzero(np.all(np.isclose(flat, c, atol=1e-4), axis=1))
             for c in new_codes]
  assert all(len(m) >= 1 for m in matches)
  assert len({int(m[0]) for m in matches}) == 4
  np.testing.assert_array_equal(variables['vq_stats']['steps_unused'], 0)
  np.testing.assert_array_equal(variables['vq_stats']['cluster_size'][4:], 1.0)

  out, variables = _train(module, variables, inputs, seed=3)
  assert int(out['restarted']) == 0
  assert set(range(4, 8)) <= set(np.asarray(out['codes']).tolist())
  assert float(out['used_fraction']) == 1.0


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_kmeans_init_runs_once_on_the_first_train_batch(cls):
  centres = np.array([[5., 0.], [-5., 0.], [0., 5.], [0., -5.]], np.float32)
  noise = 0.1 * np.asarray(_normal(64, 2, seed=0))
  inputs = jnp.asarray(np.repeat(centres, 16, axis=0) + noise)
  module = cls(num_embeddings=4, embedding_dim=2, kmeans_init=True)
  variables = _init(module, inputs)
  assert not bool(variables['vq_stats']['initialized'])

  out, trained = _train(module, variables, inputs, seed=5)
  assert bool(trained['vq_stats']['initialized'])
  codebook = _codebook(trained)
  expected = np.repeat(centres, 16, axis=0) + noise
  for i, centre in enumerate(centres):
    distances = np.linalg.norm(codebook - centre, axis=1)
    # The centroid of the cluster: the mean of its 16 points.
    np.testing.assert_allclose(codebook[np.argmin(distances)],
                               expected[16 * i:16 * (i + 1)].mean(0),
                               atol=1e-5)
  assert float(out['used_fraction']) == 1.0  # Searched with the new codebook.

  # Later train calls only apply the usual update, never k-means again.
  shifted = inputs + 1.0
  _, again = _train(module, trained, shifted, seed=6)
  _, plain = _train(module.clone(kmeans_init=False), trained, shifted, seed=6)
  jax.tree.map(np.testing.assert_array_equal, again['vq_stats'],
               plain['vq_stats'])


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_straight_through_gradient_reaches_the_inputs(cls):
  module = cls(num_embeddings=5, embedding_dim=3, commitment_cost=0.0)
  inputs = _normal(2, 4, 3, seed=0)
  variables = _init(module, inputs)
  weights = _normal(2, 4, 3, seed=1)

  def f(x):
    return jnp.sum(module.apply(variables, x, train=False)['quantized']
                   * weights)

  np.testing.assert_allclose(jax.jit(jax.grad(f))(inputs), weights, rtol=1e-6)


def test_commitment_gradient_pulls_inputs_towards_their_codes():
  module = quantizer_lib.VectorQuantizerEMA(num_embeddings=5, embedding_dim=3,
                                            commitment_cost=0.25)
  inputs = _normal(6, 3, seed=0)
  variables = _init(module, inputs)
  out, _ = _eval(module, variables, inputs)
  grad = jax.jit(jax.grad(
      lambda x: module.apply(variables, x, train=False)['loss']))(inputs)
  expected = 0.25 * 2 * (inputs - out['quantized']) / inputs.size
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_learned_codebook_gets_gradients_from_the_codebook_loss():
  module = quantizer_lib.VectorQuantizer(num_embeddings=6, embedding_dim=3)
  inputs = _normal(10, 3, seed=0)
  variables = _init(module, inputs)
  out, _ = _eval(module, variables, inputs)

  def loss(params):
    return module.apply({**variables, 'params': params}, inputs,
                        train=False)['codebook_loss']

  grad = np.asarray(jax.jit(jax.grad(loss))(variables['params'])['codebook'])
  used = np.unique(np.asarray(out['codes']))
  # d/de_k mean||sg(x) - e_k||^2 = 2 sum_{x -> k} (e_k - x) / (n d).
  codebook = np.asarray(variables['params']['codebook'])
  expected = np.zeros_like(codebook)
  for x, k in zip(np.asarray(inputs), np.asarray(out['codes'])):
    expected[k] += 2 * (codebook[k] - x) / inputs.size
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(grad[used]).sum(axis=1) > 0)
  # The EMA quantizer has no codebook loss.
  ema = quantizer_lib.VectorQuantizerEMA(num_embeddings=6, embedding_dim=3)
  ema_out, _ = _eval(ema, _init(ema, inputs), inputs)
  assert float(ema_out['codebook_loss']) == 0.0


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_bfloat16_inputs_are_searched_in_float32(cls):
  # Codes 0 and 1 round to the same bfloat16 number (1 + 2**-7): a bfloat16
  # search would tie and return 0; in float32 code 1 is nearer.
  codebook = np.array([[1 + 2**-7 - 2**-10], [1 + 2**-7 + 2**-11], [-3.]],
                      np.float32)
  assert (jnp.asarray(codebook[0], jnp.bfloat16)
          == jnp.asarray(codebook[1], jnp.bfloat16))
  module = cls(num_embeddings=3, embedding_dim=1)
  inputs = jnp.full((2, 1), 1 + 2**-7, jnp.bfloat16)
  variables = _init(module, inputs)
  if cls is quantizer_lib.VectorQuantizerEMA:
    variables = _set_stats(variables, codebook=codebook)
  else:
    variables = {**variables, 'params': {'codebook': jnp.asarray(codebook)}}
  out, _ = _eval(module, variables, inputs)
  np.testing.assert_array_equal(out['codes'], [1, 1])
  assert out['quantized'].dtype == jnp.float32
  assert out['loss'].dtype == jnp.float32


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_wrong_embedding_dim_is_a_clear_error(cls):
  module = cls(num_embeddings=8, embedding_dim=4)
  with pytest.raises(ValueError, match='embedding_dim=4.*shape \\(2, 3, 5\\)'):
    _init(module, jnp.zeros((2, 3, 5)))


def test_unknown_quantizer_name_is_refused():
  with pytest.raises(ValueError, match="'ema' or 'vq'"):
    quantizer_lib.make_quantizer('gumbel', num_embeddings=4, embedding_dim=2)


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_train_statistics_do_not_depend_on_the_device_count(cls):
  """Global-view jit on 8 devices updates the codebook like one device."""
  assert jax.device_count() == 8  # tests/conftest.py: 8 fake CPU devices.
  module = cls(num_embeddings=16, embedding_dim=4, dead_code_window=1,
               kmeans_init=True)
  inputs = np.asarray(_normal(8, 4, 4, 4, seed=0))
  variables = _init(module, jnp.asarray(inputs))

  def step(variables, inputs, rng):
    out, stats = module.apply(variables, inputs, train=True, rngs={'vq': rng},
                              mutable=['vq_stats'])
    return out, {**variables, **stats}

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh(devices=devices)
    sharded_step = jax.jit(
        step, in_shardings=(parallel.replicated(mesh),
                            parallel.data_sharding(mesh),
                            parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh))
    # Laid out as the step returns it, so the step compiles once.
    state = jax.device_put(variables, parallel.replicated(mesh))
    for i in range(3):
      batch = jax.device_put(inputs + i, parallel.data_sharding(mesh))
      out, state = sharded_step(state, batch, jax.random.key(i))
    results.append((out, state))
  (out1, state1), (out8, state8) = results
  np.testing.assert_array_equal(out1['codes'], out8['codes'])
  assert int(out1['restarted']) == int(out8['restarted'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               state1, state8)


def test_rotation_trick_rotates_the_gradient_and_keeps_the_value():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  e = rng.normal(size=(7, 5)).astype(np.float32)
  g = rng.normal(size=(7, 5)).astype(np.float32)
  value, vjp = jax.vjp(lambda x: quantizer_lib.rotation_trick(x, e), x)
  np.testing.assert_allclose(value, e, rtol=1e-5, atol=1e-6)
  (grad,) = vjp(jnp.asarray(g))
  for xi, ei, gi, grad_i in zip(x.astype(np.float64), e.astype(np.float64),
                                g.astype(np.float64), np.asarray(grad)):
    # The matrix by hand: lambda R with R = I - 2 r r^T + 2 e^ x^^T.
    x_hat, e_hat = xi / np.linalg.norm(xi), ei / np.linalg.norm(ei)
    r = (x_hat + e_hat) / np.linalg.norm(x_hat + e_hat)
    rot = np.eye(5) - 2 * np.outer(r, r) + 2 * np.outer(e_hat, x_hat)
    np.testing.assert_allclose(rot @ rot.T, np.eye(5), atol=1e-9)  # A rotation
    np.testing.assert_allclose(rot @ x_hat, e_hat, atol=1e-9)  # x^ -> e^.
    scale = np.linalg.norm(ei) / np.linalg.norm(xi)
    np.testing.assert_allclose(grad_i, scale * rot.T @ gi, rtol=1e-4,
                               atol=1e-5)
    # The gradient keeps its angle: <grad, x^> = lambda <g, e^>.
    np.testing.assert_allclose(grad_i @ x_hat, scale * gi @ e_hat, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_rotation_gradient_of_the_quantizer(cls):
  module = cls(num_embeddings=5, embedding_dim=3, commitment_cost=0.0,
               gradient='rotation')
  inputs = _normal(2, 4, 3, seed=0)
  variables = _init(module, inputs)
  weights = _normal(2, 4, 3, seed=1)
  out, _ = _eval(module, variables, inputs)
  # Forward: exactly the codes, as with the straight-through estimator.
  codebook = _codebook(variables)
  np.testing.assert_array_equal(out['quantized'],
                                codebook[np.asarray(out['codes'])])

  def f(x):
    return jnp.sum(module.apply(variables, x, train=False)['quantized']
                   * weights)

  grad = jax.jit(jax.grad(f))(inputs)
  expected = jax.vjp(
      lambda x: quantizer_lib.rotation_trick(x, out['quantized']), inputs
  )[1](weights)[0]
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(grad, weights, atol=1e-3)  # Not straight-through.


def test_an_unknown_gradient_rule_is_refused():
  module = quantizer_lib.VectorQuantizerEMA(num_embeddings=5, embedding_dim=3,
                                            gradient='straight')
  with pytest.raises(ValueError, match='straight_through'):
    _init(module, jnp.zeros((2, 3)))


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_l2_normalized_search_is_cosine_similarity(cls):
  module = cls(num_embeddings=13, embedding_dim=4, l2_normalize=True)
  inputs = _normal(3, 5, 4, seed=2) * 7.0  # Far from unit length.
  variables = _init(module, inputs)
  out, _ = _eval(module, variables, inputs)
  codebook = _codebook(variables).astype(np.float64)
  flat = np.asarray(inputs, np.float64).reshape(-1, 4)
  cosine = (flat @ codebook.T / np.linalg.norm(flat, axis=1)[:, None]
            / np.linalg.norm(codebook, axis=1)[None])
  np.testing.assert_array_equal(np.asarray(out['codes']).ravel(),
                                np.argmax(cosine, axis=1))
  unit = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
  np.testing.assert_allclose(
      out['quantized'], unit[np.asarray(out['codes'])].astype(np.float32),
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      module.apply(variables, out['codes'], method=module.lookup),
      out['quantized'], rtol=1e-6, atol=1e-7)
  # The commitment loss is measured between unit vectors.
  x_unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  np.testing.assert_allclose(
      out['commitment_loss'],
      np.mean((x_unit - unit[np.asarray(out['codes']).ravel()]) ** 2),
      rtol=1e-5)


def test_l2_normalized_ema_codes_stay_on_the_sphere_in_training():
  module = quantizer_lib.VectorQuantizerEMA(
      num_embeddings=8, embedding_dim=3, l2_normalize=True,
      dead_code_window=1, kmeans_init=True)
  inputs = _normal(64, 3, seed=3) * 5.0
  variables = _init(module, inputs)
  for seed in range(3):
    out, variables = _train(module, variables, inputs, seed)
    lengths = np.linalg.norm(np.asarray(out['quantized']), axis=-1)
    np.testing.assert_allclose(lengths, 1.0, rtol=1e-5)

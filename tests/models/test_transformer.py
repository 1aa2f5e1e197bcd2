"""The transformer prior: the PixelCNN's proofs, on the same sampler.

Cached logits equal the full pass, the cached sampler draws the reference
sampler's codes, causality by gradient, 8 devices equal 1, plus the
transformer's own refusals (a map of another size) and remat.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.models import pixelcnn_util
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax.models import transformer

# A class-conditioned top prior and a lower prior over two upper levels;
# non-square maps.
TOP = dict(num_classes=3, map_shape=(3, 5))
LOWER = dict(num_classes=3, cond_num_embeddings=(5, 6), cond_stack_blocks=1,
             map_shape=(4, 6))
# The lower prior with cross-attention to the upper levels instead of their
# map added to the inputs.
CROSS = dict(LOWER, cond_mode='cross')
KINDS = {'top': TOP, 'lower': LOWER, 'cross': CROSS}
UPPER_SHAPES = ((2, 2, 3), (2, 4, 3))
CONTROLS = [(1.0, 0, 1.0), (1.5, 3, 1.0), (0.7, 4, 0.9)]


def make_prior(**kwargs) -> transformer.TransformerPrior:
  """A tiny transformer prior, full float32 products (see pixelcnn_util)."""
  fields = dict(num_embeddings=7, num_channels=8, num_layers=2, num_heads=2,
                mlp_ratio=2, dropout_rate=0.1, precision='highest')
  fields.update(kwargs)
  return transformer.TransformerPrior(**fields)


def _setup(kind, batch=2):
  model = make_prior(**KINDS[kind])
  shape = (batch, *model.map_shape)
  rng = np.random.default_rng(1)
  cond = tuple(jnp.asarray(rng.integers(0, k, (batch, *s[1:])), jnp.int32)
               for k, s in zip(model.cond_num_embeddings, UPPER_SHAPES))
  labels = jnp.asarray(([2, 3] * batch)[:batch], jnp.int32)  # Incl. no label.
  codes = jnp.asarray(rng.integers(0, 7, shape), jnp.int32)
  variables = pixelcnn_util.random_variables(model, codes, cond, labels,
                                             seed=2)
  return model, variables, shape, cond, labels, codes


@pytest.mark.parametrize('kind', ['top', 'lower', 'cross'])
def test_cached_logits_equal_full_forward(kind):
  model, variables, _, cond, labels, codes = _setup(kind)
  full = jax.jit(functools.partial(model.apply, train=False))(
      variables, codes, cond_codes=cond, labels=labels)
  cached = sampling.cached_logits(model, variables, codes, cond_codes=cond,
                                  labels=labels)
  assert cached.shape == full.shape and cached.dtype == jnp.float32
  full, cached = np.asarray(full), np.asarray(cached)
  scale = np.abs(full).max()
  assert scale > 0.1
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize('kind', ['top', 'lower', 'cross'])
def test_cached_sampler_equals_reference(kind):
  model, variables, shape, cond, labels, _ = _setup(kind)
  for temperature, top_k, top_p in CONTROLS:
    kwargs = dict(shape=shape, cond_codes=cond, labels=labels,
                  rng=jax.random.key(7), temperature=temperature,
                  top_k=top_k, top_p=top_p)
    cached = sampling.sample_level(model, variables, **kwargs)
    reference = sampling.reference_sample_level(model, variables, **kwargs)
    np.testing.assert_array_equal(cached, reference,
                                  err_msg=f'{(temperature, top_k, top_p)}')
    if top_k == 0:
      assert len(np.unique(cached)) > 2  # Samples, not a constant map.
  # Guidance (the "no label" path label dropout trains) and unrolling.
  kwargs = dict(shape=shape, cond_codes=cond, labels=jnp.asarray([0, 2]),
                rng=jax.random.key(9), guidance=2.0)
  np.testing.assert_array_equal(
      sampling.sample_level(model, variables, **kwargs, unroll=2),
      sampling.reference_sample_level(model, variables, **kwargs))
  # A code discount (`sampling.discount`) beside guidance: the same draw
  # in both samplers, and another than without it.
  discount = jnp.full((model.num_embeddings,), 1.5 / model.num_embeddings)
  discounted = sampling.sample_level(model, variables, **kwargs,
                                     code_discount=discount)
  np.testing.assert_array_equal(discounted, sampling.reference_sample_level(
      model, variables, **kwargs, code_discount=discount))
  assert not np.array_equal(discounted, sampling.sample_level(
      model, variables, **kwargs))


def _dependency_matrix(model, variables, codes, cond, labels, train):
  """[n, n]: |d logits at position i / d embedding at position j|, summed."""
  b, height, width = codes.shape

  def logits_of(embedded):
    context = model.apply(variables, cond, labels, codes.shape,
                          method=model.context)
    out = model.apply(variables, embedded, context, train=train,
                      method=model.forward_embedded,
                      rngs={'dropout': jax.random.key(3)})
    return out[0]

  embedded = model.apply(variables, codes,
                         method=lambda m, x: m.embed(x))
  jac = jax.jit(jax.jacrev(logits_of))(embedded)  # [h, w, K, b, h, w, C]
  jac = np.abs(np.asarray(jac[:, :, :, 0])).sum(axis=(2, 5))
  n = height * width
  del b
  return jac.reshape(n, n)


@pytest.mark.parametrize('kind,train', [('top', False), ('lower', True),
                                        ('cross', True)])
def test_causal_by_gradient(kind, train):
  model, variables, _, cond, labels, codes = _setup(kind)
  dep = _dependency_matrix(model, variables, codes, cond, labels, train)
  for i in range(dep.shape[0]):
    # Exactly zero, not small: the shift and the mask are structural.
    np.testing.assert_array_equal(dep[i, i:], 0.0,
                                  err_msg=f'position {i} sees later codes')
    if i:
      # Attention reaches every earlier position (no blind spot).
      assert (dep[i, :i] > 0).all(), f'position {i} misses earlier codes'


@pytest.mark.parametrize('kind', ['lower', 'cross'])
def test_depends_on_upper_codes_and_labels(kind):
  model, variables, _, cond, labels, codes = _setup(kind)
  apply = jax.jit(functools.partial(model.apply, train=False))
  base = apply(variables, codes, cond_codes=cond, labels=labels)
  other_cond = (cond[0], (cond[1] + 1) % 6)
  assert not np.allclose(base, apply(variables, codes, cond_codes=other_cond,
                                     labels=labels))
  assert not np.allclose(base, apply(variables, codes, cond_codes=cond,
                                     labels=(labels + 1) % 4))
  # Position 0 predicts from the label and upper codes alone.
  other_codes = codes.at[:, 1:].set((codes[:, 1:] + 1) % 7)
  np.testing.assert_array_equal(
      apply(variables, other_codes, cond_codes=cond, labels=labels)[:, 0, 0],
      base[:, 0, 0])


@pytest.mark.parametrize('kind', ['lower', 'cross'])
def test_sampling_split_over_8_devices_equals_one_device(kind):
  model, variables, shape, cond, _, _ = _setup(kind, batch=8)
  labels = jnp.asarray([0, 1, 2, 3, 2, 1, 0, 3], jnp.int32)
  mesh = parallel.create_mesh(ml_collections.ConfigDict({'data': 4, 'fsdp': 2}))
  kwargs = dict(shape=shape, cond_codes=cond, labels=labels,
                rng=jax.random.key(11), temperature=1.2, top_p=0.95)
  one = sampling.sample_level(model, variables, **kwargs)
  split = sampling.sample_level(model, variables, **kwargs, mesh=mesh)
  np.testing.assert_array_equal(split, one)
  assert len(np.unique(np.asarray(one))) > 2


@pytest.mark.parametrize('kind', ['lower', 'cross'])
def test_remat_keeps_outputs_and_gradients(kind):
  model, variables, _, cond, labels, codes = _setup(kind)
  remat = model.clone(remat=True)
  shapes = jax.eval_shape(lambda: remat.init(
      jax.random.key(0), codes, cond_codes=cond, labels=labels, train=False))
  assert (jax.tree.structure(shapes) == jax.tree.structure(variables))

  def loss(m, params):
    logits = m.apply({'params': params}, codes, cond_codes=cond,
                     labels=labels, train=True,
                     rngs={'dropout': jax.random.key(4)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  # Jitted: one program each, not a compilation per operation.
  lp, gp = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(
      variables['params'])
  lr, gr = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(
      variables['params'])
  np.testing.assert_allclose(lr, lp, rtol=1e-6)
  jax.tree.map(lambda r, p: np.testing.assert_allclose(r, p, rtol=1e-5,
                                                       atol=1e-7), gr, gp)


def test_map_of_another_size_is_refused():
  model, variables, _, cond, labels, _ = _setup('top')
  with pytest.raises(sampling.SamplingInputError, match=r'\(3, 5\) maps'):
    sampling.sample_level(model, variables, shape=(2, 5, 3), labels=labels,
                          rng=jax.random.key(0))
  with pytest.raises(ValueError, match='position tables fix the size'):
    model.apply(variables, jnp.zeros((2, 5, 3), jnp.int32), labels=labels,
                train=False)
  del cond


def test_bfloat16_prior_computes_and_samples_in_bfloat16():
  model, variables, shape, cond, labels, codes = _setup('lower')
  bf16, bf16_vars = sampling.cast_prior(model, variables, 'bfloat16')
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_vars))
  logits = bf16.apply(bf16_vars, codes, cond_codes=cond, labels=labels,
                      train=False)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  cached = sampling.cached_logits(bf16, bf16_vars, codes, cond_codes=cond,
                                  labels=labels)
  # The same bfloat16 products in both paths: the same argmax nearly
  # everywhere (ties within bfloat16 rounding may flip).
  agree = np.mean(np.argmax(cached, -1) == np.argmax(logits, -1))
  assert agree > 0.9, agree
  drawn = sampling.sample_level(bf16, bf16_vars, shape=shape,
                                cond_codes=cond, labels=labels,
                                rng=jax.random.key(5))
  assert drawn.shape == shape and 0 <= int(drawn.min()) <= int(
      drawn.max()) < model.num_embeddings


def test_cross_attention_adds_its_own_parameters_only():
  """'cross' leaves the inputs free of the upper codes and adds per-block
  cross-attention; a top prior has nothing to attend, so it is unchanged."""
  add = _setup('lower')[1]['params']
  cross = _setup('cross')[1]['params']
  assert 'memory_norm' in cross and 'memory_norm' not in add
  assert set(cross['blocks_0']) - set(add['blocks_0']) == {
      'cross_norm', 'cross_query', 'cross_key', 'cross_value', 'cross_proj'}
  top_cross = make_prior(**TOP, cond_mode='cross')
  codes = jnp.zeros((1, *TOP['map_shape']), jnp.int32)
  shapes = jax.eval_shape(lambda: top_cross.init(
      jax.random.key(0), codes, train=False))
  assert not top_cross.cross_attends
  assert 'cross_query' not in shapes['params']['blocks_0']
  with pytest.raises(ValueError, match='cond_mode must be one of'):
    make_prior(**LOWER, cond_mode='concat').init(
        jax.random.key(0), jnp.zeros((1, 4, 6), jnp.int32),
        cond_codes=tuple(jnp.zeros((1, *s[1:]), jnp.int32)
                         for s in UPPER_SHAPES), train=False)

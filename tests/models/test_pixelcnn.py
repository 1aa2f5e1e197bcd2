"""Tests for the gated PixelCNN prior: causality, conditioning, overfitting."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.models import pixelcnn_util
from vqvae2_jax import sampling
from vqvae2_jax.models import pixelcnn

K = 7
SHAPE = (2, 4, 5)  # Non-square: rows and columns must not be confused.
UPPER_SHAPE = (2, 2, 5)  # Upsampled by (2, 1).

# One prior per layer type; each adds the type under test to a small stack.
CASES = {
    # Enough blocks that the receptive field covers every earlier position.
    'gated': dict(num_layers=5),
    'gated_filter_2': dict(num_layers=5, filter_size=2),
    'attention': dict(num_layers=2, attention_layers=2, num_heads=2),
    'class': dict(num_layers=2, num_classes=3),
    'cond_stack': dict(num_layers=2, num_classes=3, cond_num_embeddings=(5,),
                       cond_stack_blocks=2),
    # Every layer type at once, with dropout active.
    'all_train': dict(num_layers=3, attention_layers=1, num_heads=2,
                      num_classes=3, cond_num_embeddings=(5,),
                      cond_stack_blocks=1, dropout_rate=0.5),
}

_prior = pixelcnn_util.make_prior


def _inputs(model, shape=SHAPE, seed=0):
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, K, shape), jnp.int32)
  cond = tuple(jnp.asarray(rng.integers(0, k, UPPER_SHAPE), jnp.int32)
               for k in model.cond_num_embeddings)
  labels = (jnp.asarray([0, model.num_classes], jnp.int32)
            if model.num_classes else None)
  return codes, cond, labels


def _dependency_matrix(model, variables, codes, cond, labels, *, train):
  """[h*w, h*w]: sum |d logits(i) / d embedding(j)| for example 0."""
  _, height, width = codes.shape

  @jax.jit
  def jacobian(variables, codes, cond, labels):
    context = model.apply(variables, cond, labels, codes.shape,
                          method=model.conditioning)
    embedded = model.apply(variables, codes, method=lambda m, x: m.embed(x))

    def logits_of(e):
      out = model.apply(variables, e, context, train=train,
                        method=model.forward_embedded,
                        rngs={'dropout': jax.random.key(3)})
      return out[0]

    return jax.jacrev(logits_of)(embedded)  # [h, w, K, b, h, w, C]

  jac = jacobian(variables, codes, cond, labels)
  jac = np.abs(np.asarray(jac[:, :, :, 0])).sum(axis=(2, 5))  # [h, w, h, w]
  n = height * width
  return jac.reshape(n, n)


@pytest.mark.parametrize('case', sorted(CASES))
def test_causal_by_gradient(case):
  train = case.endswith('_train')
  model = _prior(**CASES[case])
  codes, cond, labels = _inputs(model)
  variables = pixelcnn_util.random_variables(model, codes, cond, labels)
  dep = _dependency_matrix(model, variables, codes, cond, labels, train=train)
  n = dep.shape[0]
  for i in range(n):
    # Exactly zero, not small: the masking is structural.
    np.testing.assert_array_equal(dep[i, i:], 0.0,
                                  err_msg=f'{case}: position {i} sees later')
    if i:
      assert dep[i, :i].max() > 0, f'{case}: position {i} sees nothing'
  if case.startswith('gated'):
    # No blind spot: with enough blocks every earlier position is seen.
    below = dep[np.tril_indices(n, -1)]
    assert (below > 0).all(), f'{case}: blind spot'


def test_lower_prior_depends_on_upper_codes_and_labels():
  model = _prior(**CASES['cond_stack'])
  codes, cond, labels = _inputs(model)
  variables = pixelcnn_util.random_variables(model, codes, cond, labels)

  @jax.jit
  def apply(params, cond, labels):
    return model.apply({'params': params}, codes, cond_codes=cond,
                       labels=labels, train=False)

  params = variables['params']
  base = apply(params, cond, labels)
  changed = np.abs(np.asarray(apply(params, ((cond[0] + 1) % 5,), labels)
                              - base))
  # Even the first position, which sees no codes of its own level, changes.
  assert (changed[:, 0, 0].max(axis=-1) > 1e-4).all()
  changed = np.abs(np.asarray(apply(params, cond, jnp.array([1, 2])) - base))
  assert (changed[:, 0, 0].max(axis=-1) > 1e-4).all()
  # The gradient reaches the upper levels' embedding.
  grads = jax.jit(jax.grad(lambda p: apply(p, cond, labels)[:, 0, 0].sum()))(
      params)
  assert np.abs(grads['cond_stack']['embed_0']['embedding']).max() > 0


def test_init_shapes_dtypes_and_labels_none():
  model = _prior(num_layers=1, num_classes=3, attention_layers=1, num_heads=2,
                 dtype=jnp.bfloat16)
  codes, _, _ = _inputs(model)
  variables = jax.jit(lambda key: model.init(key, codes, labels=None,
                                             train=False))(jax.random.key(0))
  assert set(variables) == {'params'}
  dtypes = {x.dtype for x in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}  # Parameters stay float32.

  @jax.jit
  def apply(variables, labels, key):
    train_logits = model.apply(variables, codes, labels=labels, train=True,
                               rngs={'dropout': key})
    return train_logits, model.apply(variables, codes, labels=labels,
                                     train=False)

  train_logits, none = apply(variables, None, jax.random.key(1))
  assert train_logits.shape == (*SHAPE, K)
  assert train_logits.dtype == jnp.float32 and none.dtype == jnp.float32
  # labels=None is the "no label" index everywhere.
  _, explicit = apply(variables, jnp.full((2,), 3), jax.random.key(1))
  np.testing.assert_array_equal(none, explicit)


def test_dropout_only_in_training():
  model = _prior(dropout_rate=0.5)
  codes, _, _ = _inputs(model)
  variables = pixelcnn_util.random_variables(model, codes)

  @functools.partial(jax.jit, static_argnums=0)
  def run(train, key):
    return model.apply(variables, codes, train=train, rngs={'dropout': key})

  np.testing.assert_array_equal(run(False, jax.random.key(1)),
                                run(False, jax.random.key(2)))
  assert np.abs(np.asarray(run(True, jax.random.key(1))
                           - run(True, jax.random.key(2)))).max() > 0


@pytest.mark.parametrize('kernel_size', [(2, 3), (1, 2), (1, 1)])
def test_patch_conv_is_a_valid_conv(kernel_size):
  # Same parameters (names, shapes, initial values) and, up to rounding,
  # the same outputs and gradients as nn.Conv(padding='VALID').
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 6, 4)),
                  jnp.float32)
  ours = pixelcnn.PatchConv(8, kernel_size, precision='highest')
  theirs = nn.Conv(8, kernel_size, padding='VALID', precision='highest',
                   kernel_init=pixelcnn.conv_kernel_init)
  key = jax.random.key(0)
  params = ours.init(key, x)
  jax.tree.map(np.testing.assert_array_equal, params, theirs.init(key, x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # A nonzero bias too.
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1))(
      params, x) for m in (ours, theirs)]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-4), *grads)


def test_attention_layers_are_spread():
  assert pixelcnn.attention_positions(20, 4) == {4: 0, 9: 1, 14: 2, 19: 3}
  assert pixelcnn.attention_positions(6, 1) == {5: 0}
  assert pixelcnn.attention_positions(3, 0) == {}
  with pytest.raises(ValueError, match='attention_layers'):
    pixelcnn.attention_positions(2, 3)


def test_clear_errors():
  model = _prior(**CASES['cond_stack'])
  codes, _, labels = _inputs(model)

  def init(model, **kwargs):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), codes,
                                             train=False, **kwargs))

  with pytest.raises(ValueError, match='conditioning code maps'):
    init(model, labels=labels)
  with pytest.raises(ValueError, match='integer factor'):
    init(model, cond_codes=(codes[:, :3],), labels=labels)
  with pytest.raises(ValueError, match='num_classes=0'):
    init(_prior(), labels=labels)
  with pytest.raises(ValueError, match='num_heads'):
    init(_prior(attention_layers=1, num_heads=3))
  with pytest.raises(ValueError, match='attention_layers'):
    init(_prior(attention_layers=3))


def test_resolve_labels_is_the_no_label_index_or_a_refusal():
  np.testing.assert_array_equal(pixelcnn.resolve_labels(None, 3, 10),
                                [10, 10, 10])
  given = jnp.asarray([0, 10], jnp.int32)
  assert pixelcnn.resolve_labels(given, 2, 10) is given
  assert pixelcnn.resolve_labels(None, 3, 0) is None

  class Refused(ValueError):
    pass

  with pytest.raises(Refused, match=r'num_classes=0\. Fix: pass labels=None'):
    pixelcnn.resolve_labels(given, 2, 0, Refused)


def test_check_labels_is_the_one_check_of_given_labels():
  class Refused(ValueError):
    pass

  check = functools.partial(pixelcnn.check_labels, error=Refused)
  np.testing.assert_array_equal(check([0, 10], 2, 10), [0, 10])
  np.testing.assert_array_equal(check(None, 2, 10), [10, 10])
  assert check(None, 2, 0) is None
  for labels, batch, num_classes, message in [
      ([0, 1], 2, 0, r'num_classes=0\. Fix: pass labels=None'),
      ([0], 2, 10, r'shape \(1,\)\. Fix: pass one label per map'),
      ([0.0, 1.0], 2, 10, r'dtype float64\. Fix: pass integer'),
      ([0, 11], 2, 10, r'\[0, 11\], outside \[0, 10\]\. Fix: use class '
       r'indices 0\.\.9, or 10 \(or labels=None\)'),
      ([-1, 0], 2, 10, r'-1 is not "no label"')]:
    with pytest.raises(Refused, match=message):
      check(labels, batch, num_classes)
  # Without the "no label" index (the API's): only None means no label.
  with pytest.raises(Refused, match=r'outside \[0, 9\]\. Fix: use class '
                     r'indices 0\.\.9, or labels=None for "no label"\.'):
    check([0, 10], 2, 10, no_label_ok=False, per='image')
  # Traced labels: shape and dtype only (the values are not known yet).
  jax.jit(lambda x: check(x, 2, 10))(jnp.asarray([0, 99], jnp.int32))


def _assert_rel_close(cached, full, what):
  """max |cached - full| <= 1e-5 * max |full| (float32 rounding only)."""
  err = np.abs(np.asarray(cached) - np.asarray(full)).max()
  assert err <= 1e-5 * np.abs(np.asarray(full)).max(), f'{what}: error {err}'


def _layer_variables(layer, *args):
  shapes = jax.eval_shape(
      lambda: layer.init(jax.random.key(0), *args, train=False))
  return pixelcnn_util.draw_variables(shapes, seed=1)


# (first, filter_size, conditioned): the first block's shifted, residual-free
# form and later blocks, both kernel parities, with and without a cond map.
@pytest.mark.parametrize('first,filter_size,conditioned',
                         [(True, 3, True), (False, 3, True), (True, 2, False),
                          (False, 2, False), (False, 4, True)])
def test_gated_block_steps_equal_full_path(first, filter_size, conditioned):
  channels = 8
  block = pixelcnn.GatedBlock(channels, filter_size, first=first,
                              conditioned=conditioned, precision='highest')
  b, height, width = SHAPE
  rng = np.random.default_rng(2)
  draw = lambda: jnp.asarray(rng.normal(size=(b, height, width, channels)),
                             jnp.float32)
  # Distinct vertical and horizontal inputs, so that a mix-up shows.
  v, h = draw(), draw()
  cond = draw() if conditioned else None
  variables = _layer_variables(block, v, h, cond)
  v_full, h_full = jax.jit(lambda v, h, cond: block.apply(
      variables, v, h, cond, train=False))(v, h, cond)

  cache = block.apply(variables, b, width, method=block.init_cache)
  step_row = jax.jit(functools.partial(block.apply, variables,
                                       method=block.step_row))
  step_position = jax.jit(functools.partial(block.apply, variables,
                                            method=block.step_position))
  # The first block takes what its shift brings: row r - 1 and (r, c - 1).
  # At r == 0 and c == 0 that index wraps to the last row / column, whose
  # values the block must ignore (the full path pads with zeros there).
  shift = 1 if first else 0
  for r in range(height):
    r_ = jnp.int32(r)
    v_row, cache = step_row(cache, v[:, r - shift][:, None],
                            None if cond is None else cond[:, r:r + 1], r_)
    _assert_rel_close(v_row[:, 0], v_full[:, r], f'vertical row {r}')
    for c in range(width):
      h_pos, cache = step_position(
          cache, h[:, r, c - shift][:, None, None], jnp.int32(c))
      _assert_rel_close(h_pos[:, 0, 0], h_full[:, r, c],
                        f'horizontal ({r}, {c})')


def test_attention_block_steps_equal_full_path():
  channels = 8
  block = pixelcnn.AttentionBlock(channels, num_heads=2, precision='highest')
  b, height, width = SHAPE
  h = jnp.asarray(np.random.default_rng(3).normal(
      size=(b, height, width, channels)), jnp.float32)
  variables = _layer_variables(block, h)
  full = jax.jit(lambda h: block.apply(variables, h, train=False))(h)

  cache = block.apply(variables, b, height, width, method=block.init_cache)
  fused = block.apply(variables, height, width, method=block.fused_view)
  step_row = jax.jit(functools.partial(block.apply, variables,
                                       method=block.step_row))
  step_position = jax.jit(functools.partial(block.apply, variables,
                                            method=block.step_position))
  for r in range(height):
    cache = step_row(cache, jnp.int32(r))
    for c in range(width):
      out, cache = step_position(cache, h[:, r:r + 1, c:c + 1], jnp.int32(r),
                                 jnp.int32(c), fused)
      _assert_rel_close(out[:, 0, 0], full[:, r, c], f'position ({r}, {c})')


@pytest.mark.parametrize('case', ['attention_class', 'cond_stack'])
def test_overfits_one_batch(case):
  # Distinct labels (and upper codes) tell the examples apart, so even the
  # first position, which has no earlier codes, can be memorised.
  kwargs = dict(attention_layers=1, num_heads=2, num_classes=4)
  if case == 'cond_stack':
    kwargs = dict(num_classes=4, cond_num_embeddings=(5,), cond_stack_blocks=1)
  model = _prior(num_channels=16, dropout_rate=0.0, **kwargs)
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(0, K, (4, 3, 4)), jnp.int32)
  cond = tuple(jnp.asarray(rng.integers(0, 5, (4, 3, 2)), jnp.int32)
               for _ in model.cond_num_embeddings)
  labels = jnp.arange(4, dtype=jnp.int32)
  params = pixelcnn_util.random_variables(model, codes, cond, labels)['params']
  tx = optax.adam(1e-2)

  def loss_fn(params):
    logits = model.apply({'params': params}, codes, cond_codes=cond,
                         labels=labels, train=True,
                         rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, codes).mean()

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       None, length=300)
    return loss_fn(params), losses[0]

  final, first = train(params)
  assert first > 1.0  # About log(7) at initialisation.
  assert final < 0.02, f'loss after 300 steps: {final}'


def _count_remat(fn, *args) -> int:
  """Checkpoint (remat) equations in the jaxpr of fn(*args), nested included."""
  text = str(jax.make_jaxpr(fn)(*args))
  return text.count('checkpoint[') + text.count('remat2[')


def test_remat_keeps_params_outputs_and_gradients():
  # Every layer type, dropout on: remat must replay the same dropout masks.
  fields = CASES['all_train']
  plain, remat = _prior(**fields), _prior(**fields, remat=True)
  codes, cond, labels = _inputs(plain)
  key = jax.random.key(0)
  init = lambda m: m.init(key, codes, cond_codes=cond, labels=labels,
                          train=False)
  variables = init(plain)
  # Same parameter tree, names and values: checkpoints load either way.
  remat_variables = init(remat)
  assert (jax.tree.structure(remat_variables)
          == jax.tree.structure(variables))
  jax.tree.map(np.testing.assert_array_equal, remat_variables, variables)

  def logits(model, variables, train):
    return model.apply(variables, codes, cond_codes=cond, labels=labels,
                       train=train, rngs={'dropout': jax.random.key(5)})

  def loss_and_grads(model, variables, train):
    loss = lambda params: jnp.mean(jax.nn.log_softmax(
        logits(model, {'params': params}, train))[..., 0])
    return jax.value_and_grad(loss)(variables['params'])

  for train in (False, True):
    # The forward pass is the same program: bit for bit.
    np.testing.assert_array_equal(
        jax.jit(functools.partial(logits, remat, train=train))(variables),
        jax.jit(functools.partial(logits, plain, train=train))(variables))
  # The backward pass recomputes in another order: float32 rounding. In
  # training mode only (the one that trains, and the harder case: the
  # recomputed dropout masks must be the forward pass's).
  loss_p, grads_p = jax.jit(
      functools.partial(loss_and_grads, plain, train=True))(variables)
  loss_r, grads_r = jax.jit(
      functools.partial(loss_and_grads, remat, train=True))(variables)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  jax.tree.map(lambda r, p: np.testing.assert_allclose(
      r, p, rtol=1e-5, atol=1e-7), grads_r, grads_p)
  # Remat is really applied: one checkpoint per gated, attention and
  # conditioning-stack block.
  count = lambda m: _count_remat(
      functools.partial(loss_and_grads, m, train=True), variables)
  assert count(plain) == 0
  assert count(remat) >= (fields['num_layers'] + fields['attention_layers']
                          + fields['cond_stack_blocks'])


def test_remat_prior_samples_with_the_same_cache():
  fields = dict(num_layers=2, attention_layers=1, num_heads=2, num_classes=3)
  plain, remat = _prior(**fields), _prior(**fields, remat=True)
  codes, cond, labels = _inputs(plain)
  variables = pixelcnn_util.random_variables(plain, codes, cond, labels)
  full = plain.apply(variables, codes, labels=labels, train=False)
  cached = sampling.cached_logits(remat, variables, codes, labels=labels)
  _assert_rel_close(cached, full, 'cached logits of the remat prior')


@pytest.mark.parametrize('precision', [None, 'highest'])
def test_precision_reaches_every_product(precision):
  # Every dot_general and convolution of the full path and of a position
  # step carries the prior's precision (None: the backend's default).
  model = pixelcnn_util.make_prior(num_layers=2, attention_layers=1,
                                   num_heads=2, num_classes=3,
                                   cond_num_embeddings=(5,),
                                   cond_stack_blocks=1, precision=precision)
  codes = jnp.zeros((1, 4, 4), jnp.int32)
  cond = (jnp.zeros((1, 2, 2), jnp.int32),)
  labels = jnp.zeros((1,), jnp.int32)
  variables = pixelcnn_util.random_variables(model, codes, cond, labels)
  context = model.apply(variables, cond, labels, (1, 4, 4),
                        method=model.prepare)
  cache = model.apply(variables, (1, 4, 4), method=model.init_cache)
  programs = {
      'full': jax.make_jaxpr(lambda v: model.apply(
          v, codes, cond_codes=cond, labels=labels, train=False))(variables),
      'step': jax.make_jaxpr(lambda v: model.apply(
          v, cache, context, jnp.zeros((1,), jnp.int32), jnp.int32(1),
          jnp.int32(2), method=model.step_position))(variables),
  }
  want = (None if precision is None else
          (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST))
  for name, jaxpr in programs.items():
    seen = []

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
          seen.append(eqn.params['precision'])
        for sub in jax.core.jaxprs_in_params(eqn.params):
          walk(sub)

    walk(jaxpr.jaxpr)
    assert len(seen) >= 5, (name, seen)
    assert all(p == want for p in seen), (name, seen)

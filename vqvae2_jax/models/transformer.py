"""A causal transformer prior over one level's codes, with a KV cache.

The other prior family beside the gated PixelCNN (`pixelcnn.py`): a
decoder-only transformer over the level's codes in raster order, the model
that taming-transformers-era tokenizers are paired with. It models the same
p(z | z_upper, y), takes the same arguments and exposes the same incremental
interface (`prepare` / `init_cache` / `step_row` / `step_position`), so the
sampler, the trainer, `Pipeline.log_prob` and the export treat both kinds
alike (`builders.build_prior` picks one per level).

Design choices, and why:

* Inputs. Position t = r * w + c reads the embedding of code t - 1 (a learned
  start vector at t = 0), so its logits depend only on codes strictly before
  it and position 0 predicts from the label and the upper levels alone. To
  each input are added a learned 2-D position (a row embedding plus a column
  embedding: h + w vectors instead of h * w, and the map's geometry is
  explicit), the class embedding (num_classes + 1 entries; the last is "no
  label", which label dropout trains, so one model also samples
  unconditionally and guidance works as for the PixelCNN), and, for lower
  levels, the PixelCNN's `ConditioningStack` over the upper levels' codes at
  this position (`cond_mode='add'`). Adding the conditioning to the inputs
  costs nothing per sampled position beyond one addition. `cond_mode='cross'`
  instead gives every block a cross-attention from its tokens to a memory:
  the conditioning stack's map (at this level's size) plus the 2-D
  positions, normalised once. Its keys and values are computed once per
  sample in `prepare`, so a step pays one more attention per block, over
  h * w memory positions (no mask: the upper codes are all known).
* Blocks. Pre-norm (LayerNorm before attention and before the MLP, a final
  LayerNorm before the logits), the usual stable arrangement of decoder-only
  transformers; no key bias (it cannot change a softmax). Dropout on the inputs and on both residual branches (RNG
  stream 'dropout', training only). Attention softmax in float32 whatever the
  compute dtype; the logits are always float32.
* Cache. Every block keeps the keys and values of the positions sampled so
  far ([batch * heads, h * w, d]), as the PixelCNN's attention blocks do: a
  step runs one token through every block, each writing the token's key
  and value and then attending over its cache with a mask of the positions
  so far; `step_row` only remembers the last code of the finished row (the
  token position (r, 0) reads), so the sampler's row/column scans need no
  transformer-specific branch.
* Sizes. The position tables fix the map size at construction (`map_shape`);
  a map of another size is refused.
* Training. Nothing here is transformer-specific outside this file: the
  trainer's step, label dropout, Polyak weights, remat (`remat`), bfloat16
  (`dtype`) and the parameter sharding (`parallel.py`'s rule over the data
  and fsdp axes, which reads only shapes) are the PixelCNN's.

Example (a Fashion-MNIST top prior, 4x4 codes):

  prior = TransformerPrior(num_embeddings=512, num_channels=64, num_layers=4,
                           num_heads=4, map_shape=(4, 4), num_classes=10)
  variables = prior.init(key, codes, labels=y, train=False)
  logits = prior.apply(variables, codes, labels=y, train=True,
                       rngs={'dropout': key})   # [B, 4, 4, 512]
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax import errors
from vqvae2_jax.models import pixelcnn

Array = jax.Array
Dtype = Any
Precision = Any


def _causal_attend(q: Array, k: Array, v: Array, mask: Array,
                   precision: Precision) -> Array:
  """Softmax attention in float32: q [b, h, tq, d], k, v [b, h, tk, d],
  mask [tq, tk] (True where a query may look) -> [b, h, tq, d] in v's dtype.

  The full path's; a cached step does the same sums for its one query over
  its cache (equal to float rounding).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bhqd,bhkd->bhqk', q.astype(jnp.float32),
                      k.astype(jnp.float32), precision=precision) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights, v.astype(jnp.float32),
                   precision=precision)
  return out.astype(v.dtype)


# How the upper levels' codes enter a lower transformer prior.
COND_MODES = ('add', 'cross')


class MapSizeError(errors.UserError, ValueError):
  """A map of another size than the one a transformer prior was built for."""


class TransformerBlock(nn.Module):
  """Pre-norm causal self-attention and MLP, with a one-token step.

  Attributes:
    channels: C, the model width.
    num_heads: attention heads (divides C).
    mlp_ratio: hidden width of the MLP is mlp_ratio * C.
    dropout_rate: on both residual branches (training only).
    dtype: compute dtype.
    precision: of every matrix product (see `PixelCNNPrior.precision`).
  """
  channels: int
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  precision: Precision = None

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              precision=self.precision)
    self.attn_norm = nn.LayerNorm(dtype=self.dtype)
    self.query = dense(self.channels)
    # No key bias: it adds the same number to every logit of a query's
    # softmax, so it has no effect and an exactly-zero gradient, which Adam
    # would turn into steps of pure rounding noise.
    self.key = dense(self.channels, use_bias=False)
    self.value = dense(self.channels)
    self.proj = dense(self.channels)
    if self.cross_attention:
      self.cross_norm = nn.LayerNorm(dtype=self.dtype)
      self.cross_query = dense(self.channels)
      self.cross_key = dense(self.channels, use_bias=False)
      self.cross_value = dense(self.channels)
      self.cross_proj = dense(self.channels)
    self.mlp_norm = nn.LayerNorm(dtype=self.dtype)
    self.mlp_in = dense(self.mlp_ratio * self.channels)
    self.mlp_out = dense(self.channels)
    self.dropout = pixelcnn.Dropout(self.dropout_rate)

  def _split(self, z: Array) -> Array:
    """[b, t, C] -> [b, heads, t, d]."""
    return jnp.transpose(z.reshape(*z.shape[:2], self.num_heads, -1),
                         (0, 2, 1, 3))

  def _heads(self, x: Array) -> tuple[Array, Array, Array]:
    """[b, t, C] -> q, k, v, each [b, heads, t, d]."""
    y = self.attn_norm(x)
    return (self._split(self.query(y)), self._split(self.key(y)),
            self._split(self.value(y)))

  def _residual(self, x: Array, attended: Array, proj: nn.Module,
                train: bool) -> Array:
    """x + dropout(proj(heads merged)); attended [b, heads, t, d]."""
    b, _, t, _ = attended.shape
    merged = jnp.transpose(attended, (0, 2, 1, 3)).reshape(b, t, -1)
    return x + self.dropout(proj(merged), deterministic=not train)

  def memory_kv(self, memory: Array) -> tuple[Array, Array]:
    """Cross-attention keys and values of a [b, m, C] (normalised) memory,
    each [b, heads, m, d]; computed once per sample."""
    return (self._split(self.cross_key(memory)),
            self._split(self.cross_value(memory)))

  def _finish(self, x: Array, attended: Array, memory_kv: Optional[tuple],
              train: bool) -> Array:
    """Self-attention residual, cross-attention (when built) and MLP;
    attended [b, heads, t, d] -> [b, t, C]."""
    x = self._residual(x, attended, self.proj, train)
    if self.cross_attention:
      k, v = memory_kv
      q = self._split(self.cross_query(self.cross_norm(x)))
      everything = jnp.ones((q.shape[2], k.shape[2]), bool)
      x = self._residual(x, _causal_attend(q, k, v, everything,
                                           self.precision),
                         self.cross_proj, train)
    y = self.mlp_out(nn.gelu(self.mlp_in(self.mlp_norm(x))))
    return x + self.dropout(y, deterministic=not train)

  def __call__(self, x: Array, train: bool,
               memory_kv: Optional[tuple] = None) -> Array:
    """Full path: [b, n, C] -> [b, n, C], position t sees positions <= t
    (and, with cross-attention, the whole memory of `memory_kv`).

    `train` may be positional, for `nn.remat`'s static_argnums.
    """
    n = x.shape[1]
    q, k, v = self._heads(x)
    mask = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    return self._finish(x, _causal_attend(q, k, v, mask, self.precision),
                        memory_kv, train)

  def init_cache(self, batch: int, height: int, width: int
                 ) -> dict[str, Array]:
    """Zero key/value caches for a [batch, height, width] map.

    One cache, laid out as `pixelcnn.AttentionBlock`'s (see there why: a
    step writes its position and then reads the cache as stored, so XLA
    updates it in place and copies nothing inside the loop over a row's
    positions).

    Returns:
      {'k', 'v': [batch * heads, height * width, d], position t at t}.
    """
    d = self.channels // self.num_heads
    shape = (batch * self.num_heads, height * width, d)
    return {'k': jnp.zeros(shape, self.dtype),
            'v': jnp.zeros(shape, self.dtype)}

  def fused_view(self) -> dict[str, Array]:
    """The weights of a position step laid out for one query/key/value
    product, derived from the parameters.

    Returns:
      {'w_qkv': [C, 3C] the query, key and value kernels side by side,
       'b_qkv': [3C] their biases (zeros for the key)}.
    """
    dtype = self.dtype
    params = [layer.variables['params']
              for layer in (self.query, self.key, self.value)]
    zeros = jnp.zeros((self.channels,), dtype)
    return {'w_qkv': jnp.concatenate(
                [p['kernel'].astype(dtype) for p in params], axis=1),
            'b_qkv': jnp.concatenate(
                [p['bias'].astype(dtype) if 'bias' in p else zeros
                 for p in params])}

  def step(self, cache: dict[str, Array], x: Array, t: Array,
           fused: Optional[dict[str, Array]] = None,
           memory_kv: Optional[tuple] = None
           ) -> tuple[Array, dict[str, Array]]:
    """The block at position t (raster order), after positions 0..t-1.

    Args:
      cache: the cache after those steps.
      x: [b, 1, C] input at t.
      t: int32 scalar.
      fused: `fused_view()`, made once outside the sampler's loop (the
        queries, keys and values as one product); None makes it here.
      memory_kv: `memory_kv`'s output, with cross-attention.

    Returns:
      ([b, 1, C] output, the cache with t's key and value written).
    """
    if fused is None:
      fused = self.fused_view()
    b = x.shape[0]
    bh, _, d = cache['k'].shape
    qkv = jnp.dot(self.attn_norm(x)[:, 0], fused['w_qkv'],
                  precision=self.precision) + fused['b_qkv']
    q, k, v = (y.reshape(bh, d)  # [b * heads, d]
               for y in jnp.split(qkv, 3, axis=-1))
    # `_causal_attend`'s arithmetic, for one query.
    attended, cache = pixelcnn.cache_attend(cache, q, k, v, t,
                                            self.precision)
    attended = attended.reshape(b, -1, 1, d)
    return self._finish(x, attended, memory_kv, False), cache


class TransformerPrior(nn.Module):
  """Causal transformer prior over one level's codes (module docstring).

  Attributes:
    num_embeddings: K, codes of this level.
    num_channels: C, the model width.
    num_layers: transformer blocks.
    map_shape: (h, w) of the level's code map (sizes the position tables).
    num_heads: heads per block (divides num_channels).
    mlp_ratio: MLP hidden width / C.
    dropout_rate: on the inputs and both residual branches of every block.
    num_classes: class labels; 0 = unconditional. Label index num_classes
      means "no label".
    cond_num_embeddings: K of each upper level, top first; () for the top.
    cond_stack_blocks: residual blocks of the conditioning stack.
    cond_mode: how the upper levels enter: 'add' (the stack's map added to
      the inputs) or 'cross' (every block cross-attends to it); ignored by a
      top prior, which has no upper levels.
    dtype: compute dtype; the logits are always float32.
    remat: recompute each block (and the conditioning stack's blocks) in the
      backward pass; same parameters, outputs and gradients.
    precision: of every matrix product (see `PixelCNNPrior.precision`).
  """
  num_embeddings: int
  num_channels: int
  num_layers: int
  map_shape: tuple[int, int]
  num_heads: int = 1
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  num_classes: int = 0
  cond_num_embeddings: Sequence[int] = ()
  cond_stack_blocks: int = 0
  cond_mode: str = 'add'
  dtype: Dtype = jnp.float32
  remat: bool = False
  precision: Precision = None

  @property
  def cross_attends(self) -> bool:
    """Whether the blocks cross-attend to the upper levels."""
    return self.cond_mode == 'cross' and bool(self.cond_num_embeddings)

  def setup(self):
    if self.cond_mode not in COND_MODES:
      raise errors.ConfigError(
          f'cond_mode must be one of {COND_MODES}, got {self.cond_mode!r}. '
          "Fix: use 'add' (the upper codes added to the inputs) or 'cross' "
          '(cross-attention to them).')
    if self.num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {self.num_layers}.')
    if self.num_channels % self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} must divide '
                       f'num_channels={self.num_channels}.')
    c = self.num_channels
    height, width = self.map_shape
    block = TransformerBlock
    if self.remat:
      block = nn.remat(TransformerBlock, static_argnums=(2,))
    self.embed = nn.Embed(self.num_embeddings, c, dtype=self.dtype)
    self.start = self.param('start', nn.initializers.normal(0.02), (c,))
    self.row_embed = nn.Embed(height, c, dtype=self.dtype,
                              embedding_init=nn.initializers.normal(0.02))
    self.col_embed = nn.Embed(width, c, dtype=self.dtype,
                              embedding_init=nn.initializers.normal(0.02))
    if self.num_classes:
      self.class_embed = nn.Embed(self.num_classes + 1, c, dtype=self.dtype)
    if self.cond_num_embeddings:
      self.cond_stack = pixelcnn.ConditioningStack(
          tuple(self.cond_num_embeddings), c, self.cond_stack_blocks,
          dtype=self.dtype, remat=self.remat, precision=self.precision)
    if self.cross_attends:
      self.memory_norm = nn.LayerNorm(dtype=self.dtype)
    self.blocks = [block(c, self.num_heads, self.mlp_ratio, self.dropout_rate,
                         self.cross_attends, dtype=self.dtype,
                         precision=self.precision)
                   for _ in range(self.num_layers)]
    self.input_dropout = pixelcnn.Dropout(self.dropout_rate)
    self.out_norm = nn.LayerNorm(dtype=self.dtype)
    self.out_logits = nn.Dense(self.num_embeddings, dtype=jnp.float32,
                               precision=self.precision)

  def _check_shape(self, shape: Sequence[int]) -> None:
    if tuple(shape[1:]) != tuple(self.map_shape):
      raise MapSizeError(
          f'A transformer prior built for {tuple(self.map_shape)} maps got a '
          f'{tuple(shape[1:])} map; its position tables fix the size. Fix: '
          'sample or score maps of the level it was trained on.')

  def context(self, cond_codes: Sequence[Array], labels: Optional[Array],
              shape: Sequence[int]) -> dict[str, Array]:
    """What every token is computed with: positions, upper codes, class.

    Args:
      cond_codes: one [batch, h_j, w_j] int32 map per upper level, top first.
      labels: [batch] int32 (num_classes = "no label"), or None.
      shape: (batch, h, w) of this level's map.

    Returns:
      {'context': [batch, h * w, C] added to every input but the token
       (positions, class, and with cond_mode 'add' the upper codes);
       with cross-attention also 'memory': [batch, h * w, C], the
       normalised upper codes' map plus the positions}.
    """
    self._check_shape(shape)
    b, height, width = shape
    cond_codes = pixelcnn.check_cond_codes(cond_codes,
                                           self.cond_num_embeddings)
    labels = pixelcnn.resolve_labels(labels, b, self.num_classes)
    pos = (self.row_embed(jnp.arange(height))[:, None] +
           self.col_embed(jnp.arange(width))[None, :])  # [h, w, C]
    feats = jnp.broadcast_to(pos, (b, height, width, self.num_channels))
    flat = lambda x: x.reshape(b, height * width, self.num_channels)
    out = {}
    if self.cross_attends:
      out['memory'] = flat(self.memory_norm(
          feats + self.cond_stack(cond_codes, (height, width))))
    elif self.cond_num_embeddings:
      feats = feats + self.cond_stack(cond_codes, (height, width))
    if self.num_classes:
      feats = feats + self.class_embed(labels)[:, None, None, :]
    out['context'] = flat(feats)
    return out

  def _memory_kvs(self, context: dict[str, Array]) -> list[Optional[tuple]]:
    """Each block's cross-attention keys and values (Nones without)."""
    if not self.cross_attends:
      return [None] * self.num_layers
    return [block.memory_kv(context['memory']) for block in self.blocks]

  def _logits(self, x: Array) -> Array:
    return self.out_logits(self.out_norm(x)).astype(jnp.float32)

  # Full path.

  def forward_embedded(self, embedded: Array, context: dict[str, Array], *,
                       train: bool) -> Array:
    """Logits from embedded codes (exposed for gradient-based causality tests).

    Args:
      embedded: [batch, h, w, C] code embeddings (not yet shifted).
      context: the output of `context`.
      train: apply dropout.

    Returns:
      [batch, h, w, K] float32 logits.
    """
    b, height, width, c = embedded.shape
    flat = embedded.reshape(b, height * width, c)
    start = jnp.broadcast_to(self.start.astype(flat.dtype), (b, 1, c))
    tokens = jnp.concatenate([start, flat[:, :-1]], axis=1)
    x = self.input_dropout(tokens + context['context'],
                           deterministic=not train)
    for block, memory_kv in zip(self.blocks, self._memory_kvs(context)):
      x = block(x, train, memory_kv)
    return self._logits(x).reshape(b, height, width, -1)

  def __call__(self, codes: Array, *, cond_codes: Sequence[Array] = (),
               labels: Optional[Array] = None, train: bool) -> Array:
    """Logits of every position given the codes before it.

    Args:
      codes: [batch, h, w] int32 codes of this level.
      cond_codes: [batch, h_j, w_j] int32 codes of every upper level, top
        first (empty for the top prior).
      labels: [batch] int32 class labels, num_classes for "no label"; None
        means "no label" for every example.
      train: apply dropout (RNG stream 'dropout').

    Returns:
      [batch, h, w, K] float32 logits; position (r, c) depends only on codes
      strictly before it in raster order.
    """
    context = self.context(cond_codes, labels, codes.shape)
    return self.forward_embedded(self.embed(codes), context, train=train)

  # Incremental path (the sampler's interface, as `PixelCNNPrior`'s).

  def prepare(self, cond_codes: Sequence[Array], labels: Optional[Array],
              shape: Sequence[int]) -> dict[str, Any]:
    """Per-sample context computed once: {'context': [batch, h * w, C],
    'blocks': each block's `fused_view()` (its weights laid out for a
    position step)} and, with cross-attention, 'memory_kv': each block's
    memory keys and values."""
    context = self.context(cond_codes, labels, shape)
    out = {'context': context['context'],
           'blocks': [block.fused_view() for block in self.blocks]}
    if self.cross_attends:
      out['memory_kv'] = self._memory_kvs(context)
    return out

  def init_cache(self, shape: Sequence[int]) -> dict[str, Any]:
    """Zero caches for sampling a [batch, h, w] map.

    Returns:
      {'blocks': per block its key/value cache, 'last': [batch] int32 the
       last code of the previous row (the token that position (r, 0) reads)}.
    """
    self._check_shape(shape)
    b, height, width = shape
    return {'blocks': [block.init_cache(b, height, width)
                       for block in self.blocks],
            'last': jnp.zeros((b,), jnp.int32)}

  def step_row(self, cache: dict[str, Any], context: dict[str, Any],
               prev_row: Array, r: Array) -> dict[str, Any]:
    """Starts row r: remembers code (r - 1, w - 1), the token of (r, 0)
    (which `step_position` gets no `prev_code` for; unused at r == 0)."""
    del context, r
    return {**cache, 'last': prev_row[:, -1].astype(jnp.int32)}

  def step_position(self, cache: dict[str, Any], context: dict[str, Any],
                    prev_code: Array, r: Array, c: Array
                    ) -> tuple[Array, dict[str, Any]]:
    """Logits at (r, c), after `step_row(r)` and the positions before it.

    Args:
      cache: after those steps.
      context: from `prepare`.
      prev_code: [batch] int32 code at (r, c - 1) (ignored when c == 0).
      r, c: int32 scalars.

    Returns:
      ([batch, K] float32 logits, updated cache).
    """
    width = self.map_shape[1]
    t = r * width + c
    code = jnp.where(c > 0, prev_code, cache['last'])
    token = self.embed(code)[:, None]
    start = jnp.broadcast_to(self.start.astype(token.dtype), token.shape)
    token = jnp.where(t > 0, token, start)
    x = token + jax.lax.dynamic_slice_in_dim(context['context'], t, 1, axis=1)
    blocks = []
    memory_kvs = context.get('memory_kv', [None] * self.num_layers)
    for block, entry, fused, memory_kv in zip(
        self.blocks, cache['blocks'], context['blocks'], memory_kvs):
      x, entry = block.step(entry, x, t, fused, memory_kv)
      blocks.append(entry)
    return self._logits(x)[:, 0], {**cache, 'blocks': blocks}

"""Vector quantizers: the discrete bottleneck of the VQ-VAE.

Two codebook learning rules (van den Oord et al. 2017; Razavi et al. 2019):

* `VectorQuantizerEMA`: the codebook is an exponential moving average of the
  encoder outputs assigned to each code (the paper's default). The codebook
  and its statistics live in the mutable collection 'vq_stats' and change only
  in calls with `train=True`.
* `VectorQuantizer`: the codebook is a parameter in 'params', learned by the
  codebook loss ||sg(z_e) - e||^2.

Both search the nearest code in float32 (whatever the input dtype), pass
gradients through the quantization to the encoder (straight through, or by
the rotation trick), restart codes that have gone unused for
`dead_code_window` train calls from encoder outputs of the current batch, can
initialise the codebook by k-means on the first training batch, and can
search on the unit sphere (`l2_normalize`: encoder outputs and codes scaled to
unit length, as in ViT-VQGAN's low-dimensional l2-normalised lookup).

Every statistic is a sum or mean over all the vectors of the call. Under a
global-view `jax.jit` (arrays sharded over a mesh, no pmap) that is the global
batch, so the results do not depend on the number of devices and no `psum` is
needed. Randomness (restart candidates, k-means seeds) comes from the RNG
stream 'vq': under jit every device draws the same key and so makes the same
choice.

Example (shapes for a 2-level Fashion-MNIST model's bottom level):

  vq = VectorQuantizerEMA(num_embeddings=512, embedding_dim=64)
  variables = vq.init(jax.random.key(0), z_e, train=False)   # z_e [64, 8, 8, 64]
  out, new_vars = vq.apply(variables, z_e, train=True,
                           rngs={'vq': key}, mutable=['vq_stats'])
  out['quantized']  # [64, 8, 8, 64] float32, straight-through
  out['codes']      # [64, 8, 8] int32
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STATS = 'vq_stats'  # Mutable collection of codebook statistics.
RNG = 'vq'  # RNG stream for restarts and k-means initialisation.


def nearest_codes(flat: Array, codebook: Array) -> Array:
  """Index of the nearest code (squared Euclidean distance) of each vector.

  Args:
    flat: [n, d] float32 vectors.
    codebook: [k, d] float32 codes.

  Returns:
    [n] int32 indices into the codebook.
  """
  # ||x||^2 is the same for every code of a row, so it does not change the
  # argmin; HIGHEST keeps TPUs/GPUs from running the matmul in bf16 passes.
  cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
  distances = jnp.sum(jnp.square(codebook), axis=1)[None, :] - 2.0 * cross
  return jnp.argmin(distances, axis=1).astype(jnp.int32)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  """x / ||x|| along `axis` (vectors shorter than `eps` scaled by 1 / eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def rotation_trick(x: Array, e: Array, eps: float = 1e-6) -> Array:
  """e going forward; backward, the gradient reaches x rotated (Fifty et al.).

  The rotation trick (Fifty et al. 2024, "Restructuring vector quantization
  with the rotation trick"): instead of copying the gradient at the code e
  to the encoder output x (straight-through), write e = lambda R x, where R
  is the rotation taking x's direction to e's (in the plane of the two) and
  lambda = ||e|| / ||x||, and treat lambda R as a constant. The gradient at x
  is then lambda R^T times the gradient at e: it keeps its angle to x what
  it was to e, so encoder outputs in one code's cell get different
  gradients depending on where in the cell they are.

  With x^ = x / ||x||, e^ = e / ||e|| and r = (x^ + e^) / ||x^ + e^||,
  R = I - 2 r r^T + 2 e^ x^T (a Householder reflection through r, then the
  reflection of x^ onto e^), so R x needs two dot products and no matrix.

  Args:
    x: [..., d] float32 encoder outputs (differentiated).
    e: [..., d] float32 their codes (constant).

  Returns:
    [..., d]: numerically e (to float32 rounding); d/dx = lambda R.
  """
  e = jax.lax.stop_gradient(e)
  x_norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  e_norm = jnp.sqrt(jnp.sum(jnp.square(e), axis=-1, keepdims=True))
  x_hat = x / jnp.maximum(x_norm, eps)
  e_hat = e / jnp.maximum(e_norm, eps)
  r = l2_normalize(x_hat + e_hat, eps=eps)
  x_hat, r = jax.lax.stop_gradient(x_hat), jax.lax.stop_gradient(r)
  scale = jax.lax.stop_gradient(e_norm / jnp.maximum(x_norm, eps))
  rotated = (x - 2.0 * r * jnp.sum(r * x, axis=-1, keepdims=True)
             + 2.0 * e_hat * jnp.sum(x_hat * x, axis=-1, keepdims=True))
  return scale * rotated


GRADIENTS = ('straight_through', 'rotation')


def code_statistics(flat: Array, codes: Array, num_embeddings: int
                    ) -> tuple[Array, Array]:
  """Per-code counts [k] and sums of the assigned vectors [k, d] (float32).

  A scatter-add rather than a one-hot matmul: the one-hot matrix of a large
  batch (e.g. 128 x 64 x 64 vectors x 512 codes) would not fit in memory.
  """
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes,
                               num_segments=num_embeddings)
  sums = jax.ops.segment_sum(flat, codes, num_segments=num_embeddings)
  return counts, sums


def usage_metrics(counts: Array) -> tuple[Array, Array]:
  """Perplexity exp(H(p)) of the code histogram and the fraction of codes used."""
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0)))
  return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def random_rows(rng: Array, n: int, k: int) -> Array:
  """k random indices in [0, n): distinct when n >= k, uniform otherwise.

  Distinct, so no two restarted codes start on the same point. The top k of
  n uniform numbers is a uniform k-subset; one draw and a top-k compile much
  faster on XLA:CPU than `jax.random.choice(replace=False)`'s permutation.
  """
  if n < k:
    return jax.random.randint(rng, (k,), 0, n)
  return jax.lax.top_k(jax.random.uniform(rng, (n,)), k)[1]


def kmeans_plusplus_seeds(flat: Array, num_clusters: int, rng: Array
                          ) -> Array:
  """k-means++ seeding: each seed drawn with probability ~ squared distance.

  Args:
    flat: [n, d] float32 data.
    num_clusters: k.
    rng: PRNG key.

  Returns:
    [k, d] seeds, rows of `flat` (repeated only if `flat` has < k distinct
    rows).
  """
  keys = jax.random.split(rng, num_clusters)
  first = flat[jax.random.randint(keys[0], (), 0, flat.shape[0])]
  seeds = jnp.zeros((num_clusters, flat.shape[1]), flat.dtype).at[0].set(first)
  min_sq = jnp.sum(jnp.square(flat - first), axis=1)

  def body(i, carry):
    seeds, min_sq = carry
    # Points already chosen have probability 0 (log 0 = -inf).
    logits = jnp.where(min_sq > 0, jnp.log(jnp.where(min_sq > 0, min_sq, 1.0)),
                       -jnp.inf)
    seed = flat[jax.random.categorical(keys[i], logits)]
    min_sq = jnp.minimum(min_sq, jnp.sum(jnp.square(flat - seed), axis=1))
    return seeds.at[i].set(seed), min_sq

  seeds, _ = jax.lax.fori_loop(1, num_clusters, body, (seeds, min_sq))
  return seeds


def kmeans(flat: Array, num_clusters: int, num_iterations: int, rng: Array
           ) -> tuple[Array, Array]:
  """Lloyd's k-means with k-means++ seeding.

  Args:
    flat: [n, d] float32 data.
    num_clusters: k.
    num_iterations: Lloyd iterations (assign, then move to the mean).
    rng: PRNG key for the seeding.

  Returns:
    centroids [k, d] and the number of points assigned to each [k] under the
    final centroids. A cluster that loses all its points keeps its centroid.
  """
  centroids = kmeans_plusplus_seeds(flat, num_clusters, rng)

  def lloyd(_, centroids):
    counts, sums = code_statistics(
        flat, nearest_codes(flat, centroids), num_clusters)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, centroids)

  centroids = jax.lax.fori_loop(0, num_iterations, lloyd, centroids)
  counts, _ = code_statistics(flat, nearest_codes(flat, centroids),
                              num_clusters)
  return centroids, counts


class _Quantizer(nn.Module):
  """What both quantizers share: search, losses, restarts, k-means init.

  Subclasses define `_codebook()` (the codebook used for the search),
  `_set_codebook(rows, values)` (overwrite some rows), `_update(flat, counts,
  sums)` (the per-train-call learning rule) and `_codebook_loss(inputs,
  quantized)`.

  Attributes:
    num_embeddings: K, codes in the codebook.
    embedding_dim: D, size of each code; the last axis of the inputs.
    commitment_cost: beta, weight of ||z_e - sg(e)||^2 in 'loss'.
    dead_code_window: a code unused in this many consecutive train calls is
      re-seeded from a random encoder output of the current batch; 0 disables.
    kmeans_init: initialise the codebook by k-means on the first train batch.
    kmeans_iterations: Lloyd iterations of that initialisation.
    usage_decay: decay of the EMA of code usage ('cluster_size').
    l2_normalize: search, learn and return codes on the unit sphere: encoder
      outputs and codes are scaled to unit length before the search (a
      cosine-similarity lookup), so the codebook cannot drift away from the
      encoder outputs' scale and every code stays reachable.
    gradient: how the gradient gets past the quantization to the encoder:
      'straight_through' (copied, van den Oord et al. 2017) or 'rotation'
      (`rotation_trick`).
  """
  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  dead_code_window: int = 0
  kmeans_init: bool = False
  kmeans_iterations: int = 10
  usage_decay: float = 0.99
  l2_normalize: bool = False
  gradient: str = 'straight_through'

  def _setup_common(self) -> None:
    k = self.num_embeddings
    # EMA of how many vectors each code receives per train call (for the EMA
    # quantizer also the denominator of its codebook).
    self.cluster_size = self.variable(
        STATS, 'cluster_size', lambda: jnp.ones((k,), jnp.float32))
    # Consecutive train calls in which each code was not chosen.
    self.steps_unused = self.variable(
        STATS, 'steps_unused', lambda: jnp.zeros((k,), jnp.int32))
    # Whether k-means initialisation has run (always False without it).
    self.initialized = self.variable(
        STATS, 'initialized', lambda: jnp.zeros((), jnp.bool_))

  def _init_codebook(self, rng: Array, shape: tuple[int, ...]) -> Array:
    # Uniform in +-sqrt(3/D) (unit-variance codes), the scale of a standard
    # normal encoder output; restarts and k-means fix any mismatch.
    return nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')(
        rng, shape, jnp.float32)

  def _codebook(self) -> Array:
    raise NotImplementedError

  def _search_codebook(self) -> Array:
    """The codes as searched and returned (unit length with l2_normalize)."""
    codebook = self._codebook()
    return l2_normalize(codebook) if self.l2_normalize else codebook

  def _set_codebook(self, rows: Array, values: Array) -> None:
    raise NotImplementedError

  def _update(self, flat: Array, counts: Array, sums: Array) -> None:
    raise NotImplementedError

  def _codebook_loss(self, inputs: Array, quantized: Array) -> Array:
    raise NotImplementedError

  def _reset_rows(self, rows: Array, values: Array, counts: Array) -> None:
    """Sets codebook rows to `values` and restarts their statistics.

    Args:
      rows: [k] bool, the rows to reset.
      values: [k, d] float32 new codes (used where `rows`).
      counts: [k] float32 pseudo-count of vectors each new code stands for.
    """
    self._set_codebook(rows, values)
    self.cluster_size.value = jnp.where(rows, counts, self.cluster_size.value)
    self.steps_unused.value = jnp.where(rows, 0, self.steps_unused.value)

  def _maybe_kmeans_init(self, flat: Array) -> None:
    """Replaces the codebook by k-means of `flat`, once (first train call)."""
    rng = self.make_rng(RNG)
    k = self.num_embeddings

    def run(_):
      centroids, counts = kmeans(flat, k, self.kmeans_iterations, rng)
      # A centroid's count is its share of one batch, the scale the EMA
      # statistics would reach; empty clusters count as one vector.
      return jnp.ones((k,), jnp.bool_), centroids, jnp.maximum(counts, 1.0)

    def keep(_):
      return (jnp.zeros((k,), jnp.bool_), self._codebook(),
              self.cluster_size.value)

    rows, centroids, counts = jax.lax.cond(self.initialized.value, keep, run,
                                           None)
    self._reset_rows(rows, centroids, counts)
    self.initialized.value = jnp.ones((), jnp.bool_)

  def _restart_dead_codes(self, flat: Array, counts: Array) -> Array:
    """Re-seeds codes unused for `dead_code_window` calls; returns how many."""
    unused = jnp.where(counts > 0, 0, self.steps_unused.value + 1)
    self.steps_unused.value = unused
    dead = unused >= self.dead_code_window
    rng = self.make_rng(RNG)
    n, k = flat.shape[0], self.num_embeddings

    def restart(_):
      return flat[random_rows(rng, n, k)]

    def skip(_):
      return self._codebook()

    candidates = jax.lax.cond(jnp.any(dead), restart, skip, None)
    # A restarted code stands for one vector: small next to the counts of
    # live codes, so the vectors it attracts move it quickly.
    self._reset_rows(dead, candidates, jnp.ones((k,), jnp.float32))
    return jnp.sum(dead).astype(jnp.int32)

  def __call__(self, inputs: Array, *, train: bool) -> dict[str, Array]:
    """Quantizes `inputs` to their nearest codes.

    Args:
      inputs: [..., D] encoder outputs (any float dtype).
      train: update the codebook statistics (needs `mutable=['vq_stats']` and,
        with restarts or k-means init, the 'vq' RNG stream).

    Returns:
      A dict with
        'quantized': [..., D] float32, the codes in the forward pass and the
          identity for gradients (straight-through) w.r.t. `inputs`;
        'codes': [...] int32;
        'loss': beta * commitment_loss + codebook_loss;
        'commitment_loss': mean ||z_e - sg(e)||^2 (per element);
        'codebook_loss': mean ||sg(z_e) - e||^2, 0 for the EMA quantizer;
        'perplexity': exp(entropy) of this call's code histogram;
        'used_fraction': fraction of the K codes chosen in this call;
        'restarted': int32, codes re-seeded by this call (0 unless training).
    """
    if self.gradient not in GRADIENTS:
      raise ValueError(f'{type(self).__name__}: gradient={self.gradient!r}; '
                       f'use one of {GRADIENTS}.')
    if inputs.ndim < 1 or inputs.shape[-1] != self.embedding_dim:
      raise ValueError(
          f'{type(self).__name__}: the last axis of the inputs must be '
          f'embedding_dim={self.embedding_dim}, got inputs of shape '
          f'{inputs.shape}. Project the encoder output to embedding_dim '
          'channels (a 1x1 conv) before quantizing.')
    x = inputs.astype(jnp.float32)
    if self.l2_normalize:
      x = l2_normalize(x)
    flat = jax.lax.stop_gradient(x.reshape(-1, self.embedding_dim))
    if train and self.kmeans_init and not self.is_initializing():
      self._maybe_kmeans_init(flat)

    codebook = self._search_codebook()
    codes = nearest_codes(flat, jax.lax.stop_gradient(codebook))
    counts, sums = code_statistics(flat, codes, self.num_embeddings)
    quantized = jnp.take(codebook, codes, axis=0).reshape(x.shape)

    commitment_loss = jnp.mean(jnp.square(x - jax.lax.stop_gradient(quantized)))
    codebook_loss = self._codebook_loss(x, quantized)
    # q + (x - sg(x)): exactly q going forward, identity gradient to x.
    through = x
    if self.gradient == 'rotation':
      # Its value is q up to rounding; only its gradient is used, so the
      # forward pass stays exactly q.
      through = rotation_trick(x, quantized)
    straight_through = (jax.lax.stop_gradient(quantized)
                        + (through - jax.lax.stop_gradient(through)))
    perplexity, used_fraction = usage_metrics(counts)

    restarted = jnp.zeros((), jnp.int32)
    if train and not self.is_initializing():
      self._update(flat, counts, sums)
      if self.dead_code_window > 0:
        restarted = self._restart_dead_codes(flat, counts)
    return {
        'quantized': straight_through,
        'codes': codes.reshape(x.shape[:-1]),
        'loss': self.commitment_cost * commitment_loss + codebook_loss,
        'commitment_loss': commitment_loss,
        'codebook_loss': codebook_loss,
        'perplexity': perplexity,
        'used_fraction': used_fraction,
        'restarted': restarted,
    }

  def lookup(self, codes: Array) -> Array:
    """Code vectors of integer codes: [...] int32 -> [..., D] float32."""
    return jnp.take(self._search_codebook(), codes, axis=0)

  def mean_embedding(self) -> Array:
    """[D] usage-weighted mean code: a neutral stand-in for a dropped level."""
    weights = self.cluster_size.value / jnp.sum(self.cluster_size.value)
    return jnp.sum(weights[:, None] * self._search_codebook(), axis=0)


class VectorQuantizerEMA(_Quantizer):
  """Vector quantizer whose codebook is an EMA of the assigned encoder outputs.

  In 'vq_stats': 'codebook' [K, D], 'cluster_size' [K] (EMA of the vectors
  assigned per call), 'embed_sum' [K, D] (EMA of their sum), 'steps_unused'
  [K] and 'initialized'. Each train call, with n_k vectors and sum s_k
  assigned to code k:

    N_k <- decay N_k + (1 - decay) n_k
    m_k <- decay m_k + (1 - decay) s_k
    e_k <- m_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K eps) sum_j N_j

  (Laplace smoothing keeps N~_k > 0.) The statistics start at N_k = 1 and
  m_k = e_k, a pseudo-count of one vector on the initial code, so a code that
  is never chosen keeps its place (its N_k and m_k decay together) instead of
  collapsing to zero, until a restart moves it.

  Attributes (besides those of the base class):
    decay: EMA decay.
    epsilon: Laplace smoothing constant.
  """
  decay: float = 0.99
  epsilon: float = 1e-5

  def setup(self):
    self._setup_common()
    shape = (self.num_embeddings, self.embedding_dim)
    self.codebook = self.variable(
        STATS, 'codebook',
        lambda: self._init_codebook(self.make_rng('params'), shape))
    self.embed_sum = self.variable(STATS, 'embed_sum',
                                   lambda: self.codebook.value)

  def _codebook(self) -> Array:
    return self.codebook.value

  def _set_codebook(self, rows: Array, values: Array) -> None:
    self.codebook.value = jnp.where(rows[:, None], values, self.codebook.value)

  def _reset_rows(self, rows: Array, values: Array, counts: Array) -> None:
    super()._reset_rows(rows, values, counts)
    # Keep e_k = m_k / N_k for the reset rows.
    self.embed_sum.value = jnp.where(rows[:, None], values * counts[:, None],
                                     self.embed_sum.value)

  def _update(self, flat: Array, counts: Array, sums: Array) -> None:
    del flat
    decay = self.decay
    cluster_size = decay * self.cluster_size.value + (1.0 - decay) * counts
    embed_sum = decay * self.embed_sum.value + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = ((cluster_size + self.epsilon)
                / (total + self.num_embeddings * self.epsilon) * total)
    self.cluster_size.value = cluster_size
    self.embed_sum.value = embed_sum
    self.codebook.value = embed_sum / smoothed[:, None]

  def _codebook_loss(self, inputs: Array, quantized: Array) -> Array:
    del inputs, quantized
    return jnp.zeros((), jnp.float32)


class VectorQuantizer(_Quantizer):
  """Vector quantizer whose codebook is a parameter learned by the codebook loss.

  The codebook used is params['codebook'] [K, D] plus vq_stats['offset']
  [K, D], a non-trained offset that is zero except for rows a dead-code
  restart or the k-means initialisation moved: module calls cannot write
  parameters, so a restart sets offset_k = new_code - param_k, and the
  parameter keeps learning from there. 'cluster_size' (an EMA of usage with
  `usage_decay`) only weights `mean_embedding`.
  """

  def setup(self):
    self._setup_common()
    shape = (self.num_embeddings, self.embedding_dim)
    self.codebook_param = self.param('codebook', self._init_codebook, shape)
    self.offset = self.variable(STATS, 'offset',
                                lambda: jnp.zeros(shape, jnp.float32))

  def _codebook(self) -> Array:
    return self.codebook_param + self.offset.value

  def _set_codebook(self, rows: Array, values: Array) -> None:
    param = jax.lax.stop_gradient(self.codebook_param)
    self.offset.value = jnp.where(rows[:, None], values - param,
                                  self.offset.value)

  def _update(self, flat: Array, counts: Array, sums: Array) -> None:
    del flat, sums
    self.cluster_size.value = (self.usage_decay * self.cluster_size.value
                               + (1.0 - self.usage_decay) * counts)

  def _codebook_loss(self, inputs: Array, quantized: Array) -> Array:
    return jnp.mean(jnp.square(jax.lax.stop_gradient(inputs) - quantized))


def make_quantizer(kind: str, **kwargs: Any) -> _Quantizer:
  """'ema' -> VectorQuantizerEMA, 'vq' -> VectorQuantizer (kwargs passed on).

  `decay` and `epsilon` only apply to 'ema'; they are dropped for 'vq'.
  """
  if kind == 'ema':
    return VectorQuantizerEMA(**kwargs)
  if kind == 'vq':
    kwargs.pop('decay', None)
    kwargs.pop('epsilon', None)
    return VectorQuantizer(**kwargs)
  raise ValueError(f"Unknown quantizer {kind!r}: use 'ema' or 'vq'.")

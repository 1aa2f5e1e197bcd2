"""Bits per code of a prior over a whole split, and simple baselines.

An evaluation pass adds up per-batch sums (`batch_sums`, jit-friendly,
padding masked out) with `add_sums` (on the host, in float64, so that
millions of codes add up exactly), and `summarize` turns the totals into
bits per code. The uniform baseline is log2(K) bits; the unigram baseline
codes each position independently with the training codes' frequencies.
"""

from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def batch_sums(logits: jax.Array, targets: jax.Array,
               mask: jax.Array | None = None,
               code_weights: jax.Array | None = None
               ) -> dict[str, jax.Array]:
  """Sums of one batch's negative log-likelihood over unmasked examples.

  Args:
    logits: float [b, h, w, K].
    targets: int32 [b, h, w], the codes.
    mask: bool [b]; False for padding examples (None: all valid).
    code_weights: float [K], a weight per target code (`code_weight_table`);
      given, the sums also hold 'weighted_nll'.

  Returns:
    'nll' (sum over codes, in nats), 'correct' (codes whose argmax logit is
    the target), 'num_codes' and 'num_examples', float32 scalars; with
    code_weights, 'weighted_nll' (each code's nll times its target's weight).
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(targets.shape[:1], bool)
  weights = jnp.broadcast_to(
      mask.reshape(-1, *([1] * (targets.ndim - 1))), targets.shape
  ).astype(jnp.float32)
  sums = {'nll': jnp.sum(nll * weights),
          'correct': jnp.sum(correct * weights),
          'num_codes': jnp.sum(weights),
          'num_examples': jnp.sum(mask.astype(jnp.float32))}
  if code_weights is not None:
    per_code = jnp.asarray(code_weights, jnp.float32)[targets]
    sums['weighted_nll'] = jnp.sum(nll * per_code * weights)
  return sums


def code_weight_table(codes: np.ndarray, num_embeddings: int,
                      power: float) -> np.ndarray:
  """The weight of each code in a prior's loss: freq(code)^-power.

  freq are the frequencies of `codes` (add-one smoothed, as the unigram
  baseline's), and the table is scaled so that the mean weight over
  `codes` is 1: the weighted loss is then on the scale of the plain one.
  A loss weighing code k by w(k) is lowest where p(k | context) is
  proportional to w(k) p_data(k | context): with power c, the sampler's
  contrast c (`sampling.contrast_bias`) trained in, up to the frequencies
  (these codes' here, stage 1's usage counts there).

  Args:
    codes: int [...], the training codes of one level.
    num_embeddings: K.
    power: c >= 0; 0 weighs every code 1.

  Returns:
    float32 [K].
  """
  counts = _counts(codes, num_embeddings)
  weights = _smoothed_frequencies(counts) ** -float(power)
  mean = np.sum(counts * weights) / max(counts.sum(), 1.0)
  return (weights / mean).astype(np.float32)


def _counts(codes: np.ndarray, num_embeddings: int) -> np.ndarray:
  """float64 [K]: how often each code occurs in `codes`."""
  return np.bincount(np.asarray(codes).ravel(),
                     minlength=num_embeddings).astype(np.float64)


def _smoothed_frequencies(counts: np.ndarray) -> np.ndarray:
  """The codes' frequencies with one more of each (add-one smoothing)."""
  return (counts + 1.0) / (counts.sum() + len(counts))


def add_sums(total: Mapping[str, Any] | None,
             sums: Mapping[str, Any]) -> dict[str, np.float64]:
  """total + sums on the host in float64 (total None: the first batch)."""
  sums = {k: np.float64(v) for k, v in jax.device_get(dict(sums)).items()}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in total}


def summarize(total: Mapping[str, Any]) -> dict[str, float]:
  """'bits_per_code', 'nll' (nats per code), 'accuracy', the counts."""
  count = float(total['num_codes'])
  if count <= 0:
    raise ValueError('The evaluation split has no codes.')
  nll = float(total['nll']) / count
  return {'bits_per_code': nll / math.log(2.0), 'nll': nll,
          'accuracy': float(total['correct']) / count,
          'num_codes': count, 'num_examples': float(total['num_examples'])}


def uniform_bits(num_embeddings: int) -> float:
  """Bits per code of the uniform distribution over K codes: log2(K)."""
  return math.log2(num_embeddings)


def unigram_bits(train_codes: np.ndarray, eval_codes: np.ndarray,
                 num_embeddings: int) -> dict[str, float]:
  """Baselines that ignore context: code frequencies of the training codes.

  Args:
    train_codes: int [...] codes whose frequencies (add-one smoothed) define
      the distribution.
    eval_codes: int [...] codes to score.
    num_embeddings: K.

  Returns:
    'unigram_bits_per_code' (cross-entropy of `eval_codes` under the
    frequencies) and 'unigram_entropy_bits' (entropy of the frequencies).
  """
  probs = _smoothed_frequencies(_counts(train_codes, num_embeddings))
  log_probs = np.log2(probs)
  eval_counts = _counts(eval_codes, num_embeddings)
  return {
      'unigram_bits_per_code': float(-np.sum(eval_counts * log_probs)
                                     / max(eval_counts.sum(), 1)),
      'unigram_entropy_bits': float(-np.sum(probs * log_probs)),
  }

r"""The discount's rule, or a control of its shape, for this process.

`sampling.discount` d gives each code a threshold t = d * freq(code), freq
its share of the level's codes at stage 1. With p a code's probability in
its context, each code above its threshold is drawn with weight:

* squared (the library's, `sampling.discount_logits`): (p - t)^2 / p;
* excess: p - t (the library's rule until stop 54; rows of `contrast_sweep`
  measured before name no rule);
* flat: p - d / K where p > d / K, K the codebook's size: one threshold for
  every code, their average at stage 1's shares (what the frequencies
  add), weighed as `excess` weighs;
* keep: p (the threshold alone, nothing subtracted);
* cubed, quartic: (p - t)^3 / p^2, (p - t)^4 / p^3 (steeper fades at the
  threshold than the library's).

Where no code clears its threshold, every rule draws the code nearest it.
`contrast_sweep`, `prior_attribution` and `recall_breakdown` take
--discount_rule (`define_flag`) and sample within `discount_rule`.
"""

import contextlib
from typing import Any

from absl import flags
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import sampling

RULES = ('squared', 'excess', 'flat', 'keep', 'cubed', 'quartic')
LIBRARY_RULE = 'squared'  # `sampling.discount_logits`.


def define_flag() -> flags.FlagHolder:
  """--discount_rule (defined by the script that runs)."""
  return flags.DEFINE_enum(
      'discount_rule', LIBRARY_RULE, RULES, "The discount's shape: the "
      "library's (squared) or a control (experiments/discount_rules.py).")


def _rule_logits(weight):
  """A `sampling.discount_logits` that draws each code with weight(p, t)
  where p > t (t its discount), else the code nearest its threshold."""

  def discount_logits(logits, code_discount):
    if code_discount is None:
      return logits
    p, _, above, keep = sampling.discount_support(logits, code_discount)
    return jnp.where(keep, jnp.log(jnp.where(
        above, weight(jnp.where(above, p, 1.0), code_discount), 1.0)),
                     -jnp.inf)
  return discount_logits


_RULE_LOGITS = {
    'excess': _rule_logits(lambda p, t: p - t),
    'flat': _rule_logits(lambda p, t: p - t),  # With flat thresholds.
    'keep': _rule_logits(lambda p, t: p),
    'cubed': _rule_logits(lambda p, t: (p - t) ** 3 / p ** 2),
    'quartic': _rule_logits(lambda p, t: (p - t) ** 4 / p ** 3),
}


@contextlib.contextmanager
def discount_rule(pipe: api.Pipeline, rule: str,
                  compiled: tuple[Any, ...] = ()):
  """Within it, `pipe` samples its discount by `rule` (RULES; the
  module's docstring): 'flat' sets its code frequencies to 1 / K each,
  and every rule but the library's replaces `sampling.discount_logits` for
  the process. The compiled samplers, and the caller's own lru-cached
  programs in `compiled`, are dropped on entry and exit, so none is kept
  across the change."""
  if rule not in RULES:
    raise ValueError(f'Unknown discount rule {rule!r}; one of {RULES}.')
  saved = sampling.discount_logits
  if rule == 'flat':
    pipe.code_frequencies = lambda: [
        np.full(len(f), 1.0 / len(f))
        for f in api.Pipeline.code_frequencies(pipe)]
  if rule in _RULE_LOGITS:
    sampling.discount_logits = _RULE_LOGITS[rule]
  caches = (sampling._build, *compiled)  # pylint: disable=protected-access
  for cache in caches:
    cache.cache_clear()
  try:
    yield
  finally:
    sampling.discount_logits = saved
    for cache in caches:
      cache.cache_clear()
    vars(pipe).pop('code_frequencies', None)

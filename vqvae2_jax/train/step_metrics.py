"""A training step's metrics: made in the step, held, checked, summarised.

Inside a jitted step: `norm_metrics`, `flatten_levels` and `to_float32`.
Outside it: `StepMetrics` holds them on device between log intervals,
raises `NonFiniteError` on a NaN or infinity, and summarises an interval;
`scalars` names the figures for the metric writer.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqvae2_jax import errors

PyTree = Any


def norm_metrics(grads: PyTree, params: PyTree, updates: PyTree
                 ) -> dict[str, jax.Array]:
  """Global L2 norms of the raw gradients, the new params and the updates."""
  return {
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params),
      'update_norm': optax.global_norm(updates),
  }


class NonFiniteError(errors.UserError, FloatingPointError):
  """A training metric became NaN or infinite.

  Also a FloatingPointError, for callers that catch those.
  """


class StepMetrics:
  """Per-step metrics kept on device until a log, check or checkpoint.

  Fetching a metric waits for its step to finish; holding them lets the host
  run ahead of the device between log intervals.
  """

  def __init__(self, sum_prefixes: Sequence[str] = ()):
    """Args: sum_prefixes: metrics summed (not averaged) over an interval."""
    self._sum_prefixes = tuple(sum_prefixes)
    self._steps: list[int] = []
    self._metrics: list[Mapping[str, Any]] = []
    self._checked = 0

  def append(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._steps.append(step)
    self._metrics.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def check_finite(self, hint: str = '') -> None:
    """Raises `NonFiniteError` naming the first step with a non-finite metric.

    Args:
      hint: appended to the message: "Fix: <what to change>" (e.g. which
        setting to lower, and which checkpoint is still intact).
    """
    for i in range(self._checked, len(self._steps)):
      values = jax.device_get(self._metrics[i])
      self._metrics[i] = values
      bad = sorted(k for k, v in values.items()
                   if np.issubdtype(np.asarray(v).dtype, np.floating)
                   and not np.all(np.isfinite(v)))
      if bad:
        shown = ', '.join(f'{k}={float(np.asarray(values[k]).ravel()[0])}'
                          for k in bad)
        raise NonFiniteError(
            f'Non-finite training metrics at step {self._steps[i]}: {shown}. '
            f'{hint}'.strip())
    self._checked = len(self._steps)

  def pop_summary(self) -> dict[str, float]:
    """Means over the held steps (sums for `sum_prefixes`); then forgets them."""
    if not self._steps:
      return {}
    values = [jax.device_get(m) for m in self._metrics]
    summary = {}
    for key in values[0]:
      stacked = np.stack([np.asarray(v[key], np.float64) for v in values])
      reduce = np.sum if key.startswith(self._sum_prefixes) else np.mean
      summary[key] = float(reduce(stacked))
    self._steps, self._metrics, self._checked = [], [], 0
    return summary


def scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """`metrics` as Python floats with names '<prefix>/<key>'."""
  return {f'{prefix}/{k}': float(v) for k, v in metrics.items()}


def flatten_levels(name: str, values: Iterable[Any]) -> dict[str, Any]:
  """{'<name>_level<i>': value} for per-level lists (top = level 0)."""
  return {f'{name}_level{i}': v for i, v in enumerate(values)}


def to_float32(x: Any) -> jax.Array:
  """`x` as a float32 array (metrics of any dtype, for one summary format)."""
  return jnp.asarray(x, jnp.float32)

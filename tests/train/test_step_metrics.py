"""Held step metrics: the interval's summary and the non-finite check."""

import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.train import step_metrics


def test_step_metrics_summary_and_non_finite_check():
  pending = step_metrics.StepMetrics(sum_prefixes=('restarted',))
  pending.append(1, {'loss': jnp.float32(1.0), 'restarted_level0': 2.0})
  pending.append(2, {'loss': jnp.float32(3.0), 'restarted_level0': 1.0})
  pending.check_finite()
  assert pending.pop_summary() == {'loss': 2.0, 'restarted_level0': 3.0}
  pending.append(3, {'loss': jnp.float32(1.0)})
  pending.append(4, {'loss': jnp.float32(np.inf)})
  with pytest.raises(step_metrics.NonFiniteError,
                     match='step 4: loss=inf. keep'):
    pending.check_finite('keep')

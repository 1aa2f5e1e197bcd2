"""The optimizer of every stage: Adam after clipping, on a warm-up schedule.

Also the config fields that set it (`OPTIMIZER_FIELDS`) and `settings_key`,
which turns a config section's fields into the cache key of a stage's
jitted programs.
"""

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import optax


def create_learning_rate_schedule(*, learning_rate: float, warmup_steps: int,
                                  num_train_steps: int,
                                  cosine_decay: bool = True) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 or flat.

  Args:
    learning_rate: the peak learning rate.
    warmup_steps: steps of the linear warm-up (0: start at the peak).
    num_train_steps: the run's length; the cosine reaches 0 here.
    cosine_decay: decay after warm-up; False keeps the peak.

  Returns:
    step -> learning rate.
  """
  warmup_steps = max(int(warmup_steps), 0)
  if cosine_decay:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        # The cosine needs at least one step after warm-up.
        decay_steps=max(int(num_train_steps), warmup_steps + 1),
        end_value=0.0)
  if not warmup_steps:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.constant_schedule(learning_rate)], [warmup_steps])


def create_optimizer(*, learning_rate: float, warmup_steps: int,
                     num_train_steps: int, cosine_decay: bool = True,
                     grad_clip_norm: float = 0.0,
                     b1: float = 0.9, b2: float = 0.999
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam on the schedule above, after global-norm gradient clipping.

  Args:
    learning_rate, warmup_steps, num_train_steps, cosine_decay: the schedule
      (see `create_learning_rate_schedule`).
    grad_clip_norm: clip gradients to this global norm; 0 disables.
    b1, b2: Adam's moment decays.

  Returns:
    (optimizer, learning-rate schedule).
  """
  schedule = create_learning_rate_schedule(
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      num_train_steps=num_train_steps, cosine_decay=cosine_decay)
  parts = []
  if grad_clip_norm and grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adam(schedule, b1=b1, b2=b2))
  return optax.chain(*parts), schedule


# The `create_optimizer` arguments a trainer's config section (e.g.
# config.vqvae_train, config.prior) sets, each with its type.
OPTIMIZER_FIELDS = {'learning_rate': float, 'warmup_steps': int,
                    'num_train_steps': int, 'cosine_decay': bool,
                    'grad_clip_norm': float}


def settings_key(section: ml_collections.ConfigDict,
                 fields: Mapping[str, Callable[[Any], Any]]
                 ) -> tuple[tuple[str, Any], ...]:
  """`section`'s `fields` (name -> type), sorted: hashable, a cache key.

  The jitted programs of a stage are cached per model and these settings;
  `dict(key)` gives the keyword arguments back (e.g. `create_optimizer`'s
  with `OPTIMIZER_FIELDS`).
  """
  return tuple(sorted((name, cast(section[name]))
                      for name, cast in fields.items()))

"""The error classes: which a user can fix, and what callers may catch."""

import pytest

from vqvae2_jax import errors


@pytest.mark.parametrize('cls,also', [
    (errors.ConfigError, ValueError),
    (errors.WorkdirError, OSError),
    (errors.NoIntactCheckpointError, ValueError),
    (errors.DataNotFoundError, FileNotFoundError),
    (errors.MissingStageError, FileNotFoundError),
    (errors.CheckpointMismatchError, ValueError),
])
def test_fixable_errors_are_user_errors_and_their_builtin_kind(cls, also):
  error = cls('config.x: is 0. Fix: use 1.')
  assert isinstance(error, errors.UserError)
  # Callers that catch the built-in kind (ValueError for refused values,
  # OSError for disks) catch these too.
  assert isinstance(error, also)
  assert str(error) == 'config.x: is 0. Fix: use 1.'


def test_preempted_is_no_user_error_and_carries_the_step():
  with pytest.raises(errors.Preempted) as info:
    raise errors.Preempted('stopped at step 6', step=6)
  assert info.value.step == 6
  assert str(info.value) == 'stopped at step 6'
  assert not isinstance(info.value, errors.UserError)
  with pytest.raises(TypeError):  # The step is keyword-only.
    errors.Preempted('stopped', 6)  # pylint: disable=too-many-function-args

"""Errors a user can fix: main prints their message alone, no traceback.

Every message reads "<what is wrong>. Fix: <what to do>." Raise one of these
(or a subclass) where the cause is outside the program (input, config, disk,
permissions); programming errors stay ordinary exceptions with tracebacks.
"""

import contextlib
from typing import Iterator


class UserError(Exception):
  """An error whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (names the field and a value that can)."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be written or is full (names the path)."""


class DataNotFoundError(UserError, FileNotFoundError):
  """The dataset is neither prepared nor obtainable; the message says how.

  Also a FileNotFoundError, for callers that catch those. It lives here
  rather than beside tfds so that image folders raise it without tfds.
  """


class MissingStageError(UserError, FileNotFoundError):
  """What an earlier stage writes is not in the workdir (names the --mode).

  Also a FileNotFoundError, for callers that catch those.
  """


class MissingPackageError(UserError, ImportError):
  """A package that reading images needs (TensorFlow, tfds) is not installed:
  an accelerator image with JAX alone. The message names the modes that run
  without it."""


# What reading a dataset imports: tf.data and tfds (and clu, whose
# TensorBoard writer the stages fall back from without it).
IMAGE_PACKAGES = ('tensorflow', 'tensorflow_datasets', 'clu')
# The modes that read no images (a workdir's codes and weights only): they
# run without IMAGE_PACKAGES (`stages.run`).
MODES_WITHOUT_IMAGES = ('prior', 'sample', 'export')
MODES_WITHOUT_IMAGES_TEXT = (  # '--mode=prior, sample and export'
    f'--mode={", ".join(MODES_WITHOUT_IMAGES[:-1])} and '
    f'{MODES_WITHOUT_IMAGES[-1]}')


@contextlib.contextmanager
def reading_images(doing: str) -> Iterator[None]:
  """Runs its body, which may read a dataset: a package of IMAGE_PACKAGES
  that is not installed is raised as `missing_image_package`'s error
  (what `doing` needs and what to install); other errors pass unchanged."""
  try:
    yield
  except ModuleNotFoundError as e:
    missing = missing_image_package(doing, e)
    if missing is None:
      raise
    raise missing from e


def missing_image_package(doing: str, e: ModuleNotFoundError
                          ) -> 'MissingPackageError | None':
  """A MissingPackageError saying that `doing` (e.g. '--mode=eval') reads
  the dataset and what to install, where `e` is about a package of
  IMAGE_PACKAGES; None for any other module (re-raise `e`)."""
  root = (e.name or '').split('.')[0]
  if root not in IMAGE_PACKAGES:
    return None
  return MissingPackageError(
      f'{doing} reads the dataset with TensorFlow and tfds, and {root} is '
      f'not installed (an image with JAX alone?); {MODES_WITHOUT_IMAGES_TEXT} '
      "run without them, from a workdir's codes and weights, as do "
      "the Pipeline's load, sample, encode and decode. Fix: pip install "
      'tensorflow-cpu tensorflow-datasets (or pip install -e . in a '
      'checkout, which installs every dependency).')


class CheckpointMismatchError(UserError, ValueError):
  """Checkpoints written for another config, or trained on other codes.

  Also a ValueError, for callers that catch those.
  """


class Preempted(Exception):
  """A run stopped by a preemption notice after saving a checkpoint.

  Not a failure: main reports the message and exits 0; the same command
  resumes from the checkpoint.

  Attributes:
    step: the step the checkpoint was saved at (the same on every process).
  """

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


class NoIntactCheckpointError(UserError, ValueError):
  """Every checkpoint of a stage is damaged: none reads back.

  A ValueError as well, like the other checkpoint refusals (another
  config's checkpoints), so callers that catch those catch this too.
  """

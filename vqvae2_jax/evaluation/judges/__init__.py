r"""Shipped judges: fixed networks that measure samples, one per dataset.

A judge (`models.judge.Judge`) is trained once, shipped in this directory as
a flax msgpack file of its variables, and pinned by the sha256 below: every
workdir's samples are measured with the same ruler, which is not the
network that chose them (the per-workdir domain classifier scores rejection
candidates and is the CAS recipe). Fashion-MNIST's judge was made by

  nice -n 19 python -m experiments.train_judge \
    --out=vqvae2_jax/evaluation/judges/fashion_mnist_judge.msgpack

(seed 26; 10 epochs, 35 min on this project's 2-core CPU shared with other
work; 93.04% top-1 on the 10,000 test images with flip averaging, 92.81%
without; a 1.1 MB file). Loading checks the digest and refuses any other
file.
"""

import dataclasses
import os
from typing import Any

from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax.models import judge as judge_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


class JudgeFileError(errors.UserError):
  """A judge's weights file that is missing or not the shipped one."""


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
  """One shipped judge: its file, digest, data and architecture.

  Attributes:
    name: the dataset it judges (config.data.name).
    filename: the weights file, relative to this directory (or absolute).
    sha256: hex digest the file must have.
    image_size: side of the images it takes ([b, size, size, channels]).
    channels: channels of the images it takes.
    num_classes: classes of the dataset.
    widths: `Judge.widths`.
    convs_per_stage: `Judge.convs_per_stage`.
    crop: `Judge.crop`.
    flip_average: `Judge.flip_average`.
    test_accuracy: its top-1 accuracy on the dataset's test split (as
      printed by the command that made it), for reports.
  """
  name: str
  filename: str
  sha256: str
  image_size: int
  channels: int
  num_classes: int
  widths: tuple[int, ...]
  convs_per_stage: tuple[int, ...]
  crop: tuple[int, int, int, int] | None
  flip_average: bool
  test_accuracy: float

  @property
  def path(self) -> str:
    return os.path.join(_HERE, self.filename)

  def module(self) -> judge_lib.Judge:
    """The Judge this spec describes (evaluation mode needs no RNG)."""
    return judge_lib.Judge(num_classes=self.num_classes,
                           widths=self.widths,
                           convs_per_stage=self.convs_per_stage,
                           crop=self.crop, flip_average=self.flip_average)

  def describe(self) -> str:
    """One line for reports: name, test accuracy and digest."""
    return (f'{self.name} judge ({self.filename}, VGG-style '
            f'{"-".join(str(w) for w in self.widths)}, '
            f'{self.test_accuracy:.2%} test top-1, sha256 {self.sha256})')


JUDGES = {
    'fashion_mnist': JudgeSpec(
        name='fashion_mnist',
        filename='fashion_mnist_judge.msgpack',
        sha256=('6ec3557084a866967acb4189e01ce2fb'
                'c5b4bf39b9c0f9ecd0f92bbf752376ef'),
        image_size=32, channels=1, num_classes=10,
        widths=(32, 64, 128), convs_per_stage=(1, 2, 2),
        crop=(2, 2, 28, 28),  # The 28x28 source area of the padded image.
        flip_average=True,
        test_accuracy=0.9304),  # 0.9281 without flip averaging.
}


def has_judge(dataset: str) -> bool:
  """Whether a judge ships for `dataset` (a config.data.name)."""
  return dataset in JUDGES


def ruler(features: str, dataset: str, image_size: int, channels: int
          ) -> str:
  """The sample metrics' ruler that config.eval.features names.

  'auto' is the shipped judge where one ships for `dataset` and takes its
  images, else the workdir's domain classifier (an image folder run with
  Fashion-MNIST's config, say); any other value names itself.

  Returns:
    'judge', 'classifier' or 'inception'.
  """
  if features != 'auto':
    return features
  spec = JUDGES.get(dataset)
  if spec and (image_size, channels) == (spec.image_size, spec.channels):
    return 'judge'
  return 'classifier'


def config_ruler(config: Any) -> str:
  """`ruler` of a run's config (its eval.features and data section)."""
  data = config.data
  return ruler(config.eval.features, data.name, int(data.image_size),
               int(data.channels))


def file_sha256(path: str) -> str:
  """Hex sha256 of the file at `path`."""
  return files.sha256_file(path)


def save(variables: dict[str, Any], path: str) -> str:
  """Writes a judge's variables as a flax msgpack file of float32 arrays.

  Args:
    variables: {'params', 'batch_stats'} of a `models.judge.Judge`.
    path: the file to write.

  Returns:
    The file's hex sha256 (what a JudgeSpec records).
  """
  # pylint: disable=g-import-not-at-top
  import flax.serialization
  import jax
  import numpy as np
  # pylint: enable=g-import-not-at-top
  state = flax.serialization.to_state_dict(
      jax.tree.map(lambda x: np.asarray(x, np.float32),
                   jax.device_get(variables)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(state))
  return file_sha256(path)


def load(name: str) -> tuple[judge_lib.Judge, dict[str, Any], JudgeSpec]:
  """The shipped judge of dataset `name`, its digest checked.

  Args:
    name: a key of JUDGES, e.g. 'fashion_mnist'.

  Returns:
    (module, variables {'params', 'batch_stats'} of numpy arrays, spec);
    call `module.apply(variables, images)` -> (features [b, F], logits
    [b, num_classes]).

  Raises:
    JudgeFileError: no judge for `name`, or its file is missing or differs
      from the shipped one.
  """
  if name not in JUDGES:
    raise JudgeFileError(
        f'No judge ships for dataset {name!r} (judges: {sorted(JUDGES)}). '
        f"Fix: set config.eval.features to 'classifier' or 'inception'.")
  return load_spec(JUDGES[name])


def load_spec(spec: JudgeSpec
              ) -> tuple[judge_lib.Judge, dict[str, Any], JudgeSpec]:
  """`load` for any spec (tests use tiny judges written to a temporary path).

  Raises:
    JudgeFileError: the file is missing, its sha256 is not spec.sha256, or
      its variables do not fit the spec's architecture.
  """
  # pylint: disable=g-import-not-at-top
  import flax.serialization
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top
  fix = (f'reinstall vqvae2_jax (or `git checkout -- {spec.path}`), or '
         f'remake it with `python -m experiments.train_judge`')
  if not os.path.isfile(spec.path):
    raise JudgeFileError(f'The {spec.name} judge file {spec.path} is '
                         f'missing. Fix: {fix}.')
  digest = file_sha256(spec.path)
  if digest != spec.sha256:
    raise JudgeFileError(
        f'The {spec.name} judge file {spec.path} has sha256 {digest}, not '
        f'the shipped {spec.sha256}. Fix: {fix}.')
  module = spec.module()
  shapes = jax.eval_shape(
      module.init, jax.random.PRNGKey(0),
      jnp.zeros((1, spec.image_size, spec.image_size, spec.channels)))
  with open(spec.path, 'rb') as f:
    state = flax.serialization.msgpack_restore(f.read())
  try:
    variables = flax.serialization.from_state_dict(shapes, state)
    fits = jax.tree.leaves(jax.tree.map(
        lambda v, s: tuple(v.shape) == tuple(s.shape), variables, shapes))
    problem = None if all(fits) else 'an array of another shape'
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
  if problem:
    raise JudgeFileError(
        f'The {spec.name} judge file {spec.path} does not fit its '
        f'architecture ({problem}). Fix: {fix}.')
  return module, dict(variables), spec

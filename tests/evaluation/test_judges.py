"""The shipped judges: digests, the loader's refusals, the accuracy."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from vqvae2_jax import errors
from vqvae2_jax.data import idx_files
from vqvae2_jax.evaluation import judges

_SHIPPED = judges.JUDGES['fashion_mnist']
# Top-1 of the shipped judge on the first 2,000 test images (its training
# printed the figure on all 10,000: _SHIPPED.test_accuracy).
_TEST_2000_TOP1 = 0.9385


def test_shipped_file_has_the_recorded_digest():
  assert os.path.isfile(_SHIPPED.path), _SHIPPED.path
  assert os.path.getsize(_SHIPPED.path) < 5 * 2**20  # A few MB at most.
  assert judges.file_sha256(_SHIPPED.path) == _SHIPPED.sha256
  assert len(_SHIPPED.sha256) == 64
  module, variables, spec = judges.load('fashion_mnist')
  assert spec is _SHIPPED and set(variables) == {'params', 'batch_stats'}
  features, logits = module.apply(variables, np.zeros((3, 32, 32, 1),
                                                      np.float32))
  assert features.shape == (3, _SHIPPED.widths[-1])
  assert logits.shape == (3, 10)


def _one_line_error(excinfo, *needles):
  message = str(excinfo.value)
  assert isinstance(excinfo.value, errors.UserError)
  assert '\n' not in message and 'Fix: ' in message, message
  for needle in needles:
    assert needle in message, (needle, message)


def test_loader_refuses_a_file_with_one_byte_changed(tmp_path):
  copy = tmp_path / 'judge.msgpack'
  shutil.copyfile(_SHIPPED.path, copy)
  data = bytearray(copy.read_bytes())
  data[len(data) // 2] ^= 1
  copy.write_bytes(bytes(data))
  spec = dataclasses.replace(_SHIPPED, filename=str(copy))
  with pytest.raises(judges.JudgeFileError) as excinfo:
    judges.load_spec(spec)
  _one_line_error(excinfo, 'sha256', _SHIPPED.sha256,
                  judges.file_sha256(str(copy)), 'train_judge')


def test_loader_refuses_a_missing_file_and_an_unknown_dataset(tmp_path):
  spec = dataclasses.replace(_SHIPPED, filename=str(tmp_path / 'none'))
  with pytest.raises(judges.JudgeFileError) as excinfo:
    judges.load_spec(spec)
  _one_line_error(excinfo, 'missing')
  with pytest.raises(judges.JudgeFileError) as excinfo:
    judges.load('cifar10')
  _one_line_error(excinfo, "'cifar10'", 'eval.features')


def test_tiny_judge_round_trip_and_architecture_check(tiny_judge):
  module, variables, _ = judges.load_spec(tiny_judge)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1))
  features, logits = module.apply(variables, images)
  assert features.shape == (2, 8) and logits.shape == (2, 10)
  # The right digest of a file that is not this architecture's.
  other = dataclasses.replace(tiny_judge, widths=(4, 16))
  with pytest.raises(judges.JudgeFileError) as excinfo:
    judges.load_spec(other)
  _one_line_error(excinfo, 'does not fit')


def test_the_judge_computes_in_full_float32_on_every_backend(tiny_judge):
  # Its convolutions and products are lowered at the highest precision, so
  # a GPU's default (TF32) does not move the features a CPU gives.
  from vqvae2_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top
  module, variables, _ = judges.load_spec(tiny_judge)
  images = np.zeros((2, 32, 32, 1), np.float32)
  text = eval_run.judge_program(module).lower(variables, images).as_text()
  products = [line for line in text.splitlines()
              if 'stablehlo.convolution' in line or 'dot_general' in line]
  assert products and all('HIGHEST' in line for line in products), products
  plain = jax.jit(module.apply).lower(variables, images).as_text()
  assert 'HIGHEST' not in plain  # What the default would lower to.


def test_shipped_judge_scores_its_recorded_accuracy():
  """The first 2,000 test images: a few seconds on a CPU."""
  # The Debian files are part of every set-up (scripts/setup.sh).
  images, labels = idx_files.read_split('fashion_mnist', 'test')
  module, variables, _ = judges.load('fashion_mnist')
  apply = jax.jit(module.apply)
  correct = sum(
      int(np.sum(np.argmax(apply(variables, images[i:i + 500])[1], -1)
                 == labels[i:i + 500])) for i in range(0, 2000, 500))
  # One image of slack for another CPU's rounding.
  assert abs(correct / 2000 - _TEST_2000_TOP1) <= 1 / 2000, correct / 2000
  assert _TEST_2000_TOP1 >= 0.9


def test_auto_ruler_is_the_judge_only_where_one_takes_the_images():
  assert judges.ruler('auto', 'fashion_mnist', 32, 1) == 'judge'
  assert judges.ruler('auto', 'fashion_mnist', 64, 1) == 'classifier'
  assert judges.ruler('auto', 'image_folder', 32, 1) == 'classifier'
  assert judges.ruler('auto', 'cifar10', 32, 3) == 'classifier'
  for named in ('judge', 'classifier', 'inception'):
    assert judges.ruler(named, 'image_folder', 32, 1) == named

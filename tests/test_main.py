"""The command line: flags, mode dispatch and plain errors."""

import os
import subprocess
import sys

import pytest

from configs import fashion_mnist
from vqvae2_jax import stages

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = '--config=configs/fashion_mnist.py:tiny'


def _main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.main', *args], cwd=_ROOT,
      capture_output=True, text=True, timeout=300)


def test_unknown_mode_is_a_usage_error():
  result = _main(_TINY, '--workdir=/tmp/unused',
                 '--mode=train_everything')
  assert result.returncode != 0
  assert 'value should be one of' in result.stderr
  assert 'vqvae' in result.stderr


def test_config_and_workdir_are_required():
  result = _main('--mode=vqvae')
  assert result.returncode != 0
  assert 'config' in result.stderr and 'workdir' in result.stderr


def test_invalid_config_fails_before_any_work(tmp_path):
  result = _main(_TINY, f'--workdir={tmp_path}',
                 '--mode=vqvae', '--config.data.image_size=30')
  assert result.returncode != 0
  assert 'config.model.downsample_factors' in result.stderr
  assert not os.listdir(tmp_path)


def _error_lines(stderr):
  """stderr without the libraries' start-up noise (TF, XLA, tfds)."""
  return [line for line in stderr.splitlines()
          if line.startswith(('Error:', 'Traceback', 'FATAL'))]


@pytest.mark.parametrize('args, message', [
    (['--config=configs/no_such.py'],
     "there is no file 'configs/no_such.py'"),
    ([_TINY, '--config.vqvae_train.num_trian_steps=5'],
     "no field 'num_trian_steps'. Fix: did you mean 'num_train_steps'?"),
    ([_TINY, '--config.vqvae_train.num_train_steps=-5'],
     'config.vqvae_train.num_train_steps: is -5. Fix: use a positive'),
    ([_TINY, '--config.prior.log_every=0'],
     'config.prior.log_every: is 0. Fix:'),
    ([_TINY, '--config.mesh.fsdp=3'], 'config.mesh: data=-1 x fsdp=3'),
])
def test_config_mistakes_are_one_line_without_traceback(tmp_path, args,
                                                        message):
  result = _main(*args, f'--workdir={tmp_path / "w"}', '--mode=vqvae')
  assert result.returncode == 1, result.stderr[-2000:]
  lines = _error_lines(result.stderr)
  assert len(lines) == 1 and lines[0].startswith('Error:'), lines
  assert message in lines[0] and 'Fix:' in lines[0], lines[0]
  assert not (tmp_path / 'w').exists()  # Nothing was written.


def test_verbosity_shows_the_traceback(tmp_path):
  result = _main(_TINY, '--config.vqvae_train.num_trian_steps=5',
                 f'--workdir={tmp_path}', '--mode=vqvae', '--verbosity=1')
  assert result.returncode != 0
  assert 'Traceback' in result.stderr


def test_a_missing_stage_says_which_mode_to_run(tmp_path):
  result = _main(_TINY, f'--workdir={tmp_path}', '--mode=eval')
  assert result.returncode == 1
  assert 'Fix: run --mode=prior' in result.stderr
  assert 'Traceback' not in result.stderr


def test_every_mode_has_a_stage():
  assert set(stages.MODES) == {'data', 'vqvae', 'codes', 'prior', 'sample',
                               'classifier', 'eval', 'export', 'all'}
  with pytest.raises(ValueError, match='Unknown mode'):
    stages.stage_function('nope')


def test_stage_order():
  assert stages.STAGE_ORDER == ('vqvae', 'codes', 'prior', 'sample',
                                'classifier', 'eval', 'export')


def test_all_trains_the_classifier_only_where_it_is_used():
  config = fashion_mnist.get_config('tiny')
  assert config.eval.features == 'auto' and not config.eval.cas
  assert config.sampling.rejection_keep == 1.0
  without = ('vqvae', 'codes', 'prior', 'sample', 'eval', 'export')
  assert stages.modes_of_all(config) == without
  for field, value in (('eval.features', 'classifier'),
                       ('eval.features', 'inception'), ('eval.cas', True),
                       # No judge takes an image folder: 'auto' is the
                       # domain classifier there.
                       ('data.name', 'image_folder')):
    changed = fashion_mnist.get_config('tiny')
    section, name = field.split('.')
    changed[section][name] = value
    assert stages.modes_of_all(changed) == stages.STAGE_ORDER, field
  # Rejection scores the samples with it: it is trained before them.
  config.sampling.rejection_keep = 0.5
  assert stages.modes_of_all(config) == (
      'vqvae', 'codes', 'prior', 'classifier', 'sample', 'eval', 'export')
  assert fashion_mnist.get_config('tiny').prior.level == -1

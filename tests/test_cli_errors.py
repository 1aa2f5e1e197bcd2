"""The command line reports every error that carries a fix as one line,
and what a run or the API prints besides is what a person follows.

Each error test runs `python -m vqvae2_jax.main` as a user would and checks that
the error is one line "Error: ... Fix: ...", with no traceback (issue 27
item 4, issue 28 item 7). The data is a folder of 16 small images, so no
dataset is prepared; the stage-1 checkpoint is an untrained one written
in-process (conftest's `save_vqvae_checkpoint`), and its codes are
extracted in-process once per module; tests that damage the workdir copy
it.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest

from tests import files_util
from vqvae2_jax import launch
from vqvae2_jax.data import image_folder

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=300):
  return subprocess.run(
      [sys.executable, '-m', 'vqvae2_jax.main', *args], cwd=_ROOT,
      capture_output=True, text=True, timeout=timeout)


def _folder_flags(folder):
  return ['--config=configs/fashion_mnist.py:tiny',
          '--config.data.name=image_folder',
          f'--config.data.image_folder={folder}',
          '--config.data.num_classes=0']


def _the_error_line(result):
  """The one line of a refused run, after checking it is the only one."""
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  lines = [line for line in output.splitlines()
           if line.startswith(('Error:', 'FATAL'))]
  assert len(lines) == 1, lines
  (line,) = lines
  assert line.startswith('Error: ') and 'Fix: ' in line, line
  return line


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """16 grayscale 16x16 PNGs, unlabelled (no class subdirectories)."""
  root = tmp_path_factory.mktemp('images')
  for i in range(16):
    pixels = np.random.default_rng(i).integers(0, 256, (16, 16), np.uint8)
    Image.fromarray(pixels).save(root / f'{i}.png')
  return root


@pytest.fixture(scope='module')
def folder_config(folder):
  """The config the command line builds from `_folder_flags(folder)`."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('tiny')
  config.data.name = 'image_folder'
  config.data.image_folder = str(folder)
  config.data.num_classes = 0
  return config


@pytest.fixture(scope='module')
def coded_workdir(tmp_path_factory, folder_config, save_vqvae_checkpoint):
  """A workdir with a stage-1 checkpoint (step 1) and its extracted codes.

  The codes are extracted in this process (what `--mode=codes` runs with
  `_folder_flags(folder)`), saving a start-up. Shared by the module: copy
  it (`_copy`) before changing it.
  """
  from vqvae2_jax import stages  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('coded') / 'w'
  save_vqvae_checkpoint(folder_config, str(workdir), seed=0, step=1)
  stages.run('codes', folder_config, str(workdir))
  assert os.path.isfile(workdir / 'codes' / 'manifest.json')
  return workdir


def _copy(workdir, tmp_path):
  copy = tmp_path / 'w'
  shutil.copytree(workdir, copy)
  return copy


def test_a_checkpoint_of_another_model_config(coded_workdir, folder, tmp_path):
  workdir = _copy(coded_workdir, tmp_path)
  before = files_util.read_tree(workdir)
  result = _main(*_folder_flags(folder), '--config.model.num_hiddens=32',
                 f'--workdir={workdir}', '--mode=sample')
  line = _the_error_line(result)
  assert 'written for a different model config' in line, line
  assert 'model.num_hiddens: checkpoint 16, config 32' in line, line
  # The refused run wrote nothing.
  assert files_util.read_tree(workdir) == before


def test_codes_of_another_vqvae(coded_workdir, folder, folder_config,
                                save_vqvae_checkpoint, tmp_path):
  workdir = _copy(coded_workdir, tmp_path)
  # Stage 1 trained further after the codes: other weights at step 2.
  save_vqvae_checkpoint(folder_config, str(workdir), seed=1, step=2)
  result = _main(*_folder_flags(folder), f'--workdir={workdir}',
                 '--mode=prior')
  line = _the_error_line(result)
  assert 'were extracted with a different VQ-VAE' in line, line
  assert 'Fix: re-run --mode=codes' in line, line


def test_an_empty_code_shard(coded_workdir, folder, tmp_path):
  workdir = _copy(coded_workdir, tmp_path)
  shards = sorted((workdir / 'codes' / 'train').glob('*.npy'))
  assert shards, os.listdir(workdir / 'codes')
  shards[0].write_bytes(b'')
  result = _main(*_folder_flags(folder), f'--workdir={workdir}',
                 '--mode=prior')
  line = _the_error_line(result)
  assert f'Code shard {shards[0]} is damaged' in line, line
  assert 'Fix: run --mode=codes' in line, line


def test_a_non_finite_loss(folder, tmp_path):
  # A learning rate of 1e30 sends the weights to infinity at the first
  # update; the check at the last step (2) finds it.
  result = _main(*_folder_flags(folder), f'--workdir={tmp_path / "w"}',
                 '--mode=vqvae', '--config.vqvae_train.learning_rate=1e30',
                 '--config.vqvae_train.num_train_steps=2')
  line = _the_error_line(result)
  assert 'Non-finite training metrics at step 2' in line, line
  assert 'Fix: lower --config.vqvae_train.learning_rate' in line, line


def test_an_unknown_config_variant(tmp_path):
  result = _main('--config=configs/fashion_mnist.py:small',
                 f'--workdir={tmp_path / "w"}', '--mode=vqvae')
  line = _the_error_line(result)
  assert line.startswith("Error: --config=configs/fashion_mnist.py:small: "
                         "Unknown variant 'small'"), line
  assert "Fix: use one of ('tiny', 'quality', 'fine', 'long')" in line, line
  assert not (tmp_path / 'w').exists()


def test_an_unknown_config_variant_from_the_api_is_a_user_error():
  from vqvae2_jax import errors  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import api  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError) as error:
    api.load_config(os.path.join(_ROOT, 'configs/fashion_mnist.py:small'))
  assert "Unknown variant 'small'" in str(error.value)
  assert str(error.value).split('Fix: ')[1].startswith("use one of ('tiny', 'quality', 'fine', 'long')")


def test_an_unknown_config_variant_with_verbosity_shows_the_traceback(
    tmp_path):
  result = _main('--config=configs/fashion_mnist.py:small',
                 f'--workdir={tmp_path / "w"}', '--mode=vqvae',
                 '--verbosity=1')
  assert result.returncode == 1
  assert 'Traceback' in result.stderr
  assert "Unknown variant 'small'" in result.stderr


def test_an_image_folder_with_another_class_count(folder, tmp_path):
  result = _main(*_folder_flags(folder), '--config.data.num_classes=10',
                 f'--workdir={tmp_path / "w"}', '--mode=vqvae')
  line = _the_error_line(result)
  assert 'config.data.num_classes is 10 but' in line, line
  assert 'has 0 class subdirectories' in line, line
  assert 'Fix: put each class in its own subdirectory' in line, line


# Noise (issue 28 item 9): what a run and the API print besides errors.

_ABSL_LINE = re.compile(r'^([IDWEF])\d{4} [\d:.]+\s+\d+ (\S+?):\d+\] ')
_PROJECT_FILES = {name for _, _, names in os.walk(
    os.path.join(_ROOT, 'vqvae2_jax')) for name in names
                  if name.endswith('.py')}


def _details(output):
  """(level, file) of each absl-format INFO or DEBUG line in `output`."""
  found = []
  for line in output.splitlines():
    m = _ABSL_LINE.match(line)
    if m and m.group(1) in 'ID':
      found.append((m.group(1), m.group(2)))
  return found


@pytest.mark.parametrize('verbosity', [1, 2])
def test_verbosity_1_shows_the_project_and_2_the_libraries_too(
    coded_workdir, folder, tmp_path, verbosity):
  workdir = _copy(coded_workdir, tmp_path)
  # The codes are extracted: the stage reads the VQ-VAE checkpoint (orbax)
  # and has nothing to do.
  result = _main(*_folder_flags(folder), f'--workdir={workdir}',
                 '--mode=codes', f'--verbosity={verbosity}')
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  details = _details(output)
  assert ('I', 'stages.py') in details, output[-3000:]
  others = sorted({f for _, f in details if f not in _PROJECT_FILES})
  if verbosity == 1:
    assert not others, others
    assert len(output.splitlines()) < 40, output[-3000:]
    # TensorFlow's and XLA's C++ start-up banners.
    assert 'oneDNN' not in output and 'InitializeLog' not in output
  else:
    assert 'checkpoint_manager.py' in others, others


_LOAD = """
import sys
{before}
import vqvae2_jax
pipeline = vqvae2_jax.Pipeline.load(sys.argv[1])
print('devices', pipeline.mesh.devices.size)
"""


@pytest.mark.parametrize('jax_first', [False, True])
def test_pipeline_load_is_quiet_and_uses_the_configs_cpu_devices(
    coded_workdir, jax_first):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  code = _LOAD.format(before='import jax; jax.devices()' if jax_first else '')
  result = subprocess.run(
      [sys.executable, '-c', code, str(coded_workdir)], cwd=_ROOT,
      capture_output=True, text=True, timeout=300, env=env)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  lines = output.strip().splitlines()
  if not jax_first:  # config.mesh.cpu_devices of fashion_mnist.py: 2.
    assert lines == ['devices 2'], lines
  else:  # JAX chose one device before the config was read: said once.
    assert result.stdout.strip() == 'devices 1', lines
    (warning,) = result.stderr.strip().splitlines()
    assert 'Pipeline on 1 CPU device(s), not config.mesh.cpu_devices=2' in (
        warning), warning


# Each line one write: with gloo_lines the two processes share our stdout,
# and print's text and newline, two writes, could interleave between them.
_GLOO_LIKE = (
    'import os; os.write(1, b"first\\n"); '
    'os.write(1, b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected '
    'number of connected peer ranks is : 1\\n"); '
    'os.write(2, b"warning line\\n"); os.write(1, b"last\\n")')


@pytest.mark.parametrize('asked', [False, True])
def test_the_launcher_hides_gloo_lines_unless_asked(capfd, asked):
  status = launch.launch([sys.executable, '-c', _GLOO_LIKE], num_processes=2,
                         devices_per_process=1, gloo_lines=asked)
  assert status == 0
  out, err = capfd.readouterr()
  assert out.count('first\n') == 2 and out.count('last\n') == 2, out
  assert err.count('warning line\n') == 2, err
  assert out.count('[Gloo]') == (2 if asked else 0), out
  assert launch.asks_for_library_lines(['--mode=all', '--verbosity=2'])
  assert not launch.asks_for_library_lines(['--mode=all', '--verbosity=1'])


_GLOO_CHILD = """
import numpy as np
from jax.experimental import multihost_utils
from vqvae2_jax import parallel
parallel.maybe_initialize_distributed()
print('sum', multihost_utils.process_allgather(np.ones(2)).sum())
"""


@pytest.mark.multiprocess
def test_real_gloo_lines_are_hidden(tmp_path):
  # Two JAX processes whose first collective connects them through Gloo,
  # which prints one line per process on stdout.
  (tmp_path / 'child.py').write_text(_GLOO_CHILD)
  code = ('import sys; from vqvae2_jax import launch; sys.exit(launch.launch('
          f'[sys.executable, {str(tmp_path / "child.py")!r}], '
          'num_processes=2, devices_per_process=1, gloo_lines=%s))')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  for asked in (True, False):
    result = subprocess.run([sys.executable, '-c', code % asked], cwd=_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**env, 'PYTHONPATH': _ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('sum') == 2, result.stdout  # Interleaved.
    assert ('[Gloo] Rank' in result.stdout) == asked, result.stdout


def _huge_png_header(path, side=14000):
  """A PNG whose header says side x side grayscale pixels (no pixel data):
  enough for PIL's size checks, a few bytes on disk."""
  def chunk(kind, data):
    body = kind + data
    return (struct.pack('>I', len(data)) + body +
            struct.pack('>I', zlib.crc32(body)))
  header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
                   chunk(b'IEND', b''))


def test_an_image_over_pils_decompression_bomb_limit(tmp_path):
  folder = tmp_path / 'huge'
  folder.mkdir()
  _huge_png_header(folder / 'huge.png')
  result = _main('--config=configs/fashion_mnist.py:tiny',
                 '--config.data.name=image_folder',
                 f'--config.data.image_folder={folder}',
                 '--config.data.num_classes=0', f'--workdir={tmp_path / "w"}',
                 '--mode=vqvae')
  line = _the_error_line(result)
  assert "over PIL's decompression-bomb limit (e.g. huge.png: Image size " in (
      line), line
  assert ('Fix: downscale them, or raise the limit with '
          '--config.data.max_image_pixels=196000000') in line, line


def test_the_decompression_bomb_limit_is_said_and_can_be_raised(
    folder, tmp_path, caplog):
  root = tmp_path / 'images'
  shutil.copytree(folder, root)
  _huge_png_header(root / 'huge.png')
  try:
    with caplog.at_level('WARNING'):
      split = image_folder.load_split(str(root), 'train', 0)
    assert len(split) == 16 and split.num_skipped == 1
    (warning,) = [r.getMessage() for r in caplog.records
                  if 'decompression-bomb' in r.getMessage()]
    assert 'skipped 1 image(s)' in warning and 'huge.png' in warning
    assert 'unreadable' not in warning
    raised = image_folder.load_split(str(root), 'train', 0, 196_000_000)
    assert len(raised) == 17 and raised.num_skipped == 0
  finally:
    image_folder.set_max_image_pixels(0)  # PIL's default for other tests.

"""generate.py's own functions: labels, run names, and a sample run's files.

Sampling a trained workdir end to end (--mode=sample, rejection, an
exported file) is tested in tests/test_api.py; the classifier scorer in
tests/test_rejection.py.
"""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist
from vqvae2_jax import generate


def test_sample_labels_class_by_class():
  np.testing.assert_array_equal(generate.sample_labels(3, 2, True),
                                [0, 0, 1, 1, 2, 2])
  assert generate.sample_labels(3, 2, True).dtype == np.int32
  assert generate.sample_labels(3, 2, False) is None
  assert generate.sample_labels(0, 2, True) is None  # No classes.


def test_run_name_names_checkpoints_seed_controls_and_count():
  config = fashion_mnist.get_config('tiny')
  config.seed = 7
  config.sampling.temperature = 0.9
  config.sampling.top_k = 5
  config.sampling.top_p = 0.95
  config.sampling.rejection_keep = 1.0
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_n40')
  assert generate.run_name(config, 300, [200, 100], 40, False).endswith(
      '_n40_uncond')
  config.sampling.rejection_keep = 0.25
  assert generate.run_name(config, 300, [200, 100], 40, True).endswith(
      '_n40_keep0.25')
  config.sampling.guidance = 2.5  # Named only when on: older runs keep theirs.
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_n40_keep0.25')
  # One scale per level, in place of sampling.guidance; the same scale at
  # every level names (and draws) the run of that one scale.
  config.sampling.guidance = 1.0
  config.sampling.guidance_per_level = (1.3, 2.0)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g1.3-2_n40_keep0.25')
  config.sampling.guidance_per_level = (2.5, 2.5)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_n40_keep0.25')
  # Contrast, one value per level (a single value is every level's); a
  # contrast of 0 everywhere is the plain run.
  config.sampling.contrast = (0.0, 0.5)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_c0-0.5_n40_keep0.25')
  config.sampling.contrast = (0.5,)
  assert '_g2.5_c0.5-0.5_n40' in generate.run_name(config, 300, [200, 100],
                                                   40, True)
  config.sampling.contrast = (0.0,)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_n40_keep0.25')
  config.sampling.contrast = ()
  # A discount likewise, after the contrast.
  config.sampling.discount = (0.0, 4.0)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_ds0-4_n40_keep0.25')
  config.sampling.contrast = (0.5,)
  assert '_g2.5_c0.5-0.5_ds0-4_n40' in generate.run_name(
      config, 300, [200, 100], 40, True)
  config.sampling.contrast = ()
  config.sampling.discount = (0.0,)
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_g2.5_n40_keep0.25')
  config.sampling.discount = ()
  # Other weights draw other samples: the raw weights in place of their
  # Polyak average, and the sampler in bfloat16.
  config.sampling.use_polyak = False
  assert generate.run_name(config, 300, [200, 100], 40, True).endswith(
      '_g2.5_n40_keep0.25_raw')
  config.sampling.dtype = 'bfloat16'
  assert generate.run_name(config, 300, [200, 100], 40, True).endswith(
      '_g2.5_n40_keep0.25_raw_bfloat16')
  config.sampling.use_polyak = True
  assert generate.run_name(config, 300, [200, 100], 40, True).endswith(
      '_g2.5_n40_keep0.25_bfloat16')
  for field in ('guidance_per_level', 'guidance', 'use_polyak', 'dtype'):
    del config.sampling[field]  # A config recorded before the fields.
  assert generate.run_name(config, 300, [200, 100], 40, True) == (
      'vqvae300_prior200-100_seed7_t0.9_k5_p0.95_n40_keep0.25')


def test_grid_images_takes_the_first_of_each_label():
  images = np.arange(8.0).reshape(8, 1, 1, 1)
  labels = np.array([1, 0, 1, 0, 1, 0, 1, 2])
  shown = generate._grid_images(images, labels, per_group=2)
  np.testing.assert_array_equal(shown.ravel(), [1, 3, 0, 2, 7])


def _run_files(out_dir, before=None):
  codes = [np.arange(4, dtype=np.int32).reshape(4, 1, 1),
           np.zeros((4, 2, 2), np.int32)]
  shown = np.zeros((4, 4, 4, 1), np.float32)
  generate._write_run(out_dir, meta={'dir': out_dir, 'num_samples': 4},
                      shown=shown, before=before,
                      levels=np.zeros((2, 4, 4, 1), np.float32), view=1,
                      grid_cols=2, codes=codes, labels=np.arange(4))
  return codes


def test_write_run_writes_every_file_then_renames(tmp_path):
  out_dir = str(tmp_path / 'samples' / 'run')
  os.makedirs(out_dir + '.tmp')  # Left by a killed earlier attempt.
  with open(os.path.join(out_dir + '.tmp', 'stale.txt'), 'w') as f:
    f.write('x')
  codes = _run_files(out_dir)
  assert not os.path.exists(out_dir + '.tmp')
  names = set(os.listdir(out_dir))
  assert {'samples.png', 'levels.png', 'codes.npz', 'meta.json'} <= names
  assert 'stale.txt' not in names
  assert 'comparison.png' not in names  # Only with rejection sampling.
  with open(os.path.join(out_dir, 'meta.json')) as f:
    assert json.load(f) == {'dir': out_dir, 'num_samples': 4}
  with np.load(os.path.join(out_dir, 'codes.npz')) as data:
    assert sorted(data) == ['codes_0', 'codes_1', 'labels']
    np.testing.assert_array_equal(data['codes_0'], codes[0])
  with Image.open(os.path.join(out_dir, 'samples.png')) as png:
    assert png.size == (2 * 6 + 2, 2 * 6 + 2)  # 2x2 grid of 4x4 images.


def test_write_run_with_rejection_writes_the_comparison(tmp_path):
  out_dir = str(tmp_path / 'run')
  _run_files(out_dir, before=np.ones((4, 4, 4, 1), np.float32))
  names = set(os.listdir(out_dir))
  assert {'samples_without_rejection.png', 'comparison.png'} <= names


def test_read_run_gives_back_what_was_written(tmp_path):
  out_dir = str(tmp_path / 'run')
  codes = _run_files(out_dir)
  read, labels = generate.read_run(out_dir, num_levels=2)
  assert len(read) == 2
  for a, b in zip(read, codes):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(labels, np.arange(4))
  with pytest.raises(KeyError):
    generate.read_run(out_dir, num_levels=3)

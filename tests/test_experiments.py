"""The stage-1 experiments: the reference protocol and the ablation runner."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_protocol_sets_the_reference_size_and_budget(stage2_config):
  from experiments import peer_protocol  # pylint: disable=g-import-not-at-top
  config = peer_protocol.apply_protocol(stage2_config, steps=123)
  assert (config.model.num_hiddens, config.model.num_residual_layers,
          config.model.num_residual_hiddens, config.model.num_embeddings,
          tuple(config.model.downsample_factors)) == (128, 2, 32, 512, (8, 4))
  assert (config.vqvae_train.batch_size,
          config.vqvae_train.num_train_steps) == (64, 123)
  assert stage2_config.model.num_hiddens != 128  # A copy was changed.


def test_run_scores_the_centre_and_the_top_level(stage2_config):
  from experiments import peer_protocol  # pylint: disable=g-import-not-at-top
  config = stage2_config.copy_and_resolve_references()
  config.vqvae_train.num_train_steps = 3
  lines = []
  rows = peer_protocol.run(config, [3, 1], log=lines.append)
  assert [r['step'] for r in rows] == [1, 3] and len(lines) == 2
  for row in rows:
    assert math.isclose(row['psnr_area'], -10 * math.log10(row['mse01_area']),
                        rel_tol=1e-9)
    assert 0 < row['used_top'] <= 1 and 0 < row['used_bottom'] <= 1
    assert 1 <= row['ppl_top'] <= 512 and 1 <= row['ppl_bottom'] <= 512
    assert np.isfinite(row['psnr_top_only'])
    assert row['psnr_top_only'] != row['psnr']  # Not the whole decode.
  assert rows[1]['train_s'] > rows[0]['train_s'] > 0


def test_ablation_writes_rows_and_resumes(stage2_config, tmp_path):
  out = tmp_path / 'ablate.json'
  command = [
      sys.executable, '-m', 'experiments.ablate_stage1',
      '--config=configs/fashion_mnist.py:tiny',
      '--config.data.train_split=train[:96]',
      '--config.data.eval_split=test[:40]',
      '--config.vqvae_train.eval_batch_size=16', '--steps=2',
      '--variants=base,rotation', f'--out={out}']
  env = {**os.environ, 'PYTHONPATH': _ROOT}
  first = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert list(rows) == ['base', 'rotation']
  assert rows['rotation']['changes'] == {
      'model.quantizer_gradient': 'rotation'}
  assert rows['base']['result']['step'] == 2
  # The two variants train differently from the first step on.
  assert rows['base']['result']['mse01_area'] != rows['rotation']['result'][
      'mse01_area']
  table = first.stdout.splitlines()
  assert any(line.startswith('rotation') for line in table), first.stdout
  second = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'base: already in' in second.stdout
  assert 'rotation: already in' in second.stdout
  assert json.loads(out.read_text()) == rows


def test_level_table_scores_every_view_and_draws_them(
    stage2_config, save_vqvae_checkpoint, tmp_path):
  # pylint: disable=g-import-not-at-top
  import jax
  from PIL import Image
  from experiments import level_mse
  from vqvae2_jax import loading
  from vqvae2_jax import parallel
  from vqvae2_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  config = stage2_config
  save_vqvae_checkpoint(config, str(tmp_path), seed=3, step=5)
  png = tmp_path / 'levels.png'
  step, rows = level_mse.level_table(config, str(tmp_path), str(png))
  assert step == 5
  assert [r['view'] for r in rows] == [
      'all levels', 'level 0 only', 'level 1 only', 'none (mean codes)']
  # The full view is the model's own reconstruction, scored independently.
  model, variables, _ = loading.load_vqvae(
      config, str(tmp_path), parallel.create_mesh(config.mesh))
  sq, sq_centre, count = 0.0, 0.0, 0
  for batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=16,
      mesh=parallel.create_mesh(config.mesh)):
    images = np.asarray(batch['image'])
    recon = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, batch['image'])[0])
    mask = np.asarray(batch['mask'])
    err = ((images - recon) ** 2)[mask]
    sq += float(err.mean(axis=(1, 2, 3)).sum())
    sq_centre += float(err[:, 2:30, 2:30].mean(axis=(1, 2, 3)).sum())
    count += int(mask.sum())
  assert count == 40
  np.testing.assert_allclose(rows[0]['mse'], sq / count, rtol=1e-5)
  np.testing.assert_allclose(rows[0]['mse01_area'], sq_centre / count / 4,
                             rtol=1e-5)
  for row in rows:
    assert math.isclose(row['psnr'], 10 * math.log10(4 / row['mse']),
                        rel_tol=1e-9)
  # Dropping levels changes the picture; each view is its own row.
  assert len({round(r['mse'], 8) for r in rows}) == 4
  grid = np.asarray(Image.open(png))
  assert grid.shape == (5 * 34 + 2, 16 * 34 + 2)
  first = grid[2:34, 2:34].astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(first[..., None], images_first(config), atol=1e-2)


def images_first(config):
  """The first held-out image as the input pipeline gives it."""
  # pylint: disable=g-import-not-at-top
  from vqvae2_jax import parallel
  from vqvae2_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  batch = next(iter(input_pipeline.create_eval_iterator(
      config.data, global_batch_size=16,
      mesh=parallel.create_mesh(config.mesh))))
  return np.asarray(batch['image'][0])


def test_profile_step_splits_the_step_into_kinds_of_work():
  from experiments import profile_step  # pylint: disable=g-import-not-at-top
  result = profile_step.profile('tiny', steps=2)
  by_kind = result['by_kind']
  assert list(by_kind) == list(profile_step.KINDS)
  # A train step runs convolutions forward and both of their gradients.
  for kind in ('conv forward', 'conv input gradient', 'conv weight gradient'):
    assert by_kind[kind] > 0, kind
  assert result['wall_ms'] > 0 and result['batch'] == 8
  times = [op[0] for op in result['ops']]
  assert times == sorted(times, reverse=True)
  assert abs(sum(times) - sum(by_kind.values())) < 1e-6 * max(sum(times), 1)


def test_profile_step_kinds_of_hlo_convolutions():
  from experiments import profile_step  # pylint: disable=g-import-not-at-top
  fwd = ('f32[8,4,4,16] convolution(a, b), window={size=3x3 pad=1_1x1_1}, '
         'metadata={op_name="jit(step)/jvp(VQVAE)/encoder/conv"}')
  grad_in = fwd.replace('jvp(VQVAE)', 'transpose(jvp(VQVAE))')
  grad_w = 'f32[16,3,3,16] convolution(a, b), window={size=4x4 pad=1_1x1_1}'
  strided_w = ('f32[8,4,4,16] convolution(a, b), window={size=8x8 '
               'rhs_dilate=2x2}')
  assert profile_step.kind_of('ynn_fusion.1', fwd) == 'conv forward'
  assert profile_step.kind_of('ynn_fusion.2', grad_in) == 'conv input gradient'
  assert profile_step.kind_of('ynn_fusion.3', grad_w) == 'conv weight gradient'
  assert profile_step.kind_of('ynn_fusion.4',
                              strided_w) == 'conv weight gradient'
  assert profile_step.kind_of('transpose_copy_fusion.5',
                              'f32[2] fusion(x)') == 'layout copies'
  assert profile_step.kind_of('add_fusion', 'f32[2] fusion(x)') == 'other'


def test_bench_vqvae_reads_the_references_recorded_speed(tmp_path):
  from experiments import bench_vqvae  # pylint: disable=g-import-not-at-top
  (tmp_path / 'peer_rosinality.json').write_text(json.dumps({'vqvae': {
      'sizes': [{'batch': 16, 'image': [64, 64, 3], 'train_images_per_s': 9.0},
                {'batch': 32, 'image': [32, 32, 3],
                 'train_images_per_s': 258.5}]}}))
  (tmp_path / 'peer_rosinality_fmnist.json').write_text(
      json.dumps({'train_images_per_second': 294.4}))
  peer = bench_vqvae.peer_train_images_per_s
  assert peer('peer_arch_32px', str(tmp_path)) == 258.5
  assert peer('peer_protocol', str(tmp_path)) == 294.4
  assert peer('fashion_mnist', str(tmp_path)) is None
  assert peer('peer_protocol', str(tmp_path / 'missing')) is None
  assert peer('peer_protocol', '') is None  # The default: no reference.


def _run_script(module, *args):
  """Runs `python -m module args` from the repository root; its stdout."""
  env = {**os.environ, 'PYTHONPATH': _ROOT}
  done = subprocess.run([sys.executable, '-m', module, *args], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_bench_vqvae_times_data_parallel_steps_on_cpu_devices():
  out = _run_script('experiments.bench_vqvae', '--rows=tiny',
                    '--dtypes=float32', '--min_seconds=0.05',
                    '--cpu_devices=2')
  # The tests' 8 fake devices stay (XLA_FLAGS wins); 2 of them are used.
  assert 'timed on 2 of 8 device(s)' in out
  (row,) = [line.split() for line in out.splitlines()
            if line.startswith('tiny ')]
  train, encode, decode = map(float, row[5:8])
  assert min(train, encode, decode) > 0


def test_peer_speed_alternates_rounds_and_divides_by_the_reference(tmp_path):
  # A stand-in for the reference's Python: records its arguments, reports
  # 100 images/s.
  calls = tmp_path / 'calls.txt'
  fake = tmp_path / 'python'
  fake.write_text('#!/bin/sh\n'
                  f'echo "$@" >> {calls}\n'
                  'echo \'{"images_per_s": 100.0}\'\n')
  fake.chmod(0o755)
  code = tmp_path / 'checkout'
  code.mkdir()
  (code / 'vqvae.py').write_text('')
  out_json = tmp_path / 'speed.json'
  out = _run_script('experiments.peer_speed', f'--peer_python={fake}',
                    f'--peer_code={code}', '--rounds=2', '--seconds=0.2',
                    f'--json={out_json}')
  result = json.loads(out_json.read_text())
  assert result['cpu_devices'] == 2
  assert len(result['rounds']) == 2
  for r in result['rounds']:
    assert r['reference'] == 100.0 and r['ours'] > 0
    assert r['ratio'] == pytest.approx(r['ours'] / 100.0)
  assert 'median' in out.splitlines()[-1]
  # One reference process per round, on the reference's protocol.
  lines = calls.read_text().splitlines()
  assert len(lines) == 2
  assert all(f'--peer_code={code}' in line and '--batch=64' in line and
             '--channels=1' in line and '--threads=2' in line
             for line in lines)


def test_peer_speed_without_the_reference_says_how_to_get_it(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.peer_speed',
       f'--peer_python={tmp_path / "none"}', f'--peer_code={tmp_path}'],
      cwd=_ROOT, env={**os.environ, 'PYTHONPATH': _ROOT},
      capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert 'Fix: see docs/reference.md' in done.stderr


def _run_failing(*args):
  """Runs `python args` from the repository root, which must fail; stderr."""
  done = subprocess.run([sys.executable, *args], cwd=_ROOT,
                        env={**os.environ, 'PYTHONPATH': _ROOT},
                        capture_output=True, text=True, timeout=300)
  assert done.returncode != 0, done.stdout[-3000:]
  return done.stderr


def test_bench_sampling_reads_the_references_recorded_figures(tmp_path):
  extrapolated = {
      'top_32x32_b1': {'total_s': 814.0},
      'bottom_64x64_b1': {'total_s': 7682.0},
      'image_256_b1_top_plus_bottom_plus_decode': {'total_s': 8495.0}}
  path = tmp_path / 'peer.json'
  path.write_text(json.dumps({'pixelsnail': {
      'extrapolated': extrapolated, 'top_32x32_params': 100,
      'bottom_64x64_params': 20}}))
  # In its own process: its flags share names with bench_vqvae's.
  code = ('import json; from experiments import bench_sampling as b; '
          f'print(json.dumps([b.peer_figures({str(path)!r}), '
          'b.peer_figures("")]))')
  done = subprocess.run([sys.executable, '-c', code], cwd=_ROOT,
                        env={**os.environ, 'PYTHONPATH': _ROOT},
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  peer, default = json.loads(done.stdout.strip().splitlines()[-1])
  assert (peer['top32'], peer['lower64'], peer['image']) == (814, 7682, 8495)
  assert peer['image_params'] == 120
  assert not default  # No --peer_json: no reference columns.


def test_bench_sampling_names_a_missing_peer_json(tmp_path):
  missing = tmp_path / 'none.json'
  err = _run_failing('-m', 'experiments.bench_sampling', '--rows=',
                     f'--peer_json={missing}')
  assert f"--peer_json='{missing}' is not a file. Fix:" in err


def test_bench_vqvae_names_a_missing_peer_dir(tmp_path):
  missing = tmp_path / 'none'
  err = _run_failing('-m', 'experiments.bench_vqvae', '--rows=',
                     f'--peer_dir={missing}')
  assert f"--peer_dir='{missing}' is not a folder. Fix:" in err


def test_inception_golden_without_torch_says_how_to_set_it_up():
  # As in a Python without torch, whether or not this one has it.
  code = ('import runpy, sys; sys.modules["torch"] = None; '
          'sys.argv = ["inception_golden", "--out_dir=/nonexistent"]; '
          'runpy.run_module("experiments.inception_golden", '
          'run_name="__main__")')
  err = _run_failing('-c', code)
  assert 'needs torch, torchvision and pytorch-fid' in err
  assert 'Fix: make their virtual environment' in err
  assert '"$TORCH_VENV/bin/python" -m experiments.inception_golden' in err

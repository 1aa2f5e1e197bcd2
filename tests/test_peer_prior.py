"""experiments/peer_prior.py: stage 2 against the PyTorch reference.

The end-to-end test drives the study with a stand-in for the reference's
Python (as test_experiments.py does for peer_speed), so it runs where torch
is not installed (CI). The test of the real reference runs its runner with
torch when PEER_PYTHON and PEER_DIR name a Python with torch and a checkout
of rosinality/vq-vae-2-pytorch (docs/reference.md); without them it is
reported as skipped, never passed.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_round_trip_equals_the_workdirs_codes(codes_workdir,
                                                     tmp_path):
  from experiments import peer_prior  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data import codes as codes_lib  # pylint: disable=g-import-not-at-top
  info = peer_prior.export_codes(str(codes_workdir), str(tmp_path))
  dataset = codes_lib.CodeDataset(str(codes_workdir / 'codes'), None)
  assert info['level_shapes'] == [[4, 4], [8, 8]]
  for split in ('train', 'eval'):
    codes = dataset.split(split)
    want = codes.read(np.arange(codes.num_examples), (0, 1))
    got = peer_prior.read_exported(str(tmp_path), split)
    assert info['splits'][split] == codes.num_examples > 0
    np.testing.assert_array_equal(got['top'], want['codes'][0])
    np.testing.assert_array_equal(got['bottom'], want['codes'][1])
    np.testing.assert_array_equal(got['label'], want['label'])
    assert got['top'].dtype == np.int16 and got['top'].shape[1:] == (4, 4)
    assert len(np.unique(got['bottom'])) > 1  # Not a constant map.


def test_match_width_finds_the_closest_parameter_count(stage2_config):
  from experiments import peer_prior  # pylint: disable=g-import-not-at-top
  config = peer_prior.row_config(stage2_config, 'ours', 8)
  assert config.data.num_classes == 0 and config.prior.batch_size == 8
  target = peer_prior.count_params(
      peer_prior.with_width(config, 1, 40), 1) + 7
  width, params = peer_prior.match_width(config, 1, target)
  assert width == 40 and params == target - 7
  # With labels the same width has more parameters.
  labelled = peer_prior.row_config(stage2_config, 'ours_labels', 8)
  assert peer_prior.count_params(labelled, 0) > peer_prior.count_params(
      config, 0)


def test_time_to_reach_and_the_train_table():
  from experiments import peer_prior  # pylint: disable=g-import-not-at-top
  ref = {'params': 100, 'steps': 10, 'train_s': 10.0, 'curve': [
      {'step': 0, 'train_s': 0.0, 'bits': 9.0},
      {'step': 10, 'train_s': 10.0, 'bits': 5.0}]}
  ours = {'params': 101, 'steps': 30, 'train_s': 10.0, 'curve': [
      {'step': 0, 'train_s': 0.0, 'bits': 9.0},
      {'step': 15, 'train_s': 4.0, 'bits': 4.9},
      {'step': 30, 'train_s': 10.0, 'bits': 4.0}]}
  assert peer_prior.time_to_reach(ours['curve'], 5.0) == 4.0
  assert peer_prior.time_to_reach(ref['curve'], 4.0) is None
  lines = peer_prior.train_table({'reference/top': ref, 'ours/top': ours})
  (row,) = [l for l in lines if l.startswith('| top | ours |')]
  assert '| 4.000 | 4.000 | 4 s (40%) |' in row


_FAKE_RUNNER = textwrap.dedent('''\
    """Stands in for experiments/peer_prior_runner.py in torch's Python."""
    import argparse, json, sys
    import numpy as np
    with open(sys.argv[1], 'a') as f:
      f.write(' '.join(sys.argv[2:]) + '\\n')
    p = argparse.ArgumentParser()
    for name in ('mode', 'level', 'codes', 'save', 'samples_out', 'weights',
                 'eval_at', 'top_shape', 'bottom_shape'):
      p.add_argument('--' + name, default='')
    for name in ('num', 'sample_batch', 'n_class', 'batch', 'repeats'):
      p.add_argument('--' + name, type=int, default=0)
    a, _ = p.parse_known_args(sys.argv[3:])
    if a.mode == 'params':
      out = {'top': 20000, 'bottom': 30000}
    elif a.mode == 'train':
      open(a.save, 'w').write('weights')
      marks = [float(s) for s in a.eval_at.split(',')]
      curve = [{'step': 0, 'train_s': 0.0, 'bits': 4.0}] + [
          {'step': 10 * (i + 1), 'train_s': s, 'bits': 3.9 - 0.1 * i}
          for i, s in enumerate(marks)]
      for point in curve:
        print(json.dumps(point))
      out = {'params': 20000, 'steps': curve[-1]['step'],
             'train_s': marks[-1], 'curve': curve, 'codes_per_s': 500.0}
    elif a.mode == 'speed':
      out = {'codes_per_s': 1000.0}
    else:
      out = {'map_s': {'top': {'median': 2.0}, 'bottom': {'median': 3.0}}}
      if a.num:
        rng = np.random.default_rng(0)
        np.savez(a.samples_out, top=rng.integers(0, a.n_class, (a.num, 4, 4)),
                 bottom=rng.integers(0, a.n_class, (a.num, 8, 8)))
    print(json.dumps(out))
    ''')


def _run(*args, timeout=900):
  done = subprocess.run([sys.executable, '-m', 'experiments.peer_prior',
                         *args], cwd=_ROOT,
                        env={**os.environ, 'PYTHONPATH': _ROOT},
                        capture_output=True, text=True, timeout=timeout)
  return done


def _study_args(workdir, out, python, code, seconds=1):
  return [f'--workdir={workdir}', f'--out={out}', f'--peer_python={python}',
          f'--peer_code={code}', f'--seconds={seconds}', '--evals=2',
          '--batch=8', '--our_steps=20', '--speed_rounds=2',
          '--speed_seconds=0.2', '--sample_batches=1,2',
          '--sample_repeats=1', '--num_samples=20', '--sample_batch=10',
          '--peer_channel=16', '--peer_n_block=1', '--peer_n_res_block=1']


def test_study_end_to_end_with_a_stand_in_reference(codes_workdir, tmp_path):
  calls = tmp_path / 'calls.txt'
  runner = tmp_path / 'fake_runner.py'
  runner.write_text(_FAKE_RUNNER)
  fake = tmp_path / 'python'
  fake.write_text(f'#!/bin/sh\nexec {sys.executable} {runner} {calls} "$@"\n')
  fake.chmod(0o755)
  code = tmp_path / 'checkout'
  code.mkdir()
  (code / 'vqvae.py').write_text('')
  (code / 'pixelsnail.py').write_text('')
  out = tmp_path / 'out'
  args = _study_args(codes_workdir, out, fake, code)
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / 'peer_prior.json').read_text())
  # Export.
  assert results['export']['splits'] == {'train': 96, 'eval': 40}
  assert (out / 'codes' / 'train_bottom.npy').is_file()
  # Training: every row on both levels, ours at the reference's size.
  for level, target in (('top', 20000), ('bottom', 30000)):
    for row in ('reference', 'ours', 'ours_labels'):
      r = results['train'][f'{row}/{level}']
      assert r['curve'][0]['step'] == 0 and r['steps'] > 0, (row, level)
      assert len(r['curve']) >= 2
    for row in ('ours', 'ours_labels'):
      r = results['train'][f'{row}/{level}']
      assert abs(r['params'] - target) / target < 0.2, (row, r['params'])
      assert r['curve'][-1]['bits'] < r['curve'][0]['bits']  # It learned.
      assert (out / f'{row}_{level}.msgpack').is_file()
  # The reference trained on the exported codes, with the scaled sizes.
  lines = calls.read_text().splitlines()
  train_calls = [l for l in lines if '--mode=train' in l]
  assert len(train_calls) == 2
  assert all(f'--codes={out / "codes"}' in l and '--batch=8' in l and
             '--channel=16' in l and '--n_class=16' in l and
             '--eval_at=0.5,1' in l for l in train_calls)
  # Speed: alternating rounds; the ratio is ours over the reference.
  for level in ('top', 'bottom'):
    s = results['speed'][level]
    assert len(s['rounds']) == 2
    assert s['median']['ratio'] == pytest.approx(
        s['median']['ours'] / 1000.0)
  # Sampling at both batches; samples of every row scored by the judge.
  assert set(results['sampling']) == {'top/1', 'bottom/1', 'top/2',
                                      'bottom/2'}
  assert results['sampling']['bottom/2']['reference']['median'] == 3.0
  assert results['sampling']['top/1']['ours']['median'] > 0
  for row in ('reference', 'ours', 'ours_labels'):
    s = results['samples'][row]
    assert s['num_examples'] == 20 and 0 <= s['precision'] <= 1
    assert np.isfinite(s['fid'])
  assert 'class_agreement' in results['samples']['ours_labels']
  assert 'class_agreement' not in results['samples']['ours']
  table = (out / 'peer_prior.md').read_text()
  assert '| bottom | ours_labels |' in table and '| top | 1 |' in table
  assert (out / 'peer_prior.png').read_bytes()[:4] == b'\x89PNG'
  assert 'Held-out bits per code' in done.stdout
  # A rerun does nothing again: every part is in the JSON.
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert calls.read_text().splitlines() == lines
  assert 'already in' in again.stdout


def test_study_without_the_reference_says_how_to_get_it(codes_workdir,
                                                         tmp_path):
  done = _run(f'--workdir={codes_workdir}', f'--out={tmp_path}',
              f'--peer_python={tmp_path / "none"}', f'--peer_code={tmp_path}')
  assert done.returncode != 0
  assert 'Fix: see docs/reference.md' in done.stderr


def _real_reference():
  python, code = os.environ.get('PEER_PYTHON'), os.environ.get('PEER_DIR')
  if not python or not code:
    pytest.skip('PEER_PYTHON and PEER_DIR are not set: the reference runs '
                'only with them (docs/reference.md sets them up)')
  return python, code


def test_the_reference_runner_trains_times_and_samples(codes_workdir,
                                                       tmp_path):
  python, code = _real_reference()
  out = tmp_path / 'out'
  done = _run(*_study_args(codes_workdir, out, python, code, seconds=3),
              '--rows=reference,ours')
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / 'peer_prior.json').read_text())
  for level in ('top', 'bottom'):
    ref = results['train'][f'reference/{level}']
    assert ref['steps'] > 0 and ref['params'] == results[
        'reference_params'][level]
    # Trained on the codes: better than its untrained start.
    assert ref['curve'][-1]['bits'] < ref['curve'][0]['bits']
    assert results['speed'][level]['median']['reference'] > 0
    assert results['sampling'][f'{level}/2']['reference']['median'] > 0
  assert (out / 'reference_top.pt').is_file()
  assert results['samples']['reference']['num_examples'] == 20

"""The stages by name: dispatch, --mode=all's order, the recorded config,
the log files of stages that do not train, the closing summary.

Stage functions are replaced by recorders here; the stages themselves run in
their own tests and in test_pipeline.py.
"""

import json
import logging as py_logging
import os

from absl import logging
import pytest

from configs import fashion_mnist
from vqvae2_jax import stages

# pylint: disable=protected-access


@pytest.fixture
def recorded(monkeypatch):
  """Replaces every stage by a recorder; returns the calls [(mode, workdir)]."""
  calls = []

  def fake(mode):
    def stage(config, workdir):
      del config
      calls.append((mode, workdir))
      logging.info('the %s stage did its work', mode)
      if mode == 'sample':
        run_dir = os.path.join(workdir, 'samples', 'run')
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, 'meta.json'), 'w') as f:
          f.write('{}')
        return {'dir': run_dir, 'num_samples': 10}
      if mode == 'vqvae':
        return {'eval/psnr': 20.0}
      if mode == 'eval':  # A report written now: its log is written too.
        os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
        with open(os.path.join(workdir, 'eval', 'report.json'), 'w') as f:
          f.write('{}')
      return {'mode': mode}
    return stage

  monkeypatch.setattr(stages, 'stage_function', fake)
  before = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  yield calls
  logging.set_verbosity(before)


def test_every_mode_but_all_names_a_function():
  for mode in stages.MODES:
    if mode != 'all':
      assert callable(stages.stage_function(mode)), mode


def test_all_runs_the_pipeline_in_order_and_records_the_config(
    recorded, tmp_path, caplog):
  config = fashion_mnist.get_config('tiny')
  workdir = str(tmp_path)
  with caplog.at_level(py_logging.INFO):
    results = stages.run('all', config, workdir)
  modes = stages.modes_of_all(config)
  assert [m for m, _ in recorded] == list(modes)
  assert all(w == workdir for _, w in recorded)
  assert list(results) == list(modes)
  assert results['vqvae'] == {'eval/psnr': 20.0}
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == json.loads(config.to_json())
  said = [r.getMessage() for r in caplog.records
          if getattr(r, 'vqvae2_console', False)]
  assert said[0] == (f'[1/{len(modes)}] vqvae: stage 1, the hierarchical '
                     'VQ-VAE')
  assert said[-len(modes) - 1].startswith('Done in ')
  assert said[-len(modes)].startswith('  vqvae ')
  assert 'PSNR 20.00 dB' in said[-len(modes)]
  # A stage that does not train has its log written where its files are.
  with open(tmp_path / 'eval' / 'log.txt') as f:
    assert 'the eval stage did its work' in f.read()
  with open(tmp_path / 'samples' / 'run' / 'log.txt') as f:
    assert 'the sample stage did its work' in f.read()
  assert not os.path.exists(tmp_path / 'codes' / 'log.txt')  # Did nothing.


def test_one_mode_runs_alone_and_data_records_no_config(recorded, tmp_path):
  config = fashion_mnist.get_config('tiny')
  assert list(stages.run('prior', config, str(tmp_path))) == ['prior']
  assert os.path.exists(tmp_path / 'config.json')
  other = tmp_path / 'other'
  other.mkdir()
  stages.run('data', config, str(other))
  assert [m for m, _ in recorded] == ['prior', 'data']
  assert not os.path.exists(other / 'config.json')


def test_an_invalid_config_stops_before_any_stage(recorded, tmp_path):
  config = fashion_mnist.get_config('tiny')
  config.model.num_embeddings = 1
  with pytest.raises(ValueError, match='model.num_embeddings'):
    stages.run('vqvae', config, str(tmp_path))
  assert not recorded
  assert not os.listdir(tmp_path)


def test_config_recorded_once_and_not_beside_an_exported_pipeline(tmp_path):
  config = fashion_mnist.get_config('tiny')
  workdir = str(tmp_path)
  assert stages._refusal(config, workdir) is None
  stages._record_config(config, workdir)
  path = tmp_path / 'config.json'
  text = path.read_text()
  assert json.loads(text)['model']['num_embeddings'] == 16
  os.utime(path, (0, 0))
  stages._record_config(config, workdir)  # The same text: not rewritten.
  assert os.stat(path).st_mtime == 0
  config.sampling.temperature = 0.5  # Another accepted run: recorded.
  stages._record_config(config, workdir)
  assert json.loads(path.read_text())['sampling']['temperature'] == 0.5
  downloaded = tmp_path / 'downloaded'
  (downloaded / 'export').mkdir(parents=True)
  (downloaded / 'export' / 'model.msgpack').write_bytes(b'')
  assert 'exported pipeline and no checkpoint' in stages._refusal(
      config, str(downloaded))
  stages._record_config(config, str(downloaded))
  assert not os.path.exists(downloaded / 'config.json')


def test_log_paths_of_stages_that_do_not_train(tmp_path):
  workdir = str(tmp_path)
  log_path = stages._log_path
  assert log_path('codes', {'extract_time_s': 3.0}, workdir, 0) == (
      os.path.join(workdir, 'codes', 'log.txt'))
  assert log_path('codes', {'extract_time_s': 0}, workdir, 0) is None
  # No report written this run (an up-to-date one was only read): no log.
  assert log_path('eval', {}, workdir, 0) is None
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'report.json').write_text('{}')
  assert log_path('eval', {}, workdir, 0) == os.path.join(workdir, 'eval',
                                                          'log.txt')
  os.utime(tmp_path / 'eval' / 'report.json', (100, 100))
  assert log_path('eval', {}, workdir, start=1000) is None
  assert log_path('data', {}, workdir, 0) == os.path.join(workdir, 'data',
                                                          'log.txt')
  run_dir = tmp_path / 'samples' / 'run'
  run_dir.mkdir(parents=True)
  (run_dir / 'meta.json').write_text('{}')
  result = {'dir': str(run_dir)}
  assert log_path('sample', result, workdir, 0) == str(run_dir / 'log.txt')
  # A sample run found finished (written before this start): no log.
  os.utime(run_dir / 'meta.json', (100, 100))
  assert log_path('sample', result, workdir, start=1000) is None
  assert log_path('export', {'path': 'x'}, workdir, 0) is None
  assert log_path('eval', None, workdir, 0) is None


def test_summary_lines_give_minutes_and_key_figures():
  results = {
      'vqvae': {'eval/psnr': 24.123, 'eval/psnr_area': 22.5},
      'prior': {'level_0': {'eval/bits_per_code': 2.5},
                'level_1': {'eval/bits_per_code': 1.25}},
      'classifier': {'eval/accuracy': 0.875},
      'sample': {'dir': '/w/samples/run', 'num_samples': 10},
      'eval': {'samples': {'fid': 12.345, 'inception_score': 3.0,
                           'precision': 0.5, 'recall': None}},
      'export': {'path': '/w/export/x.msgpack'},
      'codes': None}
  seconds = {m: 60.0 for m in results}
  lines = stages.summary_lines(results, seconds, '/w')
  assert lines[0] == 'Done in 7.0 min; workdir /w:'
  assert lines[1] == ('  vqvae         1.0 min  PSNR 24.12 dB (original area '
                      '22.50); /w/vqvae/images')
  assert lines[2].endswith('held-out bits/code 2.500 / 1.250')
  assert lines[3].endswith('test accuracy 87.50%')
  assert lines[4].endswith('10 samples; /w/samples/run/samples.png')
  assert lines[5].endswith('FID 12.3, IS 3, precision 0.5; /w/eval/report.md')
  assert lines[6].endswith('/w/export/x.msgpack')
  assert lines[7] == '  codes         1.0 min'

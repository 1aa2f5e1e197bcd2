"""The workdir's map: every path, and the names existing workdirs use."""

import os

import pytest

from vqvae2_jax import workdir as workdir_lib


def test_every_path_has_the_name_existing_workdirs_use(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path))
  root = str(tmp_path)
  # These names are on disk in every workdir written so far; renaming one
  # would orphan trained checkpoints, codes and sample runs.
  assert wd.root == root
  assert wd.config_json == f'{root}/config.json'
  assert wd.data == f'{root}/data'
  assert wd.vqvae == f'{root}/vqvae'
  assert wd.vqvae_images == f'{root}/vqvae/images'
  assert [wd.prior(l) for l in range(3)] == [
      f'{root}/prior_0', f'{root}/prior_1', f'{root}/prior_2']
  assert wd.codes == f'{root}/codes'
  assert wd.samples() == f'{root}/samples'
  assert wd.samples('run') == f'{root}/samples/run'
  assert wd.classifier == f'{root}/classifier'
  assert wd.eval == f'{root}/eval'
  assert wd.report_json == f'{root}/eval/report.json'
  assert wd.report_md == f'{root}/eval/report.md'
  assert wd.cas('samples') == f'{root}/eval/cas_samples'
  assert wd.cas('samples', 'run') == f'{root}/eval/cas_samples_run'
  assert wd.cas('reconstructions') == f'{root}/eval/cas_reconstructions'
  assert wd.export == f'{root}/export'


def test_stage_files():
  assert workdir_lib.checkpoint_dir('/w/vqvae') == '/w/vqvae/checkpoints'
  assert workdir_lib.metrics_json('/w/prior_1') == '/w/prior_1/metrics.json'
  assert workdir_lib.progress_json('/w/vqvae') == '/w/vqvae/progress.json'
  assert workdir_lib.log_txt('/w/codes') == '/w/codes/log.txt'


def test_paths_are_absolute_strings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  wd = workdir_lib.Workdir('runs/a')
  assert wd.root == os.path.join(str(tmp_path), 'runs', 'a')
  for path in (wd.vqvae, wd.prior(0), wd.codes, wd.samples('x'),
               wd.classifier, wd.eval, wd.export, wd.config_json,
               workdir_lib.checkpoint_dir(wd.vqvae)):
    assert isinstance(path, str) and os.path.isabs(path)
  # A path-like and a Workdir name the same workdir.
  assert workdir_lib.Workdir(tmp_path / 'runs' / 'a') == wd
  assert workdir_lib.Workdir(wd) == wd


def test_is_frozen(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path))
  with pytest.raises(AttributeError):
    wd.root = '/elsewhere'


def test_exported_files_newest_name_last(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path))
  assert not wd.exported_files()  # No export/ directory at all.
  os.makedirs(wd.export)
  for name in ('b_vqvae2_prior2.msgpack', 'a_vqvae1_prior1.msgpack',
               'notes.txt', 'c.msgpack.tmp'):
    with open(os.path.join(wd.export, name), 'w') as f:
      f.write('x')
  assert wd.exported_files() == [
      os.path.join(wd.export, 'a_vqvae1_prior1.msgpack'),
      os.path.join(wd.export, 'b_vqvae2_prior2.msgpack')]

"""The shipped pretrained pipelines' registry (vqvae2_jax/pretrained)."""

import dataclasses

import pytest

from vqvae2_jax import files
from vqvae2_jax import pretrained


def _spec(path, sha256):
  return pretrained.PretrainedSpec(
      name='toy', filename=str(path), sha256=sha256, command='make it',
      class_agreement=0.5, num_samples=10)


def test_checked_path_checks_the_digest(tmp_path, monkeypatch):
  path = tmp_path / 'toy.msgpack'
  path.write_bytes(b'weights')
  spec = _spec(path, files.sha256_file(str(path)))
  monkeypatch.setitem(pretrained.PRETRAINED, 'toy', spec)
  assert pretrained.checked_path('toy') == str(path)
  # Another file under the same name is refused, naming both digests.
  path.write_bytes(b'other weights')
  with pytest.raises(pretrained.PretrainedFileError,
                     match=f'not the shipped {spec.sha256}.*Fix:'):
    pretrained.checked_path('toy')
  path.unlink()
  with pytest.raises(pretrained.PretrainedFileError,
                     match='missing.*Fix:.*make it'):
    pretrained.checked_path('toy')


def test_an_unknown_name_lists_the_shipped_ones(monkeypatch):
  monkeypatch.setattr(pretrained, 'PRETRAINED', {})
  with pytest.raises(pretrained.PretrainedFileError, match='none shipped'):
    pretrained.checked_path('toy')


def test_every_shipped_spec_names_a_file_in_the_package_with_its_digest():
  for name, spec in pretrained.PRETRAINED.items():
    assert spec.name == name
    assert not spec.filename.startswith('/'), 'ship it inside the package'
    assert pretrained.checked_path(name) == spec.path
    assert dataclasses.replace(spec).num_samples > 0

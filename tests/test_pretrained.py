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


@pytest.mark.parametrize('name', sorted(pretrained.PRETRAINED))
def test_each_shipped_fashion_mnist_model_samples_as_its_figure_says(name):
  """Its digest, then its class agreement under the judge on 200 samples
  at the settings it loads with against the 10,000-sample figure the
  README quotes (within 4 binomial standard deviations: about 0.08 at
  92%)."""
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from vqvae2_jax import Pipeline
  from vqvae2_jax.evaluation import judges
  # pylint: enable=g-import-not-at-top
  spec = pretrained.PRETRAINED[name]
  pipe = Pipeline.load(name)
  assert pipe.config.data.name == 'fashion_mnist'
  labels = np.repeat(np.arange(10), 20)
  for field, value in spec.sampling.items():  # As the figure was measured.
    assert tuple(np.ravel(pipe.config.sampling[field])) == tuple(
        np.ravel(value)), field
  images, codes = pipe.sample(labels=labels, key=0)
  assert [c.shape for c in codes] == [(200, 4, 4), (200, 8, 8)]
  module, variables, _ = judges.load('fashion_mnist')
  _, logits = module.apply(variables, jnp.asarray(images))
  agreement = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  p = spec.class_agreement
  assert abs(agreement - p) <= 4 * np.sqrt(p * (1 - p) / len(labels)), (
      agreement, p)

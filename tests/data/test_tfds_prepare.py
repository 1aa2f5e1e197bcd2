"""Offline preparation of tfds datasets and the missing-data errors."""

from etils import epath
import pytest
import tensorflow_datasets as tfds

from configs import fashion_mnist
from vqvae2_jax.data import tfds_prepare


def _config(data_dir, name='fashion_mnist', manual_dir=''):
  config = fashion_mnist.get_config().data
  config.name = name
  config.data_dir = str(data_dir)
  config.manual_dir = manual_dir
  return config


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """No Debian package and no internet."""
  monkeypatch.setitem(tfds_prepare.DEBIAN_SOURCES, 'fashion_mnist',
                      ('dataset-fashion-mnist', str(tmp_path / 'no_debian')))
  monkeypatch.setattr(tfds_prepare, '_unreachable_host',
                      lambda url_infos: 'fashion-mnist.example')


def test_missing_fashion_mnist_says_how_to_get_it(offline, tmp_path):
  with pytest.raises(tfds_prepare.DataNotFoundError) as error:
    tfds_prepare.prepare_builder(_config(tmp_path / 'tfds'))
  message = str(error.value)
  assert "Dataset 'fashion_mnist' is not prepared in" in message
  assert 'fashion-mnist.example cannot be reached' in message
  assert 'sudo apt-get install dataset-fashion-mnist' in message
  assert ("tfds.builder('fashion_mnist', data_dir='" + str(tmp_path / 'tfds')
          + "').download_and_prepare()") in message
  assert '--config.data.manual_dir=' in message
  assert 'train-images-idx3-ubyte.gz' in message
  assert '--config.data.data_dir' in message


def test_manual_dir_without_the_files(offline, tmp_path):
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'other.txt').write_text('x')
  with pytest.raises(tfds_prepare.DataNotFoundError,
                     match=r'lacks the source files.*t10k-images'):
    tfds_prepare.prepare_builder(
        _config(tmp_path / 'tfds', manual_dir=str(tmp_path / 'manual')))
  with pytest.raises(tfds_prepare.DataNotFoundError, match='not a directory'):
    tfds_prepare.prepare_builder(
        _config(tmp_path / 'tfds', manual_dir=str(tmp_path / 'missing')))


def test_manual_files_with_wrong_checksums(offline, tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
               't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
    (manual / name).write_bytes(b'not the data')
  with pytest.raises(tfds_prepare.DataNotFoundError,
                     match='neither the official checksums nor'):
    tfds_prepare.prepare_builder(
        _config(tmp_path / 'tfds', manual_dir=str(manual)))


def test_missing_imagenet_asks_for_manual_dir(tmp_path):
  with pytest.raises(tfds_prepare.DataNotFoundError) as error:
    tfds_prepare.prepare_builder(_config(tmp_path / 'tfds', 'imagenet2012'))
  message = str(error.value)
  assert 'must be downloaded by hand' in message
  assert 'ILSVRC2012_img_train.tar' in message  # tfds's own instructions.
  assert '--config.data.manual_dir=' in message


def test_debian_files_match_the_shipped_checksums():
  debian = epath.Path(tfds_prepare.DEBIAN_SOURCES['fashion_mnist'][1])
  official = tfds.builder_cls('fashion_mnist').url_infos
  shipped = tfds_prepare.offline_builder_cls('fashion_mnist').url_infos
  assert set(shipped) == set(official)  # Same URLs, other checksums.
  assert tfds_prepare.files_match(debian, shipped)
  assert not tfds_prepare.files_match(debian, official)


def test_offline_builder_keeps_the_tfds_name_and_registry():
  cls = tfds_prepare.offline_builder_cls('fashion_mnist')
  assert cls.name == 'fashion_mnist'
  assert tfds.builder_cls('fashion_mnist') is not cls
  assert issubclass(cls, tfds.builder_cls('fashion_mnist'))

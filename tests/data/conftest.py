"""Fixtures of the data tests: Fashion-MNIST prepared once per session."""

import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import fashion_mnist
from vqvae2_jax.data import tfds_prepare


@pytest.fixture(scope='session')
def fashion_data_dir() -> str:
  """The session's fresh tfds data_dir (tests/conftest.py) holding
  fashion_mnist, prepared from the Debian files (found without
  configuration). Takes about a minute, once per session."""
  data_dir = tfds.core.constants.DATA_DIR
  config = fashion_mnist.get_config().data
  config.data_dir = data_dir
  tfds_prepare.prepare_builder(config)
  return data_dir


@pytest.fixture
def fashion_config(fashion_data_dir) -> ml_collections.ConfigDict:
  """configs/fashion_mnist.py's data section, reading the fixture data."""
  config = fashion_mnist.get_config().data
  config.data_dir = fashion_data_dir
  return config

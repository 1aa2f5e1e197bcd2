"""Test session set-up: 8 fake CPU devices for every test.

XLA reads its flags once, when the backend starts, so they are set here,
before any test module imports jax. Tests that want one device build their
mesh over `jax.devices()[:1]`.
"""

import os
import shutil
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
      _flags + ' --xla_force_host_platform_device_count=8').strip()
# Keep TensorFlow (tf.data) off any accelerator and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# One tfds data_dir for the whole session, fresh each run: Fashion-MNIST is
# prepared from the Debian files once (about a minute) and every test that
# reads the default data_dir finds it; nothing is written to ~/.
_TFDS_DIR = tempfile.mkdtemp(prefix='vqvae2_tfds_')
os.environ['TFDS_DATA_DIR'] = _TFDS_DIR


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_TFDS_DIR, ignore_errors=True)

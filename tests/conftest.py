"""Test session set-up: 8 fake CPU devices for every test.

XLA reads its flags once, when the backend starts, so they are set here,
before any test module imports jax. Tests that want one device build their
mesh over `jax.devices()[:1]`.
"""

import os

os.environ['JAX_PLATFORMS'] = 'cpu'
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
      _flags + ' --xla_force_host_platform_device_count=8').strip()
# Keep TensorFlow (tf.data) off any accelerator and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

"""FID's Inception-v3: pool3 features of the 2015-12-05 TensorFlow graph.

The Fréchet Inception Distance is defined on the 2048-d pool3 features of the
Inception-v3 graph TensorFlow published on 2015-12-05. pytorch-fid ported that
graph and its weights to PyTorch (`pytorch_fid.inception.InceptionV3` with
`use_fid_inception=True`); this module is a Flax port of that network up to
pool3, and `load_fid_inception` reads pytorch-fid's weights file:

  pt_inception-2015-12-05-6726825d.pth, published at
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

The weights are not shipped with this project. Download the file on a machine
with internet and point `config.eval.inception_weights` at it, e.g.
`--config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth`.
Reading it needs no torch (vqvae2_jax.evaluation.torch_state_dict).

Input transform, as the reference applies it: images are resized to 299x299
by bilinear interpolation at half-pixel centres without antialiasing (torch's
`F.interpolate(mode='bilinear', align_corners=False)`), then fed in [-1, 1].
The reference takes [0, 1] and maps to [-1, 1] after resizing; this port takes
the project's [-1, 1] images directly (resizing commutes with the affine map).
Grayscale images are repeated to 3 channels.

What distinguishes the FID graph from torchvision's Inception-v3: the 3x3
average pools inside the A, C and first E blocks leave the zero padding out
of the average (TensorFlow's pooling), and the last E block pools by max.
BatchNorm is in inference form with eps 0.001.

Shapes, for [b, h, w, 3] in: resized [b, 299, 299, 3]; stem 147x147x32,
145x145x32, 145x145x64, pool 72x72x64, 72x72x80, 70x70x192, pool 35x35x192;
Mixed_5b-d 35x35x(256, 288, 288); Mixed_6a 17x17x768; Mixed_6b-e 17x17x768;
Mixed_7a 8x8x1280; Mixed_7b-c 8x8x2048; spatial mean [b, 2048].

Module and parameter names follow the reference's state dict
(`Mixed_5b.branch1x1.conv.weight` is `params['Mixed_5b']['branch1x1']['conv']
['kernel']`), so the conversion is a rename and a transpose.
"""

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import errors
from vqvae2_jax.evaluation import torch_state_dict

Array = jax.Array
PrecisionLike = Any

FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                   f'fid_weights/{FID_WEIGHTS_FILE}')
INPUT_SIZE = 299
FEATURES = 2048


class InceptionInputError(errors.UserError, ValueError):
  """Weights or images that FID's Inception-v3 cannot take.

  Also a ValueError, for callers that catch those.
  """


class InceptionWeightsNotFoundError(errors.UserError, FileNotFoundError):
  """No weights file at config.eval.inception_weights (says where to get it).

  Also a FileNotFoundError, for callers that catch those.
  """


# The reference's classifier head; FID features stop before it.
_IGNORED_KEYS = ('fc.weight', 'fc.bias')


def to_rgb(images: Array) -> Array:
  """Repeats grayscale images to 3 channels; RGB passes through.

  Args:
    images: [..., h, w, 1] or [..., h, w, 3].

  Returns:
    [..., h, w, 3].
  """
  channels = images.shape[-1]
  if channels == 3:
    return images
  if channels == 1:
    return jnp.repeat(images, 3, axis=-1)
  raise InceptionInputError(
      f'Inception takes 1 or 3 channels, got images of shape '
      f'{images.shape}. Fix: pass [..., h, w, 1] or '
      '[..., h, w, 3] images.')


def resize_bilinear(images: Array,
                    size: int | tuple[int, int] = INPUT_SIZE) -> Array:
  """Resizes as torch's F.interpolate(bilinear, align_corners=False).

  Both sample at half-pixel centres, (i + 0.5) * in / out - 0.5, and clamp at
  the borders; without antialiasing jax's triangle kernel then weighs the two
  nearest pixels exactly as torch does, up- or downsampling (tested against
  torch's output in tests/models/test_inception.py).

  Args:
    images: [b, h, w, c] float.
    size: output side, or (height, width).

  Returns:
    [b, height, width, c] float32.
  """
  images = jnp.asarray(images, jnp.float32)
  height, width = (size, size) if isinstance(size, int) else size
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, height, width, c), 'bilinear',
                          antialias=False)


class BasicConv(nn.Module):
  """Convolution without bias, inference BatchNorm (eps 0.001), ReLU.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: stride of both spatial axes.
    padding: (ph, pw) zeros on each side, as torch's Conv2d padding.
    precision: precision of the convolution.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  # TensorFlow's average pool divides by the pixels inside the image only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled branches.

  Attributes:
    pool_features: channels of the pooled branch (output 224 + this).
    precision: precision of the convolutions.
  """
  pool_features: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, name='branch1x1')(x)
    b5 = conv(48, name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction: strided 3x3, double 3x3 and max-pool branches.

  Attributes:
    precision: precision of the convolutions.
  """
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = conv(64, name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 and 7x1).

  Attributes:
    channels_7x7: inner channels of the 7x7 branches.
    precision: precision of the convolutions.
  """
  channels_7x7: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    row = dict(kernel_size=(1, 7), padding=(0, 3))
    col = dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = conv(192, name='branch1x1')(x)
    b7 = conv(c7, name='branch7x7_1')(x)
    b7 = conv(c7, **row, name='branch7x7_2')(b7)
    b7 = conv(192, **col, name='branch7x7_3')(b7)
    bd = conv(c7, name='branch7x7dbl_1')(x)
    bd = conv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = conv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = conv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = conv(192, **row, name='branch7x7dbl_5')(bd)
    bp = conv(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction: 3x3, 7x7-then-3x3 and max-pool branches.

  Attributes:
    precision: precision of the convolutions.
  """
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 branches; 2048 channels out.

  Attributes:
    max_pool: pool the last branch by max (the FID graph's Mixed_7c) instead
      of the padding-excluding average (its Mixed_7b).
    precision: precision of the convolutions.
  """
  max_pool: bool = False
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    row = dict(kernel_size=(1, 3), padding=(0, 1))
    col = dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = conv(320, name='branch1x1')(x)
    b3 = conv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, **row, name='branch3x3_2a')(b3),
                          conv(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, **row, name='branch3x3dbl_3a')(bd),
                          conv(384, **col, name='branch3x3dbl_3b')(bd)],
                         axis=-1)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = conv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID's Inception-v3 up to the 2048-d pool3 features.

  Attributes:
    resize_input: resize to 299x299 first, as the reference does. Without it
      the network runs at the input's own size (at least 75x75), which is not
      standard FID.
    precision: precision of the convolutions. HIGHEST by default, because
      accelerators otherwise run float32 convolutions in reduced precision
      (TF32, bfloat16 passes) and the features drift from the reference's.
  """
  resize_input: bool = True
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """pool3 features of a batch of images.

    Args:
      images: float [b, h, w, 3] or [b, h, w, 1] in [-1, 1].

    Returns:
      float32 [b, 2048].
    """
    x = to_rgb(jnp.asarray(images, jnp.float32))
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    p = self.precision
    x = BasicConv(32, (3, 3), strides=2, precision=p, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), precision=p, name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p,
                  name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), precision=p, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), precision=p, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64),
                                ('Mixed_5d', 64)):
      x = InceptionA(pool_features, precision=p, name=name)(x)
    x = InceptionB(precision=p, name='Mixed_6a')(x)
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160),
                               ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7, precision=p, name=name)(x)
    x = InceptionD(precision=p, name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, precision=p, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, precision=p, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


# Flax leaf (collection, name) <-> torch state-dict suffix.
_LEAVES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _flax_to_torch(module: FIDInceptionV3) -> list[tuple[tuple[str, ...],
                                                         str, tuple[int, ...]]]:
  """[(flax path incl. collection, torch name, flax shape)] of every leaf."""
  shapes = jax.eval_shape(
      module.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    collection, *names, last = keys
    torch_name = '.'.join([*names, _LEAVES[(collection, last)]])
    out.append((keys, torch_name, tuple(leaf.shape)))
  return out


def _torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  if len(flax_shape) == 4:  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape)


def torch_state_dict_spec(
    module: FIDInceptionV3 | None = None) -> list[tuple[str, tuple[int, ...]]]:
  """The reference's state-dict entries that the port reads.

  Args:
    module: the port (default FIDInceptionV3()).

  Returns:
    [(torch name, torch shape)], conv weights OIHW; without the classifier
    (`fc.*`) and BatchNorm's `num_batches_tracked`, which FID does not use.
  """
  module = module or FIDInceptionV3()
  return [(name, _torch_shape(shape))
          for _, name, shape in _flax_to_torch(module)]


def variables_from_state_dict(
    state_dict: dict[str, np.ndarray],
    module: FIDInceptionV3 | None = None) -> dict[str, Any]:
  """Converts the reference's state dict into the port's variables.

  Args:
    state_dict: {torch name: array}, e.g. from
      `torch_state_dict.read_state_dict`; conv weights OIHW.
    module: the port (default FIDInceptionV3()).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 arrays, conv kernels HWIO.

  Raises:
    InceptionInputError: entries missing, unexpected or of the wrong shape (the
      message lists them).
  """
  module = module or FIDInceptionV3()
  leaves = _flax_to_torch(module)
  expected = {name for _, name, _ in leaves}
  missing = [name for name in sorted(expected) if name not in state_dict]
  unexpected = [
      name for name in state_dict
      if name not in expected and name not in _IGNORED_KEYS
      and not name.endswith('.num_batches_tracked')]
  if missing or unexpected:
    raise InceptionInputError(
        f'The state dict is not FID Inception\'s: {len(missing)} entries '
        f'missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. '
        f'{unexpected[:3]}). Fix: use pytorch-fid\'s {FID_WEIGHTS_FILE} '
        f'({FID_WEIGHTS_URL}), not torchvision\'s Inception weights.')
  variables = {}
  for keys, name, shape in leaves:
    value = np.asarray(state_dict[name], np.float32)
    if value.shape != _torch_shape(shape):
      raise InceptionInputError(
          f'{name} has shape {value.shape}, expected '
          f'{_torch_shape(shape)}. Fix: use pytorch-fid\'s '
          f'{FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL}).')
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jnp.asarray(value)
  return variables


def load_fid_inception(
    path: str | os.PathLike[str],
    precision: PrecisionLike = jax.lax.Precision.HIGHEST,
) -> tuple[FIDInceptionV3, dict[str, Any]]:
  """Builds FID's Inception-v3 with pytorch-fid's weights file.

  Args:
    path: pt_inception-2015-12-05-6726825d.pth (config.eval.inception_weights).
    precision: convolution precision (see FIDInceptionV3).

  Returns:
    (module, variables): `module.apply(variables, images)` gives [b, 2048]
    pool3 features of images in [-1, 1].

  Raises:
    InceptionWeightsNotFoundError: no file at `path`; the message says where
      to get it.
    InceptionInputError: the file is not that state dict.
    torch_state_dict.StateDictError: the file is not a torch.save file.
  """
  path = os.fspath(path) if path else ''
  if not path or not os.path.isfile(path):
    raise InceptionWeightsNotFoundError(
        f'FID Inception weights file not found: {path!r}. Standard FID needs '
        f'{FID_WEIGHTS_FILE}, published at {FID_WEIGHTS_URL}; '
        'config.eval.inception_weights names its path. Fix: download it on a '
        'machine with internet and pass --config.eval.inception_weights='
        f'/path/to/{FID_WEIGHTS_FILE}.')
  module = FIDInceptionV3(precision=precision)
  state_dict = torch_state_dict.read_state_dict(path)
  return module, variables_from_state_dict(state_dict, module)

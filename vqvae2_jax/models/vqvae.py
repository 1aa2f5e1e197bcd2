"""The hierarchical VQ-VAE of VQ-VAE-2 (Razavi et al. 2019), for any number of levels.

Levels are indexed top (coarsest) = 0. `downsample_factors` lists, top first,
image side / latent side for each level: (8, 4) turns 32x32 images into a 4x4
top and an 8x8 bottom map, 256x256 into 32x32 and 64x64; (32, 16, 8) turns
1024x1024 into 32, 64 and 128.

Data flow (L levels):

  encode, bottom-up: h_{L-1} = Enc_{L-1}(image)        stride f_{L-1}
                     h_i     = Enc_i(h_{i+1})           stride f_i / f_{i+1}
  quantize, top-down: q_0 = VQ_0(Conv1x1(h_0))
                      c_1 = CondDec_0(q_0)              up to level 1's size
                      q_i = VQ_i(Conv1x1([h_i, c_i]))
                      c_{i+1} = CondDec_i([q_i, c_i])   (all levels above)
  decode:            image = Dec([Up_0(q_0), ..., Up_{L-2}(q_{L-2}), q_{L-1}])

where Up_i upsamples a level's map to the finest latent size. So each level
is quantized knowing what the levels above already encode, and the decoder
sees every level.

Every 2x upsampling is a 4x4 stride-2 transposed conv (as in VQ-VAE),
computed as four 2x2 phase convs (`Upsample2x`): XLA:CPU's own transposed
conv has a pathologically slow weight gradient.

The output image is unconstrained (no tanh): with a tanh, the many pixels at
exactly -1 (backgrounds) would need unbounded pre-activations and the MSE
gradient vanishes there; a linear output fits [-1, 1] data directly. Clip to
[-1, 1] for display.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae2_jax.models import quantizer as quantizer_lib

Array = jax.Array
Dtype = Any


def _tied_phases(base_init: nn.initializers.Initializer
                 ) -> nn.initializers.Initializer:
  """Init of a [2, 2, in, 2, 2, out] kernel: the four phases share one filter.

  With the phases' half-pixel offsets, a shared filter is a conv followed by
  a smooth (bilinear-like) upsampling: no checkerboard pattern at init.
  """

  def init(key, shape, dtype=jnp.float32):
    ky, kx, fan_in, py, px, fan_out = shape
    kernel = base_init(key, (ky, kx, fan_in, fan_out), dtype)
    return jnp.broadcast_to(kernel[:, :, :, None, None, :], shape)

  return init


class Upsample2x(nn.Module):
  """2x upsampling: a 4x4 stride-2 transposed conv, computed as 4 phase convs.

  Output pixel (2i + a, 2j + b) only sees the 2x2 inputs around it, through
  its own quarter of the 4x4 kernel; so the transposed conv is four 2x2
  convs (one per phase (a, b), padded so that phase 0 looks at rows i-1, i
  and phase 1 at rows i, i+1) interleaved into the output. Same function and
  FLOPs as `nn.ConvTranspose(features, (4, 4), strides=(2, 2))` with PyTorch
  padding 1; on XLA:CPU its weight gradient is over 10x faster than the
  transposed conv's, and it is 2-3x faster than a 3x3 conv to 4x channels
  followed by depth-to-space.

  Attributes:
    features: output channels.
    dtype: computation dtype (params stay float32).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, h, w, c] -> [b, 2h, 2w, features]."""
    # kernel[u, v, :, a, b, :]: tap (u, v) of the 2x2 filter of phase (a, b);
    # it is tap (3 - 2u - a, 3 - 2v - b) of the equivalent 4x4 kernel.
    kernel = self.param(
        'kernel', _tied_phases(nn.initializers.lecun_normal()),
        (2, 2, x.shape[-1], 2, 2, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    rows = []
    for a in (0, 1):
      cols = [jax.lax.conv_general_dilated(
          x, kernel[:, :, :, a, b], window_strides=(1, 1),
          padding=((1 - a, a), (1 - b, b)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) for b in (0, 1)]
      rows.append(jnp.stack(cols, axis=3))  # [n, h, w, 2 (b), c]
    y = jnp.stack(rows, axis=2)  # [n, h, 2 (a), w, 2 (b), c]
    n, h, _, w, _, c = y.shape
    return y.reshape(n, 2 * h, 2 * w, c) + bias.astype(self.dtype)


class ResidualStack(nn.Module):
  """Residual blocks x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), then a ReLU.

  Attributes:
    num_hiddens: channels of the input and output.
    num_residual_layers: blocks.
    num_residual_hiddens: bottleneck channels of each block.
    dtype: computation dtype.
  """
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, h, w, num_hiddens] -> same shape."""
    for i in range(self.num_residual_layers):
      h = nn.relu(x)
      h = nn.Conv(self.num_residual_hiddens, (3, 3), dtype=self.dtype,
                  name=f'res{i}_conv3x3')(h)
      h = nn.relu(h)
      h = nn.Conv(self.num_hiddens, (1, 1), dtype=self.dtype,
                  name=f'res{i}_conv1x1')(h)
      x = x + h
    return nn.relu(x)


def _stack(remat: bool) -> type[ResidualStack]:
  """`ResidualStack`, or its `nn.remat` version when `remat`.

  The same parameters and outputs, but the activations are recomputed in
  the backward pass instead of being kept (less memory for about one more
  forward pass of the stack).
  """
  return nn.remat(ResidualStack) if remat else ResidualStack


class Encoder(nn.Module):
  """Strided 4x4 convs (each halves the side), a 3x3 conv, a residual stack.

  Attributes:
    num_downsamples: stride-2 convs; the side shrinks by 2**num_downsamples.
    num_hiddens: output channels (strided convs but the last of several use
      half).
    num_residual_layers, num_residual_hiddens: the residual stack.
    dtype: computation dtype.
    remat: recompute the residual stack in the backward pass (`_stack`).
  """
  num_downsamples: int
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, h, w, c] -> [b, h / 2**n, w / 2**n, num_hiddens]."""
    for i in range(self.num_downsamples):
      # Half width while downsampling; full width from the last strided conv
      # of a multi-step stack (a single step leaves widening to the 3x3).
      full = i == self.num_downsamples - 1 and i > 0
      x = nn.Conv(self.num_hiddens if full else self.num_hiddens // 2, (4, 4),
                  strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name=f'down{i}')(x)
      x = nn.relu(x)
    x = nn.Conv(self.num_hiddens, (3, 3), dtype=self.dtype, name='conv')(x)
    return _stack(self.remat)(self.num_hiddens, self.num_residual_layers,
                              self.num_residual_hiddens, self.dtype,
                              name='residual')(x)


class Decoder(nn.Module):
  """A 3x3 conv, a residual stack, then 2x upsamplings (ReLU between).

  Attributes:
    out_channels: channels of the output.
    num_upsamples: 2x upsamplings (>= 1).
    num_hiddens: channels of the stack (upsamplings before the last use half).
    num_residual_layers, num_residual_hiddens: the residual stack.
    dtype: computation dtype.
    remat: recompute the residual stack in the backward pass (`_stack`).
  """
  out_channels: int
  num_upsamples: int
  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, h, w, c] -> [b, h * 2**n, w * 2**n, out_channels]."""
    x = nn.Conv(self.num_hiddens, (3, 3), dtype=self.dtype, name='conv')(x)
    x = _stack(self.remat)(self.num_hiddens, self.num_residual_layers,
                           self.num_residual_hiddens, self.dtype,
                           name='residual')(x)
    for i in range(self.num_upsamples):
      last = i == self.num_upsamples - 1
      x = Upsample2x(self.out_channels if last else self.num_hiddens // 2,
                     self.dtype, name=f'up{i}')(x)
      if not last:
        x = nn.relu(x)
    return x


class LatentUpsample(nn.Module):
  """Upsamples a quantized map by 2**num_upsamples for the final decoder.

  Attributes:
    features: output channels.
    num_upsamples: 2x upsamplings, ReLU between them.
    dtype: computation dtype.
  """
  features: int
  num_upsamples: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, h, w, c] -> [b, h * 2**n, w * 2**n, features]."""
    for i in range(self.num_upsamples):
      if i:
        x = nn.relu(x)
      x = Upsample2x(self.features, self.dtype, name=f'up{i}')(x)
    return x


def _log2(n: int) -> int:
  return int(round(math.log2(n)))


def is_power_of_two(n: int) -> bool:
  """Whether `n` is an int 1, 2, 4, 8, ... (a downsampling factor's form)."""
  return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def latent_shapes(downsample_factors: Sequence[int], height: int, width: int
                  ) -> list[tuple[int, int]]:
  """[(h, w)] of each level's code map, top first, for [h, w] images."""
  return [(height // f, width // f) for f in downsample_factors]


def check_downsample_factors(factors: Sequence[int]) -> None:
  """Raises ValueError unless `factors` are powers of two >= 2, top first."""
  factors = tuple(factors)
  if not factors:
    raise ValueError('downsample_factors is empty: give one factor per level, '
                     'top (coarsest) first, e.g. (8, 4).')
  for i, f in enumerate(factors):
    if not is_power_of_two(f) or f < 2:
      raise ValueError(f'downsample_factors[{i}] = {f!r}: each factor must be '
                       'a power of two >= 2 (one stride-2 conv per 2x).')
  for i in range(len(factors) - 1):
    if factors[i] <= factors[i + 1]:
      raise ValueError(
          f'downsample_factors = {factors}: list the levels top (coarsest, '
          'largest factor) first, each factor larger than the next, e.g. '
          '(8, 4) or (32, 16, 8).')


class VQVAE(nn.Module):
  """Hierarchical VQ-VAE with one codebook per level (see the module docstring).

  Attributes:
    downsample_factors: image side / latent side per level, top first.
    channels: image channels (1 or 3).
    num_hiddens: channels of encoders and decoders.
    num_residual_layers: residual blocks per stack.
    num_residual_hiddens: bottleneck channels of a residual block.
    embedding_dim: D, size of the code vectors.
    num_embeddings: K, codes per level.
    quantizer: 'ema' (VectorQuantizerEMA) or 'vq' (VectorQuantizer).
    commitment_cost: beta.
    ema_decay: decay of the EMA codebook statistics.
    ema_epsilon: Laplace smoothing of the EMA cluster sizes.
    dead_code_window: train calls a code may go unused before it is restarted
      from an encoder output; 0 disables.
    kmeans_init: initialise each codebook by k-means on the first train batch.
    l2_normalize_codes: search codes on the unit sphere (cosine similarity;
      see `quantizer_lib._Quantizer`); usually with a small embedding_dim.
    quantizer_gradient: 'straight_through' or 'rotation' (the rotation
      trick, `quantizer_lib.rotation_trick`).
    level_dropout: probability, per training image, that the decoder sees
      only the levels above a random cut (those below replaced by their mean
      code, as in `decode_levels`): the upper levels must then rebuild the
      image on their own, so they learn its coarse shape instead of leaving
      everything to the finest level. 0 disables.
    dtype: computation dtype of the convolutions (e.g. jnp.bfloat16); params
      and the quantizers (search, codebooks, losses) stay float32.
    remat: recompute every encoder's and decoder's residual stack in the
      backward pass (`nn.remat`); same parameters, outputs and gradients.
  """
  downsample_factors: Sequence[int]
  channels: int = 3
  num_hiddens: int = 128
  num_residual_layers: int = 2
  num_residual_hiddens: int = 64
  embedding_dim: int = 64
  num_embeddings: int = 512
  quantizer: str = 'ema'
  commitment_cost: float = 0.25
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  dead_code_window: int = 0
  kmeans_init: bool = False
  l2_normalize_codes: bool = False
  quantizer_gradient: str = 'straight_through'
  level_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    factors = tuple(self.downsample_factors)
    check_downsample_factors(factors)
    num_levels = len(factors)
    finest = num_levels - 1
    # 2x steps between a level and the one below it (image for the finest).
    steps = [_log2(factors[i] // factors[i + 1]) for i in range(finest)]
    steps.append(_log2(factors[finest]))
    stack = dict(num_hiddens=self.num_hiddens,
                 num_residual_layers=self.num_residual_layers,
                 num_residual_hiddens=self.num_residual_hiddens,
                 dtype=self.dtype, remat=self.remat)
    self.encoders = [Encoder(num_downsamples=s, **stack) for s in steps]
    self.pre_quantizers = [
        nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype)
        for _ in range(num_levels)]
    self.quantizers = [
        quantizer_lib.make_quantizer(
            self.quantizer, num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            commitment_cost=self.commitment_cost,
            dead_code_window=self.dead_code_window,
            kmeans_init=self.kmeans_init, decay=self.ema_decay,
            epsilon=self.ema_epsilon, l2_normalize=self.l2_normalize_codes,
            gradient=self.quantizer_gradient)
        for _ in range(num_levels)]
    self.cond_decoders = [
        Decoder(out_channels=self.embedding_dim, num_upsamples=steps[i],
                **stack) for i in range(finest)]
    self.latent_upsamplers = [
        LatentUpsample(self.embedding_dim,
                       _log2(factors[i] // factors[finest]), self.dtype)
        for i in range(finest)]
    self.decoder = Decoder(out_channels=self.channels,
                           num_upsamples=steps[finest], **stack)

  @property
  def num_levels(self) -> int:
    return len(self.downsample_factors)

  def latent_shapes(self, image_shape: Sequence[int]) -> list[tuple[int, int]]:
    """[(h, w)] of each level's code map, top first, for [.., H, W, C] images."""
    return latent_shapes(self.downsample_factors, image_shape[-3],
                         image_shape[-2])

  def _check_images(self, images: Array) -> None:
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(
          f'VQVAE expects images [batch, height, width, {self.channels}], '
          f'got shape {images.shape}.')
    top = max(self.downsample_factors)
    h, w = images.shape[1:3]
    if h % top or w % top:
      raise ValueError(
          f'Image size {h}x{w} is not divisible by the largest downsampling '
          f'factor {top} of downsample_factors={tuple(self.downsample_factors)}'
          f'. Resize or pad the images to a multiple of {top} (e.g. '
          f'{-(-h // top) * top}x{-(-w // top) * top}), or use smaller factors.')

  def _quantize(self, images: Array, train: bool
                ) -> tuple[list[Array], list[dict[str, Array]]]:
    """Encodes bottom-up and quantizes top-down; quantized maps top first."""
    self._check_images(images)
    features = [None] * self.num_levels
    h = images.astype(self.dtype)
    for i in reversed(range(self.num_levels)):
      h = self.encoders[i](h)
      features[i] = h
    quantized, outputs, cond = [], [], None
    for i in range(self.num_levels):
      z = features[i]
      if cond is not None:
        z = jnp.concatenate([z, cond.astype(self.dtype)], axis=-1)
      out = self.quantizers[i](self.pre_quantizers[i](z), train=train)
      quantized.append(out['quantized'])
      outputs.append(out)
      if i < self.num_levels - 1:
        # What the levels so far encode, at the next level's resolution.
        h = out['quantized'].astype(self.dtype)
        if cond is not None:
          h = jnp.concatenate([h, cond.astype(self.dtype)], axis=-1)
        cond = self.cond_decoders[i](h)
    return quantized, outputs

  def _decode(self, quantized: Sequence[Array]) -> Array:
    """Quantized maps (top first, [b, h_i, w_i, D]) -> images float32."""
    maps = [self.latent_upsamplers[i](q.astype(self.dtype))
            for i, q in enumerate(quantized[:-1])]
    maps.append(quantized[-1].astype(self.dtype))
    return self.decoder(jnp.concatenate(maps, axis=-1)).astype(jnp.float32)

  def __call__(self, images: Array, *, train: bool
               ) -> tuple[Array, dict[str, Any]]:
    """Reconstructs images through the quantized hierarchy.

    Args:
      images: [batch, H, W, channels] float32 in [-1, 1]; H and W divisible by
        every downsampling factor.
      train: update the codebook statistics (pass `mutable=['vq_stats']` and
        an RNG stream 'vq' when restarts or k-means init are on).

    Returns:
      recon: [batch, H, W, channels] float32, unconstrained.
      aux: 'loss' (scalar, sum of the levels' quantizer losses) and per-level
        lists, top first: 'codes' ([batch, H/f_i, W/f_i] int32),
        'perplexity', 'used_fraction', 'commitment_loss', 'codebook_loss',
        'restarted'.
    """
    quantized, outputs = self._quantize(images, train)
    if train and self.level_dropout > 0 and not self.is_initializing():
      quantized = self._drop_levels(quantized)
    recon = self._decode(quantized)
    aux = {'loss': sum(out['loss'] for out in outputs)}
    for name in ('codes', 'perplexity', 'used_fraction', 'commitment_loss',
                 'codebook_loss', 'restarted'):
      aux[name] = [out[name] for out in outputs]
    return recon, aux

  def _drop_levels(self, quantized: Sequence[Array]) -> list[Array]:
    """Replaces, for a `level_dropout` share of the images, every level
    below a uniformly drawn cut (1 .. L-1) by its mean code (no gradient)."""
    batch = quantized[0].shape[0]
    drop_key, cut_key = jax.random.split(self.make_rng(quantizer_lib.RNG))
    dropped = jax.random.bernoulli(drop_key, self.level_dropout, (batch,))
    cut = jax.random.randint(cut_key, (batch,), 1, self.num_levels)
    out = list(quantized[:1])
    for i in range(1, self.num_levels):
      mean = jax.lax.stop_gradient(self.quantizers[i].mean_embedding())
      drop = (dropped & (i >= cut))[:, None, None, None]
      out.append(jnp.where(drop, mean.astype(quantized[i].dtype),
                           quantized[i]))
    return out

  def encode(self, images: Array) -> list[Array]:
    """Images [b, H, W, c] -> code maps [b, H/f_i, W/f_i] int32, top first."""
    _, outputs = self._quantize(images, train=False)
    return [out['codes'] for out in outputs]

  def _check_codes(self, codes: Sequence[Array]) -> None:
    if len(codes) != self.num_levels:
      raise ValueError(f'Expected {self.num_levels} code maps (top first), '
                       f'got {len(codes)}.')
    for i in range(1, self.num_levels):
      ratio = self.downsample_factors[i - 1] // self.downsample_factors[i]
      if (codes[i].shape[0] != codes[0].shape[0]
          or tuple(codes[i].shape[1:3])
          != (codes[i - 1].shape[1] * ratio, codes[i - 1].shape[2] * ratio)):
        raise ValueError(
            f'Code map shapes {[tuple(c.shape) for c in codes]} do not match '
            f'downsample_factors={tuple(self.downsample_factors)}: level {i} '
            f'must be {ratio}x the side of level {i - 1}.')

  def decode_codes(self, codes: Sequence[Array]) -> Array:
    """Code maps (top first, [b, h_i, w_i] int32) -> images [b, H, W, c]."""
    self._check_codes(codes)
    return self._decode([q.lookup(c) for q, c in zip(self.quantizers, codes)])

  def decode_levels(self, codes: Sequence[Array], keep: Sequence[int]
                    ) -> Array:
    """Decodes with only the levels in `keep`: what those levels hold.

    The dropped levels' maps are filled with their codebook's usage-weighted
    mean code (for the EMA quantizer, the mean encoder output), not zeros:
    zeros are far from anything the decoder saw in training, while the mean
    code is the decoder's best guess when that level says nothing.

    Args:
      codes: code maps, top first, [b, h_i, w_i] int32.
      keep: indices of the levels to keep (0 = top).

    Returns:
      [b, H, W, channels] float32 images.
    """
    self._check_codes(codes)
    keep = tuple(keep)
    for i in keep:
      if not 0 <= i < self.num_levels:
        raise ValueError(f'keep={keep}: level {i} is not in '
                         f'[0, {self.num_levels}).')
    quantized = []
    for i, (q, c) in enumerate(zip(self.quantizers, codes)):
      if i in keep:
        quantized.append(q.lookup(c))
      else:
        quantized.append(jnp.broadcast_to(
            q.mean_embedding(), (*c.shape, self.embedding_dim)))
    return self._decode(quantized)

r"""Seconds per sampled code map: cached sampler vs. reference sampler.

  python -m experiments.bench_sampling
  python -m experiments.bench_sampling --rows=top32 --batch_sizes=1
  python -m experiments.bench_sampling --rows= \
    --paper_rows=top32,lower64,image,pixel --paper_batch_sizes=1,16

Rows (reduced ImageNet-256 priors that fit a 2-core CPU; the paper's are
512 channels x 20 blocks):

* top32: the 32x32 top prior: K=512, 1000 classes, 128 channels, 10 gated
  blocks, filter 5, 4 causal attention blocks of 8 heads among them.
* lower64: the 64x64 lower prior: K=512, 1000 classes, 64 channels, 6 gated
  blocks, filter 5, a 4-block conditioning stack over the 32x32 top codes.
* top32_transformer (not run by default): a causal transformer prior over
  the same 32x32 map with top32's parameter count (8.07M against 7.99M:
  320 wide, 6 blocks of 8 heads, MLP ratio 4), for the two prior families
  per parameter (`models/transformer.py`).

Both samplers run jitted and are compiled ahead of the timed call
(`sampling.compile_sampler`; compile time is reported apart). The cached
sampler is timed on calls sampling whole maps. The reference sampler reruns
the full prior at every position, so each of its steps costs the same; it is
timed on the first --reference_positions positions and scaled to the whole
map (h * w positions). Each time is the fastest of --repeats calls. Weights
are random (timing does not depend on them); float32 on one CPU device.

Paper-size rows (--paper_rows), the ImageNet-256 config's own models:

* top32: its 32x32 top prior (242.6M parameters: 512 channels, 20 gated
  blocks, 4 attention blocks of 8 heads).
* lower64: its 64x64 lower prior with the 20-block conditioning stack over
  the top codes.
* image: one whole 256x256 image: top32 + lower64 + decoding both maps with
  the config's VQ-VAE.
* pixel: a pixel-space gated PixelCNN of the same width and depth (512
  channels, 20 gated blocks, class-conditional, 256 intensities per
  sub-pixel, no attention, which only favours it), one position per
  sub-pixel in raster order (a row of 256 pixels is 768 positions), scaled
  to the 256x256x3 positions of an image; its ratio to `image` is the
  latent-space speed-up of sampling.

A whole paper-size map takes minutes on this CPU, so the cached sampler is
timed on maps of the first --scan_rows rows (the same layers, caches and
scan; the lower prior's conditioning codes cropped to match, and the
attention key/value caches hold scan_rows * w positions instead of h * w,
an attention read of 4 MB instead of 1 GB of weights per position) and the
time scaled by h / scan_rows; the row cost is constant, which the table lets
you check by running two --scan_rows values. Beside them: the PyTorch
reference (rosinality/vq-vae-2-pytorch), from --peer_json, the JSON of its
timing run (its 85M-parameter top prior, 90M-parameter bottom prior;
extrapolated there from measured step times; see docs/reference.md). Without
--peer_json the table has no reference columns.
"""

import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import imagenet256
from experiments import compiled_steps
from vqvae2_jax import builders
from vqvae2_jax import sampling
from vqvae2_jax.models import pixelcnn
from vqvae2_jax.models import transformer

_ROWS = flags.DEFINE_list('rows', ['top32', 'lower64'], 'Rows to measure.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'],
                                 'Batch sizes to measure.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'Timed calls of each sampler; the fastest counts.')
_REFERENCE_POSITIONS = flags.DEFINE_integer(
    'reference_positions', 3, 'Positions the reference sampler is timed on.')
_PAPER_ROWS = flags.DEFINE_list(
    'paper_rows', [], 'Paper-size rows to measure: top32, lower64, image, '
    'pixel (see the module docstring); they take minutes each.')
_PAPER_BATCH_SIZES = flags.DEFINE_list(
    'paper_batch_sizes', ['1', '16'], 'Batch sizes of the paper-size rows.')
_SCAN_ROWS = flags.DEFINE_integer(
    'scan_rows', 2, 'Rows of each paper-size map the cached sampler is timed '
    'on (even: the lower map has twice the top map\'s rows).')
_PIXEL_ROWS = flags.DEFINE_integer(
    'pixel_rows', 1, 'Image rows (768 positions each) the pixel-space prior '
    'is timed on.')
_PEER_JSON = flags.DEFINE_string(
    'peer_json', '',
    'The PyTorch reference\'s recorded sampling figures (the JSON of its '
    'timing run, see docs/reference.md); empty: no reference columns.')

ROWS = {
    'top32': dict(
        shape=(32, 32), upper=(),
        prior=dict(num_embeddings=512, num_channels=128, num_layers=10,
                   filter_size=5, dropout_rate=0.1, attention_layers=4,
                   num_heads=8, num_classes=1000, cond_num_embeddings=(),
                   cond_stack_blocks=0, num_output_layers=1)),
    'lower64': dict(
        shape=(64, 64), upper=((32, 32),),
        prior=dict(num_embeddings=512, num_channels=64, num_layers=6,
                   filter_size=5, dropout_rate=0.1, attention_layers=0,
                   num_heads=8, num_classes=1000, cond_num_embeddings=(512,),
                   cond_stack_blocks=4, num_output_layers=1)),
    'top32_transformer': dict(
        shape=(32, 32), upper=(), kind='transformer',
        prior=dict(num_embeddings=512, num_channels=320, num_layers=6,
                   map_shape=(32, 32), num_heads=8, mlp_ratio=4,
                   dropout_rate=0.1, num_classes=1000)),
}


def _timed(fn, repeats: int = 1) -> float:
  """The fastest of `repeats` calls, in seconds (shared cores add noise)."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure(name: str, batch: int, reference_positions: int
            ) -> dict[str, Any]:
  """Seconds per map of both samplers for one row and batch size."""
  row = ROWS[name]
  prior_class = (transformer.TransformerPrior
                 if row.get('kind') == 'transformer' else pixelcnn.PixelCNNPrior)
  model = prior_class(**row['prior'])
  shape = (batch, *row['shape'])
  rng = np.random.default_rng(0)
  cond = tuple(jnp.asarray(rng.integers(0, 512, (batch, *s)), jnp.int32)
               for s in row['upper'])
  labels = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, *row['shape']), jnp.int32),
      cond_codes=tuple(c[:1] for c in cond), labels=labels[:1],
      train=False))(jax.random.key(0))
  params = sum(x.size for x in jax.tree.leaves(variables))
  kwargs = dict(shape=shape, cond_codes=cond, labels=labels,
                rng=jax.random.key(1))

  compile_kwargs = dict(shape=shape, cond_codes=cond, labels=labels)
  compile_cached = _timed(lambda: sampling.compile_sampler(
      model, variables, **compile_kwargs))
  repeats = _REPEATS.value
  cached_s = _timed(lambda: sampling.sample_level(model, variables, **kwargs),
                    repeats)

  compile_reference = _timed(lambda: sampling.compile_sampler(
      model, variables, **compile_kwargs, reference=True))
  n = min(reference_positions, shape[1] * shape[2])
  step_s = _timed(lambda: sampling.reference_sample_level(
      model, variables, **kwargs, num_positions=n), repeats) / n
  reference_s = step_s * shape[1] * shape[2]
  return dict(row=name, batch=batch, params=params, cached_s=cached_s / batch,
              reference_s=reference_s / batch, ratio=reference_s / cached_s,
              reference_step_s=step_s, compile_s=compile_cached,
              reference_compile_s=compile_reference)


# The pixel-space prior: the paper's prior width and depth over intensities.
PIXEL_PRIOR = dict(num_embeddings=256, num_channels=512, num_layers=20,
                   filter_size=5, dropout_rate=0.1, attention_layers=0,
                   num_heads=8, num_classes=1000, cond_num_embeddings=(),
                   cond_stack_blocks=0, num_output_layers=1)
PIXEL_IMAGE = (256, 256, 3)


def _cpu_timed(fn) -> tuple[float, float]:
  """(wall, process CPU) seconds of one call (CPU summed over threads)."""
  start, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - start, time.process_time() - cpu


def time_scan(model: pixelcnn.PixelCNNPrior, variables: Any, batch: int,
              rows: int, width: int, upper: tuple[tuple[int, int], ...],
              num_classes: int) -> dict[str, float]:
  """Compiles, then times, one cached-sampler call on a map.

  The map is [batch, rows, width], conditioned on random codes of the
  shapes `upper` and on labels when num_classes.
  """
  rng = np.random.default_rng(1)
  cond = tuple(jnp.asarray(rng.integers(0, 512, (batch, *s)), jnp.int32)
               for s in upper)
  labels = (jnp.asarray(rng.integers(0, num_classes, (batch,)), jnp.int32)
            if num_classes else None)
  shape = (batch, rows, width)
  compile_s, _ = _cpu_timed(lambda: sampling.compile_sampler(
      model, variables, shape=shape, cond_codes=cond, labels=labels))
  wall, cpu = _cpu_timed(lambda: sampling.sample_level(
      model, variables, shape=shape, cond_codes=cond, labels=labels,
      rng=jax.random.key(2)))
  return {'wall': wall, 'cpu': cpu, 'compile': compile_s}


def peer_figures(path: str) -> dict[str, float]:
  """The reference's seconds per map / image at batch 1 and its sizes."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    snail = json.load(f)['pixelsnail']
  extrapolated = snail['extrapolated']
  return {
      'top32': extrapolated['top_32x32_b1']['total_s'],
      'lower64': extrapolated['bottom_64x64_b1']['total_s'],
      'image': extrapolated[
          'image_256_b1_top_plus_bottom_plus_decode']['total_s'],
      'top32_params': snail['top_32x32_params'],
      'lower64_params': snail['bottom_64x64_params'],
      # Its two priors (its VQ-VAE's 1.4M parameters aside).
      'image_params': (snail['top_32x32_params']
                       + snail['bottom_64x64_params']),
  }


def measure_paper(batch: int, scan_rows: int, pixel_rows: int,
                  names: list[str]) -> dict[str, dict[str, Any]]:
  """Seconds per map (per image for 'image' and 'pixel') of the paper rows.

  Returns:
    {row: {'params', 'wall', 'cpu', 'compile', 'timed'}} with wall and cpu
    seconds per map (scaled to the whole map) for each row in `names`.
  """
  if scan_rows < 2 or scan_rows % 2:
    raise ValueError(f'--scan_rows={scan_rows}. Fix: use an even number >= 2 '
                     '(the lower map has twice the top map\'s rows).')
  config = imagenet256.get_config()
  num_classes = config.data.num_classes
  shapes = builders.level_shapes(config)
  wanted = set(names)
  if 'image' in wanted:
    wanted |= {'top32', 'lower64', 'decode'}
  out = {}
  for level, name in enumerate(('top32', 'lower64')):
    if name not in wanted:
      continue
    model = builders.build_prior(config, level)
    (h, w) = shapes[level]
    # The upper maps cropped to the rows that condition the timed rows.
    upper = tuple((scan_rows * hj // h, wj) for hj, wj in shapes[:level])
    variables = compiled_steps.random_variables(
        model, jnp.zeros((1, scan_rows, w), jnp.int32),
        cond_codes=tuple(jnp.zeros((1, *s), jnp.int32) for s in upper),
        labels=jnp.zeros((1,), jnp.int32), train=False)
    t = time_scan(model, variables, batch, scan_rows, w, upper, num_classes)
    scale = h / scan_rows / batch
    out[name] = {'params': sum(x.size for x in jax.tree.leaves(variables)),
                 'wall': t['wall'] * scale, 'cpu': t['cpu'] * scale,
                 'compile': t['compile'], 'timed': f'{scan_rows}/{h} rows'}
    del variables
  if 'decode' in wanted:
    vqvae = builders.build_vqvae(config)
    variables = compiled_steps.random_variables(vqvae, builders.vqvae_init_inputs(config),
                                 train=False)
    rng = np.random.default_rng(3)
    codes = [jnp.asarray(rng.integers(0, 512, (batch, *s)), jnp.int32)
             for s in shapes]
    decode = jax.jit(lambda v, c: vqvae.apply(v, c,
                                              method=vqvae.decode_codes))
    compile_s, _ = _cpu_timed(lambda: decode.lower(variables, codes).compile())
    decode(variables, codes)
    wall, cpu = _cpu_timed(lambda: decode(variables, codes))
    out['decode'] = {
        'params': sum(x.size for x in jax.tree.leaves(variables['params'])),
        'wall': wall / batch, 'cpu': cpu / batch, 'compile': compile_s,
        'timed': 'whole'}
  if 'image' in wanted:
    parts = [out[k] for k in ('top32', 'lower64', 'decode')]
    out['image'] = {'params': sum(p['params'] for p in parts),
                    'wall': sum(p['wall'] for p in parts),
                    'cpu': sum(p['cpu'] for p in parts),
                    'compile': sum(p['compile'] for p in parts),
                    'timed': 'sum of the 3'}
  if 'pixel' in wanted:
    model = pixelcnn.PixelCNNPrior(**PIXEL_PRIOR)
    height, width, channels = PIXEL_IMAGE
    positions_per_row = width * channels
    variables = compiled_steps.random_variables(
        model, jnp.zeros((1, pixel_rows, positions_per_row), jnp.int32),
        labels=jnp.zeros((1,), jnp.int32), train=False)
    t = time_scan(model, variables, batch, pixel_rows, positions_per_row, (),
                  PIXEL_PRIOR['num_classes'])
    scale = height / pixel_rows / batch
    out['pixel'] = {'params': sum(x.size for x in jax.tree.leaves(variables)),
                    'wall': t['wall'] * scale, 'cpu': t['cpu'] * scale,
                    'compile': t['compile'],
                    'timed': f'{pixel_rows}/{height} rows'}
  return {k: v for k, v in out.items() if k in names or k == 'decode'}


def print_paper(scan_rows: int, pixel_rows: int) -> None:
  """The paper-size table, one block per batch size."""
  names = list(_PAPER_ROWS.value)
  unknown = set(names) - {'top32', 'lower64', 'image', 'pixel'}
  if unknown:
    raise ValueError(f'Unknown paper rows {sorted(unknown)}; choose from '
                     'top32, lower64, image, pixel.')
  peer = peer_figures(_PEER_JSON.value)
  print()
  print('Paper-size models (ImageNet-256 config), cached sampler, float32, '
        'one CPU device, random weights. s/map: wall seconds per map or '
        'image (batch time / batch), scaled from the timed rows; cpu s: '
        'process CPU seconds (both cores) per map; peer: the PyTorch '
        'reference at batch 1 on this machine'
        + (f' ({_PEER_JSON.value})' if peer else ' (no --peer_json)') + '.')
  header = (f'{"row":8} {"params":>12} {"batch":>5} {"timed":>13} '
            f'{"s/map":>9} {"cpu s/map":>10} {"compile s":>9} '
            f'{"peer s/map":>10} {"peer params":>12} {"peer/ours":>9}')
  print(header)
  print('-' * len(header))
  for batch in (int(b) for b in _PAPER_BATCH_SIZES.value):
    r = measure_paper(batch, scan_rows, pixel_rows, names)
    for name in ('top32', 'lower64', 'decode', 'image', 'pixel'):
      if name not in r:
        continue
      x = r[name]
      peer_s = peer.get(name)
      peer_cols = (f'{peer_s:>10.0f} '
                   f'{peer.get(name + "_params", float("nan")):>12,.0f} '
                   f'{peer_s / x["wall"]:>8.0f}x' if peer_s else '')
      print(f'{name:8} {x["params"]:>12,} {batch:>5} {x["timed"]:>13} '
            f'{x["wall"]:>9.2f} {x["cpu"]:>10.2f} {x["compile"]:>9.1f} '
            f'{peer_cols}', flush=True)
    if 'pixel' in r and 'image' in r:
      latent = sum(h * w for h, w in builders.level_shapes(
          imagenet256.get_config()))
      print(f'pixel space / latent space (batch {batch}): '
            f'{r["pixel"]["wall"] / r["image"]["wall"]:.1f}x '
            f'({math.prod(PIXEL_IMAGE):,} sub-pixel positions vs. '
            f'{latent:,} latent positions + decoding)', flush=True)


def main(argv):
  del argv
  if _PEER_JSON.value and not os.path.isfile(_PEER_JSON.value):
    raise app.UsageError(
        f'--peer_json={_PEER_JSON.value!r} is not a file. Fix: pass the JSON '
        "that the reference's timing run wrote (docs/reference.md), or leave "
        '--peer_json empty for a table without reference columns.')
  reference_positions = _REFERENCE_POSITIONS.value
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at '
        'start (other processes share these cores)')
  if _ROWS.value:
    print(f'Reference sampler timed on the first {reference_positions} '
          'positions of each map and scaled to h*w positions (every step '
          'reruns the whole prior, so each costs the same). Each time is the '
          f'fastest of {_REPEATS.value} calls.')
    header = (f'{"row":8} {"batch":>5} {"params":>9} {"cached s/map":>13} '
              f'{"reference s/map":>16} {"ratio":>8} {"ref s/step":>11} '
              f'{"compile s":>10} {"ref compile s":>14}')
    print(header)
    print('-' * len(header))
    for name in _ROWS.value:
      if name not in ROWS:
        raise ValueError(f'Unknown row {name!r}; choose from {sorted(ROWS)}.')
      for batch in _BATCH_SIZES.value:
        r = measure(name, int(batch), reference_positions)
        print(f'{r["row"]:8} {r["batch"]:>5} {r["params"]:>9,} '
              f'{r["cached_s"]:>13.3f} {r["reference_s"]:>16.1f} '
              f'{r["ratio"]:>7.0f}x {r["reference_step_s"]:>11.3f} '
              f'{r["compile_s"]:>10.1f} {r["reference_compile_s"]:>14.1f}',
              flush=True)
    print('s/map: seconds per sampled map (batch time / batch); ratio: '
          'reference / cached; ref s/step: one reference position for the '
          'whole batch; compile s: of the cached / reference sampler.')
  if _PAPER_ROWS.value:
    print_paper(_SCAN_ROWS.value, _PIXEL_ROWS.value)
  print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
  app.run(main)

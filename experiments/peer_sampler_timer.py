r"""Times the PyTorch reference's PixelSNAIL sampling loop; run with its Python.

  python3 experiments/peer_sampler_timer.py --peer_code=.peer/vq-vae-2-pytorch \
    --json=peer_sampler.json --full_top

(on CPU add `--device=cpu`; `--small --steps=1 --batches=1` is a smoke test
that runs in seconds). It imports rosinality/vq-vae-2-pytorch's own
`pixelsnail.py` and `sample.py` from the checkout (nothing of them is copied
here; while `sample.py` is imported, `torchvision` and `tqdm` are stood in for
in sys.modules: `save_image` is never called, and `tqdm` passes its iterable
through so that no progress bar is drawn inside a timed loop).

The two priors are those `train_pixelsnail.py` builds with its argparse
defaults (channel 256, n_res_block 4, n_res_channel 256, dropout 0.1,
n_out_res_block 0, n_cond_res_block 3; kernel 5 and 4 blocks are written into
its constructor calls), which `sample.py`'s `load_model` rebuilds:

  top:    PixelSNAIL([32, 32], 512, 256, 5, 4, 4, 256, attention=True,
                     dropout=0.1, n_out_res_block=0)
  bottom: PixelSNAIL([64, 64], 512, 256, 5, 4, 4, 256, attention=False,
                     dropout=0.1, n_cond_res_block=3, cond_res_channel=256)

in eval mode, float32, random weights, on --device, under `torch.no_grad()`
(`sample_model` is decorated with it), with torch's default TF32 settings.

What is timed is one position step of `sample.py`'s `sample_model`: a call of
the whole network on the prefix `row[:, :i + 1, :]` (all columns of rows
0..i) with the cache it passes, a softmax over the logits at (i, j) divided by
the temperature, a multinomial draw, and the write of the drawn code into
`row`. The network is not run on the whole map each step: the prefix grows
with the row, so a step costs more the lower its row (convolutions grow with
the rows, attention with their square), and is the same for every column of
a row. So --steps steps (after --warmup steps; the device is synchronized
before each clock reading) are timed at several prefix heights per level, and
a full map is extrapolated as width x (sum over rows 1..h of the step time,
linearly interpolated between the measured heights). For the bottom prior the
condition is a map of random top codes, as `sample.py` passes
`condition=top_sample`; its first step (empty cache: the conditioning stack
runs once and is cached) is timed apart and added once. With --full_top one
whole top map at batch 1 is also drawn by `sample_model` itself, a check of
the extrapolation.

Prints one JSON line (and writes it to --json): device, torch version, each
prior's parameters, step seconds by prefix height and batch, extrapolated
seconds per map, and per image (top + bottom map; the VQ-VAE decode is not
included). Needs only torch and numpy: no JAX, no code of this project.
"""

import argparse
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import torch

_N_CLASS = 512  # sample.py and train_pixelsnail.py: a 512-code VQ-VAE.
_TEMPERATURE = 1.0  # sample.py --temp default.
# (name, map [h, w], PixelSNAIL keyword arguments, level it is conditioned
# on). The defaults of train_pixelsnail.py, as the module docstring says.
_LEVELS = (
    ('top', (32, 32), dict(channel=256, kernel_size=5, n_block=4,
                           n_res_block=4, res_channel=256, attention=True,
                           dropout=0.1, n_out_res_block=0), None),
    ('bottom', (64, 64), dict(channel=256, kernel_size=5, n_block=4,
                              n_res_block=4, res_channel=256, attention=False,
                              dropout=0.1, n_cond_res_block=3,
                              cond_res_channel=256), 'top'),
)
# --small: our choice, the same structure at a size a CPU samples in seconds.
_SMALL_LEVELS = (
    ('top', (8, 8), dict(channel=64, kernel_size=5, n_block=2, n_res_block=2,
                         res_channel=64, attention=True, dropout=0.1,
                         n_out_res_block=0), None),
    ('bottom', (16, 16), dict(channel=64, kernel_size=5, n_block=2,
                              n_res_block=2, res_channel=64, attention=False,
                              dropout=0.1, n_cond_res_block=1,
                              cond_res_channel=64), 'top'),
)
_PIXELS_PER_BOTTOM_CODE = 4  # The reference VQ-VAE's bottom stride.


def _stand_in(name: str, **attributes) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
  for key, value in attributes.items():
    setattr(module, key, value)
  return module


def _save_image(*unused_args, **unused_kwargs):
  raise RuntimeError('torchvision is stood in for by peer_sampler_timer.py')


def import_reference(peer_code: str):
  """The reference's `pixelsnail` module and `sample.py`'s `sample_model`."""
  sys.path.insert(0, peer_code)  # sample.py imports vqvae, pixelsnail, ...
  pixelsnail = importlib.import_module('pixelsnail')
  utils = _stand_in('torchvision.utils', save_image=_save_image)
  stand_ins = {'torchvision': _stand_in('torchvision', utils=utils),
               'torchvision.utils': utils,
               'tqdm': _stand_in('tqdm', tqdm=lambda iterable, **_: iterable)}
  saved = {name: sys.modules.get(name) for name in stand_ins}
  sys.modules.update(stand_ins)
  try:
    # A private name: the checkout also has a `sample/` folder.
    spec = importlib.util.spec_from_file_location(
        'peer_sample', os.path.join(peer_code, 'sample.py'))
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  return pixelsnail, sample.sample_model


def _sync(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def _prefix_heights(height: int, count: int) -> list[int]:
  """`count` prefix heights from 1 to `height`, evenly spaced."""
  return sorted({1, height} | {max(1, round(height * k / (count - 1)))
                               for k in range(1, count - 1)})


def time_steps(model, row, condition, cache, i, steps, warmup, device):
  """Mean seconds of `sample_model`'s position step on rows 0..i, columns
  cycling; `cache` is passed and taken back as it does."""
  width = row.shape[2]

  def step(j):
    nonlocal cache
    out, cache = model(row[:, :i + 1, :], condition=condition, cache=cache)
    prob = torch.softmax(out[:, :, i, j] / _TEMPERATURE, 1)
    row[:, i, j] = torch.multinomial(prob, 1).squeeze(-1)

  for j in range(warmup):
    step(j % width)
  _sync(device)
  start = time.perf_counter()
  for j in range(steps):
    step(j % width)
  _sync(device)
  return (time.perf_counter() - start) / steps


def time_first_step(model, row, condition, steps, warmup, device):
  """Mean seconds of the first step of a conditioned sample: empty cache."""
  for _ in range(warmup):
    model(row[:, :1, :], condition=condition, cache={})
  _sync(device)
  start = time.perf_counter()
  for _ in range(steps):
    out, _ = model(row[:, :1, :], condition=condition, cache={})
    prob = torch.softmax(out[:, :, 0, 0] / _TEMPERATURE, 1)
    row[:, 0, 0] = torch.multinomial(prob, 1).squeeze(-1)
  _sync(device)
  return (time.perf_counter() - start) / steps


def time_level(model, shape, condition_shape, batch, args, device):
  """Step seconds by prefix height and the extrapolated seconds of a map."""
  height, width = shape
  generator = torch.Generator().manual_seed(batch)
  row = torch.randint(0, _N_CLASS, (batch, height, width),
                      generator=generator).to(device)
  condition, first_extra_s, first_s = None, 0.0, None
  if condition_shape is not None:
    condition = torch.randint(0, _N_CLASS, (batch, *condition_shape),
                              generator=generator).to(device)
  cache = {}
  step_s = {}
  for h in _prefix_heights(height, args.heights):
    if condition is not None and not cache:  # As after sample_model's step 0.
      _, cache = model(row[:, :1, :], condition=condition, cache=cache)
    step_s[h] = time_steps(model, row, condition, cache, h - 1, args.steps,
                           args.warmup, device)
  if condition is not None:
    first_s = time_first_step(model, row, condition, args.steps, args.warmup,
                              device)
    first_extra_s = max(0.0, first_s - step_s[1])
  measured = sorted(step_s)
  per_row = np.interp(np.arange(1, height + 1), measured,
                      [step_s[h] for h in measured])
  map_s = float(width * per_row.sum() + first_extra_s)
  return {
      'positions': height * width,
      'step_s': {str(h): s for h, s in step_s.items()},
      'first_step_s': first_s,
      'map_s': map_s,
      'mean_step_s': map_s / (height * width),
      # What a map would cost if every step cost as much as a last-row step.
      'map_s_if_every_step_full': step_s[height] * height * width,
  }


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _commit(peer_code: str) -> str | None:
  with contextlib.suppress(OSError, subprocess.CalledProcessError):
    return subprocess.run(['git', '-C', peer_code, 'rev-parse', 'HEAD'],
                          capture_output=True, text=True,
                          check=True).stdout.strip()
  return None


def _device_name(device: torch.device) -> str:
  if device.type == 'cuda':
    return torch.cuda.get_device_name(device)
  with contextlib.suppress(OSError):
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  return platform.processor() or device.type


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peer_code', default=os.environ.get('PEER_DIR'),
                      help='checkout of rosinality/vq-vae-2-pytorch')
  parser.add_argument('--device',
                      default='cuda' if torch.cuda.is_available() else 'cpu')
  parser.add_argument('--batches', default='1,16',
                      help='comma-separated batch sizes')
  parser.add_argument('--steps', type=int, default=16,
                      help='timed position steps per prefix height')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps before them')
  parser.add_argument('--heights', type=int, default=5,
                      help='prefix heights measured per level, 1 to h')
  parser.add_argument('--small', action='store_true',
                      help='8x8 / 16x16 priors of 64 channels (smoke test)')
  parser.add_argument('--full_top', action='store_true',
                      help="also draw one top map at batch 1 by sample_model")
  parser.add_argument('--threads', type=int, default=None,
                      help="torch's CPU threads (default: torch's own)")
  parser.add_argument('--json', default=None, help='also write the JSON here')
  args = parser.parse_args()
  if args.heights < 2:
    parser.error('--heights must be at least 2 (the first and last rows)')
  peer_code = args.peer_code or ''
  if not all(os.path.isfile(os.path.join(peer_code, name))
             for name in ('pixelsnail.py', 'sample.py')):
    sys.exit(f'--peer_code={args.peer_code!r} has no pixelsnail.py and '
             'sample.py: it must be a checkout of rosinality/vq-vae-2-pytorch')
  if args.threads:
    torch.set_num_threads(args.threads)
  # Its nn.utils.weight_norm is deprecated in recent torch; still what it runs.
  warnings.filterwarnings('ignore', message='.*weight_norm.*')
  pixelsnail, sample_model = import_reference(peer_code)
  device = torch.device(args.device)
  batches = [int(b) for b in args.batches.split(',')]
  levels = _SMALL_LEVELS if args.small else _LEVELS
  shapes = {name: shape for name, shape, _, _ in levels}

  result = {
      'reference': 'rosinality/vq-vae-2-pytorch',
      'commit': _commit(peer_code),
      'sha256': {name: _sha256(os.path.join(peer_code, name))
                 for name in ('pixelsnail.py', 'sample.py')},
      'device': device.type, 'device_name': _device_name(device),
      'torch': torch.__version__, 'cuda': torch.version.cuda,
      'tf32': {'matmul': torch.backends.cuda.matmul.allow_tf32,
               'cudnn': torch.backends.cudnn.allow_tf32},
      'threads': torch.get_num_threads(), 'dtype': 'float32',
      'small': args.small, 'steps': args.steps, 'warmup': args.warmup,
      'temperature': _TEMPERATURE, 'levels': {},
  }
  models = {}
  with torch.no_grad():
    for name, shape, kwargs, condition_level in levels:
      torch.manual_seed(0)
      model = pixelsnail.PixelSNAIL(list(shape), _N_CLASS, **kwargs)
      model = model.to(device).eval()
      models[name] = model
      level = {'shape': list(shape), 'kwargs': kwargs,
               'condition': condition_level,
               'params': sum(p.numel() for p in model.parameters()),
               'batches': {}}
      for batch in batches:
        timed = time_level(model, shape, shapes.get(condition_level), batch,
                           args, device)
        level['batches'][str(batch)] = timed
        print(f'{name} batch {batch}: step {timed["step_s"]["1"]:.4f} s on '
              f'row 1, {timed["step_s"][str(shape[0])]:.4f} s on row '
              f'{shape[0]}; map {timed["map_s"]:.1f} s (extrapolated)',
              file=sys.stderr, flush=True)
      result['levels'][name] = level

    side = _PIXELS_PER_BOTTOM_CODE * levels[-1][1][1]
    result['image'] = {'side': side, 'batches': {}}
    for batch in batches:
      total = sum(level['batches'][str(batch)]['map_s']
                  for level in result['levels'].values())
      result['image']['batches'][str(batch)] = {
          'map_s': total, 'per_image_s': total / batch}

    if args.full_top:
      name, shape = levels[0][0], list(levels[0][1])
      _sync(device)
      start = time.perf_counter()
      sample_model(models[name], device, 1, shape, _TEMPERATURE)
      _sync(device)
      seconds = time.perf_counter() - start
      predicted = result['levels'][name]['batches'].get('1', {}).get('map_s')
      result['full_top'] = {
          'batch': 1, 'shape': shape, 'seconds': seconds,
          'extrapolated_s': predicted,
          'ratio': predicted / seconds if predicted else None}

  line = json.dumps(result)
  print(line)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(line + '\n')


if __name__ == '__main__':
  main()

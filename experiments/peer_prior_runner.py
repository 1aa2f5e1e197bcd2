r"""Trains, times and samples the PyTorch reference's PixelSNAIL priors on
exported codes; run with its Python (experiments/peer_prior.py starts it).

  $PEER_PYTHON experiments/peer_prior_runner.py --peer_code=$PEER_DIR \
    --mode=train --level=top --codes=OUT/codes --seconds=300 \
    --eval_at=30,60,120,300 --save=OUT/reference_top.pt

Imports rosinality/vq-vae-2-pytorch's own `pixelsnail.py` (and, to sample,
`sample.py`'s `sample_model`, through experiments/peer_sampler_timer.py's
`import_reference`) from the checkout; nothing of them is copied here.

The models are those `train_pixelsnail.py` builds, with its sizes as flags
(its defaults: --channel=256 --n_block=4 --n_res_block=4 --res_channel=256,
kernel 5, dropout 0.1, n_out_res_block 0, n_cond_res_block 3):

  top:    PixelSNAIL([h, w], 512, channel, kernel, n_block, n_res_block,
                     res_channel, dropout=dropout, n_out_res_block=0)
  bottom: PixelSNAIL([h, w], 512, channel, kernel, n_block, n_res_block,
                     res_channel, attention=False, dropout=dropout,
                     n_cond_res_block=n_cond_res_block,
                     cond_res_channel=res_channel)

What of its recipe `--mode=train` keeps (train_pixelsnail.py's `train` and
its argparse defaults): Adam at lr 3e-4 (no schedule: --sched is unset by
default), batch 32, `nn.CrossEntropyLoss()` on the logits, `model(top)` for
the top and `model(bottom, condition=top)` for the bottom, shuffled batches
with the last incomplete batch dropped (its DataLoader's shuffle=True,
drop_last=True), float32, train mode (dropout on). What differs: the codes
come from .npy files (`--codes`: {train,eval}_{top,bottom}.npy as
experiments/peer_prior.py exports them) instead of its LMDB, in this process
(no DataLoader workers); training stops after --seconds of train steps
instead of 420 epochs; and held-out bits per code are measured at the
--eval_at marks (eval mode, no dropout; cross-entropy over all held-out codes
/ ln 2; not counted in the training seconds), which it never does. The
codebook size is --n_class (the exported codes' K; train_pixelsnail.py
writes 512, the size of its VQ-VAE's codebook), and torch runs --threads
threads (2 by default, as experiments/peer_speed.py's timer).

Modes: 'params' (parameter counts of both levels), 'train' (one level, JSON
lines: one per evaluation, then a summary), 'speed' (train steps of one
level on one fixed batch for at least --seconds: codes/s), 'sample' (times
`sample_model` per map at --sample_batch for each level from --weights, or random
weights, and with --num draws that many samples, top then bottom conditioned
on it, to --samples_out). Each prints its result as one JSON line last.

Needs only torch and numpy: no JAX, no code of this project but the sampling
timer's importer.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

import peer_sampler_timer  # Beside this file: sys.path[0] when run.

_LEVELS = ('top', 'bottom')


def build(pixelsnail, level: str, shape, args) -> nn.Module:
  """The level's PixelSNAIL as train_pixelsnail.py builds it."""
  if level == 'top':
    return pixelsnail.PixelSNAIL(
        list(shape), args.n_class, args.channel, args.kernel_size, args.n_block,
        args.n_res_block, args.res_channel, dropout=args.dropout,
        n_out_res_block=args.n_out_res_block)
  return pixelsnail.PixelSNAIL(
      list(shape), args.n_class, args.channel, args.kernel_size, args.n_block,
      args.n_res_block, args.res_channel, attention=False,
      dropout=args.dropout, n_cond_res_block=args.n_cond_res_block,
      cond_res_channel=args.res_channel)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_codes(codes_dir: str, split: str) -> dict[str, torch.Tensor]:
  return {level: torch.from_numpy(np.load(os.path.join(
      codes_dir, f'{split}_{level}.npy')).astype(np.int64))
          for level in _LEVELS}


def forward(model, level, codes, index):
  """Logits [n, 512, h, w] and the target codes of examples `index`."""
  target = codes[level][index]
  if level == 'top':
    out, _ = model(target)
  else:
    out, _ = model(target, condition=codes['top'][index])
  return out, target


@torch.no_grad()
def held_out_bits(model, level, codes, batch=256) -> float:
  """Mean bits per code over every held-out example, in eval mode."""
  model.eval()
  total, count = 0.0, 0
  n = len(codes[level])
  for start in range(0, n, batch):
    out, target = forward(model, level, codes, torch.arange(
        start, min(n, start + batch)))
    total += float(nn.functional.cross_entropy(out, target, reduction='sum'))
    count += target.numel()
  model.train()
  return total / count / math.log(2.0)


def train(pixelsnail, args) -> dict:
  """train_pixelsnail.py's loop for --seconds, evaluated at --eval_at."""
  codes = load_codes(args.codes, 'train')
  held_out = load_codes(args.codes, 'eval')
  if args.eval_examples:
    held_out = {k: v[:args.eval_examples] for k, v in held_out.items()}
  shape = tuple(codes[args.level].shape[1:])
  torch.manual_seed(args.seed)
  model = build(pixelsnail, args.level, shape, args)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
  criterion = nn.CrossEntropyLoss()
  marks = sorted(float(s) for s in args.eval_at.split(',')) if (
      args.eval_at) else []
  marks = [m for m in marks if m < args.seconds] + [args.seconds]
  rng = np.random.default_rng(args.seed)
  n = len(codes[args.level])
  order, position = rng.permutation(n), 0
  step, train_s, curve = 0, 0.0, []
  evaluate_first = held_out_bits(model, args.level, held_out)
  curve.append({'step': 0, 'train_s': 0.0, 'bits': evaluate_first})
  print(json.dumps(curve[-1]), flush=True)
  last_loss = float('nan')
  for mark in marks:
    start = time.perf_counter()
    while train_s + time.perf_counter() - start < mark:
      if position + args.batch > n:  # drop_last, then a new epoch.
        order, position = rng.permutation(n), 0
      index = torch.from_numpy(order[position:position + args.batch])
      position += args.batch
      model.zero_grad()
      out, target = forward(model, args.level, codes, index)
      loss = criterion(out, target)
      loss.backward()
      optimizer.step()
      step += 1
      last_loss = loss.item()
    train_s += time.perf_counter() - start
    row = {'step': step, 'train_s': train_s,
           'bits': held_out_bits(model, args.level, held_out),
           'train_bits_last_batch': last_loss / math.log(2.0)}
    curve.append(row)
    print(json.dumps(row), flush=True)
  if args.save:
    torch.save(model.state_dict(), args.save)
  return {'level': args.level, 'params': num_params(model), 'steps': step,
          'train_s': train_s, 'curve': curve,
          'codes_per_s': step * args.batch * math.prod(shape) / train_s}


def speed(pixelsnail, args) -> dict:
  """Train steps on one fixed batch of random codes: codes/s."""
  top_shape, bottom_shape = _shapes(args)
  shape = top_shape if args.level == 'top' else bottom_shape
  torch.manual_seed(args.seed)
  model = build(pixelsnail, args.level, shape, args)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
  criterion = nn.CrossEntropyLoss()
  generator = torch.Generator().manual_seed(args.seed)
  codes = {'top': torch.randint(0, args.n_class, (args.batch, *top_shape),
                                generator=generator),
           'bottom': torch.randint(0, args.n_class,
                                   (args.batch, *bottom_shape),
                                   generator=generator)}
  index = torch.arange(args.batch)

  def step():
    model.zero_grad()
    out, target = forward(model, args.level, codes, index)
    criterion(out, target).backward()
    optimizer.step()

  for _ in range(3):
    step()
  steps, start = 0, time.perf_counter()
  while steps < 2 or time.perf_counter() - start < args.seconds:
    step()
    steps += 1
  seconds = time.perf_counter() - start
  return {'level': args.level, 'params': num_params(model), 'steps': steps,
          'seconds': seconds,
          'codes_per_s': steps * args.batch * math.prod(shape) / seconds}


def sample(pixelsnail, sample_model, args) -> dict:
  """`sample_model` per map at --batch; with --num, samples to a file."""
  top_shape, bottom_shape = _shapes(args)
  shapes = {'top': top_shape, 'bottom': bottom_shape}
  models = {}
  weights = args.weights.split(',') if args.weights else [None, None]
  for level, path in zip(_LEVELS, weights):
    torch.manual_seed(args.seed)
    models[level] = build(pixelsnail, level, shapes[level], args)
    if path:
      models[level].load_state_dict(torch.load(path))
    models[level].eval()
  device = torch.device('cpu')
  torch.manual_seed(args.seed)
  batch = args.sample_batch
  result = {'batch': batch, 'map_s': {}}
  with torch.no_grad():
    top = None
    for level in _LEVELS if args.repeats else ():
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        drawn = sample_model(models[level], device, batch,
                             list(shapes[level]), args.temperature,
                             condition=top if level == 'bottom' else None)
        times.append(time.perf_counter() - start)
      result['map_s'][level] = {'median': float(np.median(times)),
                                'best': min(times), 'runs': times}
      top = drawn if level == 'top' else top
    if args.num:
      out = {level: [] for level in _LEVELS}
      for start in range(0, args.num, batch):
        n = min(batch, args.num - start)
        top = sample_model(models['top'], device, n, list(top_shape),
                           args.temperature)
        bottom = sample_model(models['bottom'], device, n,
                              list(bottom_shape), args.temperature,
                              condition=top)
        out['top'].append(top.numpy())
        out['bottom'].append(bottom.numpy())
      np.savez(args.samples_out,
               **{level: np.concatenate(v).astype(np.int32)
                  for level, v in out.items()})
      result['samples_out'] = args.samples_out
      result['num'] = args.num
  return result


def _shapes(args):
  top = tuple(int(x) for x in args.top_shape.split('x'))
  bottom = tuple(int(x) for x in args.bottom_shape.split('x'))
  return top, bottom


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peer_code', default=os.environ.get('PEER_DIR'),
                      help='checkout of rosinality/vq-vae-2-pytorch')
  parser.add_argument('--mode', required=True,
                      choices=('params', 'train', 'speed', 'sample'))
  parser.add_argument('--level', choices=_LEVELS, default='top')
  parser.add_argument('--codes', help='folder of exported .npy codes')
  parser.add_argument('--top_shape', default='4x4')
  parser.add_argument('--bottom_shape', default='8x8')
  # train_pixelsnail.py's flags, its defaults (kernel 5 and n_block 4 are
  # written into its constructor calls).
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--n_class', type=int, default=512)
  parser.add_argument('--lr', type=float, default=3e-4)
  parser.add_argument('--channel', type=int, default=256)
  parser.add_argument('--kernel_size', type=int, default=5)
  parser.add_argument('--n_block', type=int, default=4)
  parser.add_argument('--n_res_block', type=int, default=4)
  parser.add_argument('--res_channel', type=int, default=256)
  parser.add_argument('--n_out_res_block', type=int, default=0)
  parser.add_argument('--n_cond_res_block', type=int, default=3)
  parser.add_argument('--dropout', type=float, default=0.1)
  # This runner's own.
  parser.add_argument('--seconds', type=float, default=60.0)
  parser.add_argument('--eval_at', default='',
                      help='comma-separated training seconds to evaluate at')
  parser.add_argument('--eval_examples', type=int, default=0,
                      help='held-out examples scored (0: all)')
  parser.add_argument('--save', default='', help='state_dict path (train)')
  parser.add_argument('--weights', default='',
                      help='top.pt,bottom.pt to sample from (sample)')
  parser.add_argument('--sample_batch', type=int, default=1,
                      help='maps per sample_model call (sample)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num', type=int, default=0)
  parser.add_argument('--samples_out', default='')
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def main():
  args = parse_args()
  if not os.path.isfile(os.path.join(args.peer_code or '', 'pixelsnail.py')):
    sys.exit(f'--peer_code={args.peer_code!r} has no pixelsnail.py: it must '
             'be a checkout of rosinality/vq-vae-2-pytorch')
  torch.set_num_threads(args.threads)
  # Its nn.utils.weight_norm is deprecated in recent torch; still what it runs.
  warnings.filterwarnings('ignore', message='.*weight_norm.*')
  pixelsnail, sample_model = peer_sampler_timer.import_reference(
      args.peer_code)
  if args.mode == 'params':
    top_shape, bottom_shape = _shapes(args)
    result = {level: num_params(build(pixelsnail, level, shape, args))
              for level, shape in zip(_LEVELS, (top_shape, bottom_shape))}
  elif args.mode == 'train':
    result = train(pixelsnail, args)
  elif args.mode == 'speed':
    result = speed(pixelsnail, args)
  else:
    result = sample(pixelsnail, sample_model, args)
  result['threads'] = torch.get_num_threads()
  result['torch'] = torch.__version__
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()

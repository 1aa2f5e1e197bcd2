"""Variants of our prior train step, timed back to back in one process.

  PYTHONPATH=. python experiments/prior_step_variants.py \
      --workdir=workdir/fashion_mnist --level=0 --variants=nnconv,base \
      --rounds=6 --seconds=2
  ... --profile=base --out=/tmp/prior_step   (per-op trace breakdown instead)

The step is issue 30's (experiments/peer_prior.py's 'ours' row: the
workdir's prior recipe widened to the reference's parameter count, 120
channels on the top level, 116 on the bottom one, batch 32, 2 CPU devices).
Each variant (`+` joins several) edits the config or swaps a module while
the step is traced: 'base' is the code as it is; 'nnconv' runs the gated
blocks' convolutions as `nn.Conv` (the code before `pixelcnn.PatchConv`);
'dev1' one CPU device; 'nodrop', 'nopolyak', 'noclip', 'nometrics' drop a
part; the dropout-mask variants draw the masks otherwise. Rounds alternate
the variants; the table gives each one's codes per second (wall and per CPU
second of this process) and its ratio to the first variant. A one-off
measurement tool, kept as it was used (no test).
"""

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from vqvae2_jax import hostmem  # noqa: E402
from vqvae2_jax import parallel  # noqa: E402

hostmem.tune_malloc()
parallel.split_host_cpu(2)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import compiled_steps  # noqa: E402
from experiments import peer_prior  # noqa: E402
from experiments import profile_step  # noqa: E402
from vqvae2_jax import builders  # noqa: E402
from vqvae2_jax.models import pixelcnn  # noqa: E402
from vqvae2_jax.train import step_metrics  # noqa: E402
from vqvae2_jax.train import train_state  # noqa: E402

WORKDIR = 'workdir/fashion_mnist'  # --workdir sets it.
OUT = tempfile.gettempdir()  # --out sets it.
WIDTH = {0: 120, 1: 116}
BATCH = 32


def base_config(level):
  with open(os.path.join(WORKDIR, 'config.json')) as f:
    base = ml_collections.ConfigDict(json.load(f))
  config = peer_prior.row_config(base, 'ours', BATCH)
  return peer_prior.with_width(config, level, WIDTH[level])


# ---- variant pieces -------------------------------------------------------

def _rotl(x, d):
  return lax.shift_left(x, np.uint32(d)) | lax.shift_right_logical(
      x, np.uint32(32 - d))


def threefry2x32_unrolled(k1, k2, x1, x2):
  rot = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1 = x1 + ks[0]
  x2 = x2 + ks[1]
  for i in range(5):
    for r in rot[i % 2]:
      x1 = x1 + x2
      x2 = _rotl(x2, r)
      x2 = x1 ^ x2
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _raw_key(key):
  """uint32[2] key data of a typed or raw threefry key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return key


def _below(bits, keep):
  """`jax.random.uniform`'s float from 32 random bits (23 mantissa bits),
  compared with `keep`."""
  u = lax.bitcast_convert_type(
      lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000),
      jnp.float32) - jnp.float32(1.0)
  return u < jnp.float32(keep)


def keep_mask_unrolled(key, keep, n):
  key = _raw_key(key)
  counts = lax.iota(np.uint32, n)
  b1, b2 = threefry2x32_unrolled(key[0], key[1], jnp.zeros_like(counts),
                                 counts)
  return _below(b1 ^ b2, keep)


def keep_mask_pair(key, keep, n):
  key = _raw_key(key)
  counts = lax.iota(np.uint32, (n + 1) // 2)
  b1, b2 = threefry2x32_unrolled(key[0], key[1], jnp.zeros_like(counts),
                                 counts)
  return _below(jnp.concatenate([b1, b2])[:n], keep)


def keep_mask_rbg(key, keep, n):
  key = _raw_key(key)
  data = jax.random.bits(jax.random.wrap_key_data(key), (4,), jnp.uint32)
  rkey = jax.random.wrap_key_data(data, impl='rbg')
  bits = jax.random.bits(rkey, (n,), jnp.uint32)
  return bits < np.uint32(min(round(keep * 2**32), 2**32 - 1))


def keep_mask_bits16(key, keep, n):
  bits = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  lo = bits & np.uint32(0xFFFF)
  hi = lax.shift_right_logical(bits, np.uint32(16))
  both = jnp.concatenate([lo, hi])[:n]
  return both < np.uint32(round(keep * 65536))


MASKS = {'old': lambda key, keep, n: jax.random.bernoulli(key, keep, (n,)),
         'unrolled': keep_mask_unrolled, 'rbg': keep_mask_rbg,
         'bits16': keep_mask_bits16, 'pair': keep_mask_pair}


def make_dropout(mask_fn):

  class FastDropout(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic):
      if deterministic or self.rate == 0.0:
        return x
      if self.rate >= 1.0:
        return jnp.zeros_like(x)
      keep = mask_fn(self.make_rng('dropout'), 1.0 - self.rate,
                     x.size).reshape(x.shape)
      return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))

  return FastDropout


class PatchConv(nn.Module):
  """nn.Conv's parameters and result, as slices + one dot."""
  features: int
  kernel_size: tuple
  padding: str = 'SAME'
  dtype: object = jnp.float32
  precision: object = None
  kernel_init: object = nn.initializers.lecun_normal()
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, cin, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      jnp.float32)
    if self.padding == 'SAME':
      x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2),
                      ((kw - 1) // 2, kw // 2), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    if kh * kw == 1:
      patches = x
    else:
      patches = jnp.concatenate([x[:, i:i + h, j:j + w]
                                 for i in range(kh) for j in range(kw)], -1)
    y = jnp.dot(patches, kernel.reshape(-1, self.features),
                precision=self.precision)
    return y + bias


@contextlib.contextmanager
def patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


# ---- variants -----------------------------------------------------------

def variant_spec(name):
  """(devices, config edit, list of patch context factories)."""
  global fsdp
  fsdp = False
  devices, edits, patches = 2, [], []
  for part in name.split('+'):
    if part == 'base':
      pass
    elif part == 'dev1':
      devices = 1
    elif part == 'fsdp':
      fsdp = True
    elif part == 'nodrop':
      edits.append(lambda c, l: setattr(c.prior[f'level_{l}'],
                                         'dropout_rate', 0.0))
    elif part == 'nopolyak':
      edits.append(lambda c, l: setattr(c.prior, 'polyak_decay', 0.0))
    elif part == 'noclip':
      edits.append(lambda c, l: setattr(c.prior, 'grad_clip_norm', 0.0))
    elif part == 'nometrics':
      patches.append(lambda: patched(step_metrics, 'norm_metrics',
                                     lambda g, p, u: {}))
    elif part in MASKS:
      patches.append(functools.partial(
          patched, pixelcnn, 'Dropout', make_dropout(MASKS[part])))
    elif part == 'nnconv':
      patches.append(lambda: patched(pixelcnn, 'PatchConv', functools.partial(
          nn.Conv, padding='VALID')))
    elif part == 'patchconv':
      patches.append(lambda: patched(nn, 'Conv', PatchConv))
    else:
      raise ValueError(part)
  return devices, edits, patches, fsdp


class Step:

  def __init__(self, name, level):
    self.name = name
    devices, edits, patches, fsdp = variant_spec(name)
    config = base_config(level)
    for edit in edits:
      edit(config, level)
    self.mesh = parallel.create_mesh(
        ml_collections.ConfigDict({'data': 1, 'fsdp': 2}) if fsdp else None,
        devices=jax.devices()[:devices])
    init_fn, step = compiled_steps.prior_step_functions(config, level)
    shapes = builders.level_shapes(config)
    init, shardings = train_state.sharded_init(init_fn, self.mesh,
                                               jax.random.PRNGKey(0))
    jitted = train_state.jit_train_step(step, shardings, self.mesh)
    self.state = init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    k = int(config.model.num_embeddings)
    self.codes = BATCH * math.prod(shapes[level])
    self.batch = parallel.shard_batch(
        {'codes': [rng.integers(0, k, (BATCH, *shapes[l]), np.int32)
                   for l in range(level + 1)],
         'label': np.zeros((BATCH,), np.int32)}, self.mesh)
    begin = time.perf_counter()
    with contextlib.ExitStack() as stack:
      for factory in patches:
        stack.enter_context(factory())
      lowered = jitted.lower(self.state, self.batch)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - begin
    self.first_metrics = None
    for i in range(3):
      m = self.step()
      if i == 0:
        self.first_metrics = jax.device_get(m)
    jax.block_until_ready(m)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics

  def codes_per_s(self, seconds):
    steps, begin, cpu = 0, time.perf_counter(), time.process_time()
    while steps < 3 or time.perf_counter() - begin < seconds:
      jax.block_until_ready(self.step())
      steps += 1
    self.last_cpu = steps * self.codes / (time.process_time() - cpu)
    return steps * self.codes / (time.perf_counter() - begin)


def time_variants(level, names, rounds, seconds):
  steps = []
  for name in names:
    s = Step(name, level)
    print(f'{name}: compiled in {s.compile_s:.1f} s; first loss '
          f'{float(s.first_metrics["loss"]):.6f} grad_norm '
          f'{float(s.first_metrics.get("grad_norm", float("nan"))):.6f}',
          flush=True)
    steps.append(s)
  results = collections.defaultdict(list)
  cpu = collections.defaultdict(list)
  for r in range(rounds):
    order = steps if r % 2 == 0 else steps[::-1]
    got = {}
    for s in order:
      got[s.name] = s.codes_per_s(seconds)
      cpu[s.name].append(s.last_cpu)
    for name in names:
      results[name].append(got[name])
    print(f'round {r + 1} (load {os.getloadavg()[0]:.1f}): ' + ', '.join(
        f'{n} {got[n]:,.0f} ({got[n] / got[names[0]]:.3f})' for n in names),
          flush=True)
  print(f'\nlevel {level}: codes/s median over {rounds} rounds; ratio = '
        f'median of per-round ratios to {names[0]}')
  for name in names:
    ratios = [a / b for a, b in zip(results[name], results[names[0]])]
    print(f'  {name:<28} {statistics.median(results[name]):>9,.0f}  '
          f'{statistics.median(ratios):.3f}  (rounds '
          + ' '.join(f'{x:.3f}' for x in ratios) + ')')
  print('codes per CPU-second (process time, all threads): median, ratio')
  for name in names:
    ratios = [a / b for a, b in zip(cpu[name], cpu[names[0]])]
    print(f'  {name:<28} {statistics.median(cpu[name]):>9,.0f}  '
          f'{statistics.median(ratios):.3f}  (rounds '
          + ' '.join(f'{x:.3f}' for x in ratios) + ')')


# ---- profile --------------------------------------------------------------

def category(text):
  names = re.findall(r'op_name="([^"]*)"', text)
  if not names:
    return 'no op_name', ''
  name = collections.Counter(names).most_common(1)[0][0]
  bwd = 'transpose(' in name
  low = name.lower()
  if 'threefry' in low or 'random_bits' in low or 'bernoulli' in low or (
      'dropout' in low and 'rng' in low):
    part = 'dropout rng'
  elif 'random' in low or 'fold_in' in low or 'split' in low and 'key' in low:
    part = 'rng other'
  elif 'dropout' in low:
    part = 'dropout apply'
  elif 'cond_stack' in low:
    part = 'cond stack'
  elif 'attention' in low:
    part = 'attention'
  elif re.search(r'blocks_\d+/(\w+)', name):
    part = 'gated ' + re.search(r'blocks_\d+/(\w+)', name).group(1)
  elif 'blocks_' in name:
    part = 'gated other'
  elif 'out_' in name:
    part = 'output stack'
  elif 'embed' in low:
    part = 'embed'
  elif 'PixelCNNPrior' in name:
    part = 'prior other'
  else:
    part = 'outside model'
  return part + (' (bwd)' if bwd else ''), name


def profile(level, name, steps):
  s = Step(name, level)
  text = s.compiled.as_text()
  instructions = profile_step.hlo_instructions(text)
  with open(os.path.join(OUT, f'hlo_{level}_{name}.txt'), 'w') as f:
    f.write(text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    begin = time.perf_counter()
    for _ in range(steps):
      m = s.step()
    jax.block_until_ready(m)
    wall = (time.perf_counter() - begin) / steps
    jax.profiler.stop_trace()
    times = profile_step.op_times(trace_dir)
  by_cat = collections.Counter()
  by_op = []
  unmatched = collections.Counter()
  for op, us in times.items():
    if op not in instructions:
      unmatched[op] += us
      continue
    text = instructions[op]
    cat, opname = category(text)
    by_cat[cat] += us / 1e3 / steps
    by_op.append((us / 1e3 / steps, op, cat, text[:90], opname[-80:]))
  total = sum(by_cat.values())
  print(f'{name} level {level}: wall {wall * 1e3:.1f} ms/step, ops summed '
        f'{total:.1f} ms/step ({jax.device_count()} devices)')
  for cat, ms in by_cat.most_common():
    print(f'  {cat:<32} {ms:8.2f} ms  {ms / total:6.1%}')
  by_op.sort(reverse=True)
  with open(os.path.join(OUT, f'ops_{level}_{name}.json'), 'w') as f:
    json.dump({'wall_ms': wall * 1e3, 'ops': by_op}, f)
  kinds = collections.Counter()
  for ms, op, cat, text, opname in by_op:
    kinds[re.sub(r'[.\d]+$', '', op)] += ms
  print('by op kind:')
  for k, ms in kinds.most_common(25):
    print(f'  {k:<40} {ms:8.2f} ms  {ms / total:6.1%}')
  print('top ops:')
  for ms, op, cat, text, opname in by_op[:40]:
    print(f'  {ms:7.2f} {op:<30} {cat:<24} {text[:60]} | {opname}')
  print('unmatched (runtime events), ms/step:')
  for op, us in unmatched.most_common(8):
    print(f'  {us / 1e3 / steps:8.2f} {op}')


def main():
  global WORKDIR, OUT
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=WORKDIR,
                      help='A finished demo workdir (its config.json).')
  parser.add_argument('--out', default=OUT, help='Where --profile writes.')
  parser.add_argument('--level', type=int, default=0)
  parser.add_argument('--variants', default='base')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=4.0)
  parser.add_argument('--profile', default='')
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  WORKDIR, OUT = args.workdir, args.out
  os.makedirs(OUT, exist_ok=True)
  print(f'jax {jax.__version__}, {jax.device_count()} devices, '
        f'load {os.getloadavg()}', flush=True)
  if args.profile:
    profile(args.level, args.profile, args.steps)
  else:
    time_variants(args.level, args.variants.split(','), args.rounds,
                  args.seconds)


if __name__ == '__main__':
  main()

r"""Where the stage-1 train step spends its time, op by op, on this machine.

  python -m experiments.profile_step                      # the reference's size
  python -m experiments.profile_step --row=fashion_mnist --steps=10

Traces --steps calls of the trainer's own jitted step with `jax.profiler`,
matches every executed op of the trace to its instruction in the compiled
HLO, and prints the time per step of each kind of work (ops that run in
parallel on different cores are summed, so the total exceeds wall time):

* conv forward: convolutions of the forward pass (jvp in their op name);
* conv input gradient: their transposes (transpose(jvp) in the op name);
* conv weight gradient: convolutions whose window spans the whole map
  (XLA writes kernel gradients that way and drops their op name), and the
  dilated ones, which are the gradients of strided convolutions;
* layout copies: transposes XLA inserts, mostly to lay out activations
  for the weight gradients;
* other: everything else (elementwise fusions, the quantizer's distance
  search, the optimizer).

Then the --top most expensive ops with their output shapes (a weight
gradient's is its kernel's, [in, kh, kw, out]). Rows are those of
experiments/bench_vqvae.py.
"""

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import bench_vqvae
from vqvae2_jax import hostmem
from vqvae2_jax import parallel
from vqvae2_jax.train import vqvae_trainer


KINDS = ('conv forward', 'conv input gradient', 'conv weight gradient',
         'layout copies', 'other')


def hlo_instructions(hlo_text: str) -> dict[str, str]:
  """{instruction name: its line, with the body of the computation it
  calls appended} for every instruction of a compiled module's text."""
  bodies, lines, current = {}, {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'%?([\w.\-]+) \(.*\{$', line)
    if header:
      current = header.group(1)
      bodies[current] = []
      continue
    inst = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (.*)', line)
    if inst:
      lines[inst.group(1)] = inst.group(2)
      if current is not None:
        bodies[current].append(inst.group(2))
  out = {}
  for name, text in lines.items():
    called = re.search(r'calls=%?([\w.\-]+)', text)
    body = bodies.get(called.group(1), []) if called else []
    out[name] = ' '.join([text] + body)
  return out


def kind_of(name: str, text: str) -> str:
  """One of KINDS for an executed op (its name and HLO text)."""
  if 'convolution(' in text:
    window = re.search(r'window=\{size=(\d+)x(\d+)', text)
    op_name = re.search(r'op_name="([^"]*)"', text)
    if 'rhs_dilate' in text or 'lhs_dilate' in text:
      return 'conv weight gradient'
    if op_name is None or (window and int(window.group(1)) > 4):
      return 'conv weight gradient'
    if 'transpose(' in op_name.group(1):
      return 'conv input gradient'
    return 'conv forward'
  if name.startswith(('transpose', 'copy')) or 'transpose_copy' in name:
    return 'layout copies'
  return 'other'


def op_times(trace_dir: str) -> dict[str, float]:
  """{op name: microseconds summed} over the newest trace in `trace_dir`."""
  paths = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*',
                                        '*.trace.json.gz')))
  if not paths:
    raise RuntimeError(f'No trace written under {trace_dir}.')
  with gzip.open(paths[-1]) as f:
    events = json.load(f)['traceEvents']
  times = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and 'name' in event:
      times[event['name']] += float(event.get('dur', 0.0))
  return times


def profile(row: str, steps: int) -> dict[str, object]:
  """Traces `steps` train steps of a bench_vqvae row; ms per step by kind."""
  config, batch_size = bench_vqvae._row_config(row)  # pylint: disable=protected-access
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  progs = vqvae_trainer.programs(config, mesh)
  state = progs.init(jax.random.PRNGKey(0))
  size, channels = config.data.image_size, config.data.channels
  images = np.random.default_rng(0).uniform(
      -1, 1, (batch_size, size, size, channels)).astype(np.float32)
  batch = parallel.shard_batch({'image': images}, mesh)
  # The traced steps run this very executable, so op names match its HLO.
  step_fn = progs.train_step.lower(state, batch).compile()
  instructions = hlo_instructions(step_fn.as_text())
  for _ in range(3):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    times = op_times(trace_dir)
  by_kind = dict.fromkeys(KINDS, 0.0)
  ops = []
  for name, us in times.items():
    if name not in instructions:
      continue  # Runtime events (executor, thread pool), not ops.
    kind = kind_of(name, instructions[name])
    by_kind[kind] += us / 1e3 / steps
    shape = re.match(r'(\S+)', instructions[name]).group(1)
    ops.append((us / 1e3 / steps, name, kind, shape))
  ops.sort(reverse=True)
  return dict(row=row, batch=batch_size, wall_ms=wall * 1e3,
              by_kind=by_kind, ops=ops)


def main(argv, flag_values):
  del argv
  row, steps, top = (f.value for f in flag_values)
  hostmem.tune_malloc()  # As --mode=vqvae does.
  result = profile(row, steps)
  total = sum(result['by_kind'].values())
  print(f'{result["row"]}: batch {result["batch"]}, {result["wall_ms"]:.1f} '
        f'ms per step wall ({result["batch"] / result["wall_ms"] * 1e3:.0f} '
        f'img/s), {total:.1f} ms of ops per step ({jax.device_count()} '
        f'device(s), {os.cpu_count()} host cores)')
  print(f'{"kind":<22} {"ms/step":>8} {"share":>6}')
  for kind, ms in result['by_kind'].items():
    print(f'{kind:<22} {ms:>8.1f} {ms / total:>6.1%}')
  print(f'\n{"op":<28} {"kind":<22} {"ms/step":>8}  output')
  for ms, name, kind, shape in result['ops'][:top]:
    print(f'{name:<28} {kind:<22} {ms:>8.2f}  {shape}')


if __name__ == '__main__':
  # Flags are defined only when run as a script, so tests can import this
  # module beside other experiments.
  _flags = (
      flags.DEFINE_string('row', 'peer_protocol',
                          'Row of experiments/bench_vqvae.py to profile.'),
      flags.DEFINE_integer('steps', 5, 'Traced train steps.'),
      flags.DEFINE_integer('top', 12, 'Most expensive ops to list.'))
  app.run(functools.partial(main, flag_values=_flags))

r"""Stage 1 on the PyTorch reference's own Fashion-MNIST protocol, beside it.

  python -m experiments.peer_protocol                      # about 15 minutes
  python -m experiments.peer_protocol --config.model.kmeans_init=True
  python -m experiments.peer_protocol --json=/tmp/peer_protocol.json

The protocol on which rosinality/vq-vae-2-pytorch was measured (its own
training script, on the 2-core CPU of the docs' figures; PEER_ROWS below,
docs/reference.md): Fashion-MNIST 28x28 zero-padded
to 32x32 and mapped to [-1, 1]; the reference's model size (128 hidden
channels, 2 residual blocks of 32, K=512 codes of D=64, a 4x4 top and an 8x8
bottom level); batch 64 for 3000 steps; evaluated after 500, 1000, 2000 and
3000 steps on all 10,000 test images: MSE on the [0, 1] scale over the 28x28
centre (the original image, not the black border), its PSNR, and per level
the fraction of the 512 codes used and the perplexity of the code histogram.

Everything else is this project's own recipe from `--config` (default
configs/fashion_mnist.py: learning-rate schedule, codebook rules, ...), and
the training is the trainer's own jitted step and input pipeline, so a
change that wins here is a change to `--mode=vqvae`. Training seconds count
the train steps and their input (evaluations excluded, as for the
reference); the first step, which compiles, is reported apart.
"""

import functools
import json
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from vqvae2_jax import config_validation
from vqvae2_jax import hostmem
from vqvae2_jax import parallel
from vqvae2_jax.evaluation import reconstruction
from vqvae2_jax.train import vqvae_trainer


def _define_flags():
  """This script's flags (defined only when it runs, so that
  experiments/ablate_stage1.py can import it)."""
  config = config_flags.DEFINE_config_file(
      'config', 'configs/fashion_mnist.py',
      'Recipe to run; the reference protocol overrides its size and budget.')
  evals = flags.DEFINE_list('evals', ['500', '1000', '2000', '3000'],
                            'Steps after which to evaluate; the last is the '
                            'run length.')
  json_path = flags.DEFINE_string('json', None, 'Also write the rows here.')
  return config, evals, json_path

# The reference's figures, recorded by its run of the protocol above on the
# 2-core CPU of the docs' figures (rosinality/vq-vae-2-pytorch at ef5f67c,
# torch 2.13 CPU, 2 threads; docs/reference.md).
PEER_ROWS = (
    dict(step=500, train_s=154.0, mse01_area=0.01879, psnr_area=17.26,
         used_top=0.002, ppl_top=1.0, used_bottom=0.006, ppl_bottom=2.9),
    dict(step=1000, train_s=248.0, mse01_area=0.01660, psnr_area=17.80,
         used_top=0.002, ppl_top=1.0, used_bottom=0.006, ppl_bottom=2.9),
    dict(step=2000, train_s=456.0, mse01_area=0.00710, psnr_area=21.48,
         used_top=0.010, ppl_top=4.1, used_bottom=0.160, ppl_bottom=25.6),
    dict(step=3000, train_s=652.0, mse01_area=0.00555, psnr_area=22.56,
         used_top=0.010, ppl_top=4.5, used_bottom=0.215, ppl_bottom=38.7),
)


def apply_protocol(config: ml_collections.ConfigDict,
                   steps: int = 3000) -> ml_collections.ConfigDict:
  """`config` at the reference's data, model size and budget (a copy)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.name = 'fashion_mnist'
  config.data.image_size = 32
  config.data.channels = 1
  model = config.model
  model.downsample_factors = (8, 4)
  model.num_hiddens = 128
  model.num_residual_layers = 2
  model.num_residual_hiddens = 32
  model.num_embeddings = 512
  train = config.vqvae_train
  train.batch_size = 64
  train.num_train_steps = steps
  return config


def run(config: ml_collections.ConfigDict, eval_steps: Sequence[int],
        log=print) -> list[dict[str, Any]]:
  """Trains stage 1 as `--mode=vqvae` would (no files), evaluating on the way.

  Args:
    config: the full config; trained for max(eval_steps) steps (its
      num_train_steps, which shapes the schedule, should be that).
    eval_steps: steps after which to evaluate on the whole test split.
    log: where progress lines go.

  Returns:
    One row per evaluation: step, train_s (train steps and their input so
    far, without the first step), first_step_s (compilation included),
    mse01_area, psnr_area, psnr (whole 32x32 image), per level (top,
    bottom) used_<level> and ppl_<level>, and psnr_top_only: the whole
    image decoded from the top level alone (the others replaced by their
    mean code, as experiments/level_mse.py does).
  """
  # tf.data only here, where images are read: the scripts that import this
  # module for its step timings (bench_vqvae, peer_speed, profile_step) run
  # where TensorFlow is not installed.
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config_validation.validate_config(config)
  eval_steps = sorted(int(s) for s in eval_steps)
  mesh = parallel.create_mesh(config.mesh)
  progs = vqvae_trainer.programs(config, mesh)
  state = progs.init(jax.random.PRNGKey(config.seed))
  batches = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.vqvae_train.batch_size, mesh=mesh,
      seed=config.seed, start_step=0)
  names = ('top', 'bottom') if len(config.model.downsample_factors) == 2 else [
      f'level{i}' for i in range(len(config.model.downsample_factors))]
  rows, train_s, first_step_s = [], 0.0, 0.0
  start = time.perf_counter()
  for step in range(1, eval_steps[-1] + 1):
    state, metrics = progs.train_step(state, next(batches))
    if step == 1:
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - start
      start = time.perf_counter()
    if step in eval_steps:
      jax.block_until_ready(metrics)
      train_s += time.perf_counter() - start
      result, _ = vqvae_trainer.evaluate(
          progs.eval_sums, None, state.variables(),
          input_pipeline.create_eval_iterator(
              config.data, global_batch_size=config.vqvae_train.eval_batch_size,
              mesh=mesh))
      row = dict(step=step, train_s=train_s, first_step_s=first_step_s,
                 mse01_area=result['mse01_area'],
                 psnr_area=result['psnr_area'], psnr=result['psnr'],
                 psnr_top_only=top_only_psnr(progs.model, state.variables(),
                                             config, mesh))
      for i, name in enumerate(names):
        row[f'used_{name}'] = result[f'used_fraction_level{i}']
        row[f'ppl_{name}'] = result[f'perplexity_level{i}']
      rows.append(row)
      log(format_row('ours', row))
      start = time.perf_counter()
  return rows


def top_only_psnr(model, variables, config: ml_collections.ConfigDict,
                  mesh) -> float:
  """PSNR of the whole eval split decoded from the top level alone."""
  from vqvae2_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  total, count = 0.0, 0
  for batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.vqvae_train.eval_batch_size,
      mesh=mesh):
    mse = np.asarray(_top_only_mse(model, variables, batch['image']))
    mask = np.asarray(batch['mask'])
    total += float(mse[mask].sum())
    count += int(mask.sum())
  return float(reconstruction.psnr(total / count))


@functools.partial(jax.jit, static_argnums=0)
def _top_only_mse(model, variables, images):
  codes = model.apply(variables, images, method=model.encode)
  recon = model.apply(variables, codes, (0,), method=model.decode_levels)
  return reconstruction.per_image_mse(images, recon)


HEADER = (f'{"":<6} {"step":>5} {"train s":>8} {"centre MSE":>10} '
          f'{"PSNR dB":>8} {"top used":>9} {"top ppl":>8} {"bot used":>9} '
          f'{"bot ppl":>8} {"top-only":>8}')


def format_row(who: str, row: dict[str, Any]) -> str:
  return (f'{who:<6} {row["step"]:>5} {row["train_s"]:>8.0f} '
          f'{row["mse01_area"]:>10.5f} {row["psnr_area"]:>8.2f} '
          f'{row["used_top"]:>9.1%} {row["ppl_top"]:>8.1f} '
          f'{row["used_bottom"]:>9.1%} {row["ppl_bottom"]:>8.1f} '
          + (f'{row["psnr_top_only"]:>8.2f}' if 'psnr_top_only' in row
             else f'{"":>8}'))


def main(argv, flag_values):
  del argv
  hostmem.tune_malloc()  # As --mode=vqvae does.
  config_flag, evals_flag, json_flag = flag_values
  eval_steps = sorted(int(s) for s in evals_flag.value)
  config = apply_protocol(config_flag.value, eval_steps[-1])
  parallel.split_host_cpu(config.mesh.cpu_devices)  # As --mode=vqvae does.
  print('Reference protocol: Fashion-MNIST 32x32 (28x28 centre scored), 128 '
        'hidden, 2 residual blocks of 32, K=512, D='
        f'{config.model.embedding_dim}, batch 64, {eval_steps[-1]} steps; '
        f'devices: {jax.device_count()} {jax.default_backend()}')
  print(HEADER)
  rows = run(config, eval_steps)
  print('\nSide by side (centre = 28x28 original area, MSE on [0, 1]; '
        'train s: train steps only, evaluation excluded):')
  print(HEADER)
  for peer in PEER_ROWS:
    print(format_row('peer', peer))
  for row in rows:
    print(format_row('ours', row))
  print(f'ours: first step (compilation) {rows[-1]["first_step_s"]:.0f} s, '
        'not in train s; top-only: PSNR of the whole image decoded from the '
        'top level alone.')
  if json_flag.value:
    with open(json_flag.value, 'w') as f:
      json.dump({'config': config.to_dict(), 'rows': rows,
                 'peer_rows': PEER_ROWS}, f, indent=1, default=str)


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

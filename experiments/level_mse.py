r"""What each level of a trained VQ-VAE holds: held-out MSE per level view.

  python -m experiments.level_mse --config=configs/fashion_mnist.py \
    --workdir=workdir/fashion_mnist --png=levels.png

Encodes the whole held-out split with the newest stage-1 checkpoint in
--workdir and decodes it with every level, with each level alone, and with
none (`VQVAE.decode_levels`: a dropped level is replaced by its codebook's
usage-weighted mean code), and prints MSE and PSNR of each view: over the
whole image (pixels in [-1, 1]) and, for padded MNIST-family images, over
the original 28x28 centre (MSE on [0, 1], the PyTorch ports' protocol). A
level whose removal costs little carries little of the image. `--png`
writes a grid of the first 16 held-out images: the originals, then one row
per view in the order of the table.
"""

import functools
import itertools
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from vqvae2_jax import images as images_lib
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.data import layout
from vqvae2_jax.evaluation import reconstruction

_GRID_IMAGES = 16


def level_views(num_levels: int) -> dict[str, tuple[int, ...]]:
  """{name: levels kept}: all, each alone, none (0 is the top)."""
  views = {'all levels': tuple(range(num_levels))}
  for keep in itertools.chain.from_iterable(
      itertools.combinations(range(num_levels), r)
      for r in range(num_levels - 1, 0, -1)):
    noun = 'level' if len(keep) == 1 else 'levels'
    views[f'{noun} {"+".join(map(str, keep))} only'] = keep
  views['none (mean codes)'] = ()
  return views


def level_table(config: ml_collections.ConfigDict, workdir: str,
                png: str | None = None) -> tuple[int, list[dict[str, Any]]]:
  """Scores every level view of the newest stage-1 checkpoint in `workdir`.

  Args:
    config: the config that trained it.
    workdir: the run's workdir.
    png: where to write the grid of views (None: no picture).

  Returns:
    (step of the checkpoint, one row per view of `level_views`: 'view',
    'keep', 'mse' and 'psnr' over the whole image, and with an original
    area 'mse01_area' and 'psnr_area').
  """
  mesh = parallel.create_mesh(config.mesh)
  model, variables, step = loading.load_vqvae(config, workdir, mesh)
  views = level_views(len(config.model.downsample_factors))
  area = layout.original_area(config.data)
  encode = jax.jit(functools.partial(model.apply, method=model.encode))

  @functools.partial(jax.jit, static_argnums=2)
  def view_errors(variables, codes, keep, images):
    recon = model.apply(variables, codes, keep, method=model.decode_levels)
    errors = [reconstruction.per_image_mse(images, recon)]
    if area is not None:
      errors.append(reconstruction.per_image_area_mse(images, recon, area))
    return errors, recon[:_GRID_IMAGES]

  totals = {name: np.zeros(2) for name in views}
  count, grid = 0, None
  for batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.vqvae_train.eval_batch_size,
      mesh=mesh):
    mask = np.asarray(batch['mask'])
    codes = encode(variables, batch['image'])
    recons = []
    for name, keep in views.items():
      errors, recon = view_errors(variables, codes, keep, batch['image'])
      totals[name][:len(errors)] += [float(np.asarray(e)[mask].sum())
                                     for e in errors]
      recons.append(np.asarray(recon))
    if grid is None:
      grid = [np.asarray(batch['image'][:_GRID_IMAGES])] + recons
    count += int(mask.sum())
  if png:
    images_lib.write_image_grid(png, np.concatenate(grid), _GRID_IMAGES)
  rows = []
  for name, keep in views.items():
    mse = totals[name][0] / count
    row = dict(view=name, keep=list(keep), mse=mse,
               psnr=float(reconstruction.psnr(mse)))
    if area is not None:
      area_mse = totals[name][1] / count
      row['mse01_area'] = area_mse / reconstruction.PEAK_TO_PEAK**2
      row['psnr_area'] = float(reconstruction.psnr(area_mse))
    rows.append(row)
  return step, rows


def main(argv, flag_values):
  del argv
  config_flag, workdir_flag, png_flag = flag_values
  config = config_flag.value
  parallel.split_host_cpu(config.mesh.cpu_devices)  # As --mode=vqvae does.
  step, rows = level_table(config, workdir_flag.value, png_flag.value)
  print(f'VQ-VAE step {step}, held-out split {config.data.eval_split!r} '
        '(level 0 is the top)')
  centre = 'mse01_area' in rows[0]
  print(f'{"decoded from":<22} {"MSE":>8} {"PSNR dB":>8}'
        + (f' {"centre MSE":>10} {"centre dB":>9}' if centre else ''))
  for row in rows:
    print(f'{row["view"]:<22} {row["mse"]:>8.4f} {row["psnr"]:>8.2f}'
          + (f' {row["mse01_area"]:>10.5f} {row["psnr_area"]:>9.2f}'
             if centre else ''))
  if png_flag.value:
    print(f'Wrote {png_flag.value}')


if __name__ == '__main__':
  # Flags are defined only when run as a script, so tests can import
  # `level_table`.
  _flags = (
      config_flags.DEFINE_config_file('config', None, 'Config file.'),
      flags.DEFINE_string('workdir', None, 'Workdir of the run.'),
      flags.DEFINE_string(
          'png', None, 'Also write the first held-out images decoded from '
          'every view here (rows: originals, then the views in table '
          'order).'))
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(functools.partial(main, flag_values=_flags))

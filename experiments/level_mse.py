r"""What each level of a trained VQ-VAE holds: held-out MSE per level view.

  python -m experiments.level_mse --config=configs/fashion_mnist.py \
    --workdir=workdir/fashion_mnist

Encodes the whole held-out split with the newest stage-1 checkpoint in
--workdir and decodes it with every level, with each level alone, and with
none (`VQVAE.decode_levels`: a dropped level is replaced by its codebook's
usage-weighted mean code), and prints MSE and PSNR of each view. A level
whose removal costs little carries little of the image.
"""

import functools
import itertools

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax.data import input_pipeline
from vqvae2_jax.evaluation import reconstruction


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the run.')
flags.mark_flags_as_required(['config', 'workdir'])


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


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = parallel.create_mesh(config.mesh)
  model, variables, step = loading.load_vqvae(config, _WORKDIR.value,
                                                    mesh)
  views = level_views(len(config.model.downsample_factors))
  encode = jax.jit(functools.partial(model.apply, method=model.encode))

  @functools.partial(jax.jit, static_argnums=2)
  def view_mse(variables, codes, keep, images):
    recon = model.apply(variables, codes, keep, method=model.decode_levels)
    return reconstruction.per_image_mse(images, recon)

  totals, count = dict.fromkeys(views, 0.0), 0
  for batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.vqvae_train.eval_batch_size,
      mesh=mesh):
    mask = np.asarray(batch['mask'])
    codes = encode(variables, batch['image'])
    for name, keep in views.items():
      mse = np.asarray(view_mse(variables, codes, keep, batch['image']))
      totals[name] += float(mse[mask].sum())
    count += int(mask.sum())
  print(f'VQ-VAE step {step}, {count} images of {config.data.eval_split!r} '
        '(level 0 is the top)')
  print(f'{"decoded from":<22} {"MSE":>8} {"PSNR dB":>8}')
  for name in views:
    mse = totals[name] / count
    print(f'{name:<22} {mse:>8.4f} {reconstruction.psnr(mse):>8.2f}')


if __name__ == '__main__':
  app.run(main)

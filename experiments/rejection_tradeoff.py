r"""Quality against diversity: rejection sampling, temperature, top-p, guidance.

  python -m experiments.rejection_tradeoff --config=configs/fashion_mnist.py \
    --workdir=workdir/fashion_mnist --out=experiments/figures

Needs a finished workdir with a domain classifier (`--mode=all` with
rejection, or `--mode=classifier`), which scores the candidates. For each
point (rejection keep in {1, 0.5, 0.25, 0.1, 0.05} at temperature 1, then
temperature in {0.9, 0.8, 0.7}, top-p in {0.95, 0.9} and classifier-free
guidance in {1.5, 2, 3} without rejection; empty lists skip a knob, and the
classifier is needed only for keeps below 1)
draws --num_samples class-balanced samples through --mode=sample's own
function (so each point is a sample run under workdir/samples/, reused when
rerun; --samples_workdir puts them elsewhere, for a workdir that is only
read), and scores them against the whole held-out split with the eval's
ruler (config.eval.features: Fashion-MNIST's shipped judge by default, so
the scorer is not its own ruler): FID, precision, recall (k=3), Inception
Score and class agreement. samples/s counts generation of every candidate,
decoding and classifier scoring, per kept sample; a reused run reports the
time of the run that made it.

Writes <out>/rejection_tradeoff.{md,json,png}: the table, every figure, and
two panels (precision against recall with each point labelled; FID against
each knob's value).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vqvae2_jax import files
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished workdir.')
_OUT = flags.DEFINE_string('out', None, 'Where the table and plot go.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 10000,
                                    'Samples per point.')
_KEEPS = flags.DEFINE_list('keeps', ['1.0', '0.5', '0.25', '0.1', '0.05'],
                           'Rejection keep fractions.')
_TEMPERATURES = flags.DEFINE_list('temperatures', ['1.0', '0.9', '0.8', '0.7'],
                                  'Temperatures (keep 1).')
_TOP_PS = flags.DEFINE_list('top_ps', ['1.0', '0.95', '0.9'],
                            'Nucleus masses (keep 1).')
_GUIDANCES = flags.DEFINE_list(
    'guidances', ['1.0', '1.5', '2.0', '3.0'],
    'Classifier-free guidance scales (keep 1; needs label dropout).')
_SAMPLES_WORKDIR = flags.DEFINE_string(
    'samples_workdir', None,
    'Where the sample runs go (default: --workdir): a workdir whose stages '
    'are links to those of --workdir, which is then only read.')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def linked_workdir(workdir: str, samples_workdir: str) -> str:
  """A workdir that reads `workdir`'s finished stages and has its own samples.

  Every entry of `workdir` but samples/ is linked (the loaders only read
  checkpoints), so sample runs are written under `samples_workdir` alone.

  Returns:
    `samples_workdir`.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(samples_workdir, exist_ok=True)
  for name in sorted(os.listdir(workdir)):
    link = os.path.join(samples_workdir, name)
    if name != 'samples' and not os.path.lexists(link):
      os.symlink(os.path.join(workdir, name), link)
  return samples_workdir


def points() -> list[tuple[str, float, dict[str, float]]]:
  """(knob, value, sampling overrides) of every point, the baseline once."""
  base = {'rejection_keep': 1.0, 'temperature': 1.0, 'top_p': 1.0,
          'guidance': 1.0}
  out, seen = [], set()
  for knob, values in (('rejection_keep', _KEEPS.value),
                       ('temperature', _TEMPERATURES.value),
                       ('top_p', _TOP_PS.value),
                       ('guidance', _GUIDANCES.value)):
    for value in map(float, values):
      controls = {**base, knob: value}
      key = tuple(sorted(controls.items()))
      if key in seen:
        continue
      seen.add(key)
      out.append((knob, value, controls))
  return out


def markdown(rows: list[dict[str, float]], num_samples: int,
             real_count: int, ruler: str = 'domain classifier') -> str:
  """The table of every point, measured with `ruler` (a description)."""
  lines = [f'{num_samples} class-balanced samples per point against the '
           f'{real_count} held-out images, measured with the {ruler}.', '',
           '| knob | value | FID | precision | recall | IS | class agreement '
           '| samples/s |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["knob"]} | {r["value"]:g} | {r["fid"]:.3f} | '
        f'{r["precision"]:.3f} | {r["recall"]:.3f} | '
        f'{r["inception_score"]:.2f} | {100 * r["class_agreement"]:.1f}% | '
        f'{r["samples_per_sec"]:.0f} |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict[str, float]], path: str) -> None:
  """Two panels drawn with PIL: precision vs recall; FID vs knob value."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  w, h, margin = 420, 360, 50
  image = Image.new('RGB', (2 * w, h), 'white')
  draw = ImageDraw.Draw(image)
  colours = {'rejection_keep': (200, 30, 30), 'temperature': (30, 90, 200),
             'top_p': (30, 150, 60), 'guidance': (150, 60, 170)}

  def axes(x0, title, xlabel, ylabel, xlim, ylim):
    draw.rectangle([x0 + margin, 30, x0 + w - 20, h - margin], outline='black')
    draw.text((x0 + margin, 8), title, fill='black')
    draw.text((x0 + w // 2 - 20, h - 20), xlabel, fill='black')
    draw.text((x0 + 4, 12), ylabel, fill='black')  # Above the top tick.
    for frac in (0.0, 0.5, 1.0):
      xv = xlim[0] + frac * (xlim[1] - xlim[0])
      yv = ylim[0] + frac * (ylim[1] - ylim[0])
      xp = x0 + margin + frac * (w - 20 - margin)
      yp = h - margin - frac * (h - margin - 30)
      draw.text((xp - 10, h - margin + 4), f'{xv:.2f}', fill='black')
      draw.text((x0 + 4, yp - 6), f'{yv:.2f}', fill='black')

    def to_pixel(x, y):
      fx = (x - xlim[0]) / max(xlim[1] - xlim[0], 1e-12)
      fy = (y - ylim[0]) / max(ylim[1] - ylim[0], 1e-12)
      return (x0 + margin + fx * (w - 20 - margin),
              h - margin - fy * (h - margin - 30))
    return to_pixel

  def padded(values):
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo or 1.0)
    return lo - pad, hi + pad

  px = axes(0, 'precision vs recall', 'recall', 'prec.',
            padded([r['recall'] for r in rows]),
            padded([r['precision'] for r in rows]))
  for r in rows:
    x, y = px(r['recall'], r['precision'])
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colours[r['knob']])
    short = {'rejection_keep': 'keep', 'temperature': 't', 'top_p': 'p',
             'guidance': 'g'}
    draw.text((x + 5, y - 5), f'{short[r["knob"]]}{r["value"]:g}',
              fill=colours[r['knob']])
  fx = axes(w, 'FID vs knob value (red keep, blue t, green top-p, purple '
            'guidance / 3)', 'value', 'FID', (0.0, 1.0),
            padded([r['fid'] for r in rows]))
  for knob, colour in colours.items():
    mine = sorted((r for r in rows if r['knob'] == knob or (
        r['value'] == 1.0 and r['knob'] == 'rejection_keep')),
                  key=lambda r: r['value'])
    scale = 3.0 if knob == 'guidance' else 1.0  # Its values reach 3.
    pts = [fx(r['value'] / scale, r['fid']) for r in mine]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    for x, y in pts:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
  image.save(path)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir, n = _WORKDIR.value, _NUM_SAMPLES.value
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = parallel.create_mesh(config.mesh)
  vqvae, variables, _ = loading.load_vqvae(config, workdir, mesh)
  features, about = eval_run.feature_fn(config, workdir, mesh)
  real = eval_run.held_out_stats(config, mesh, features)
  if _SAMPLES_WORKDIR.value:
    workdir = linked_workdir(workdir, _SAMPLES_WORKDIR.value)
  rows = []
  for knob, value, controls in points():
    point_config = config.copy_and_resolve_references()
    with point_config.unlocked():
      point_config.sampling.update(controls)
      point_config.sampling.guidance_per_level = ()  # Its guidance alone.
    logging.info('Point %s = %g', knob, value)
    images, labels, meta = eval_run.sample_images(point_config, workdir, n,
                                                  mesh, vqvae, variables)
    fake = metrics_lib.FeatureStats(max_features=n)
    fake.add(*features(images))
    scores = eval_run.sample_metrics(point_config, real, fake, labels)
    rows.append({'knob': knob, 'value': value, **scores,
                 'samples_per_sec': meta['num_samples'] / meta['seconds'],
                 'acceptance_rate': meta.get('acceptance_rate', 1.0),
                 'sample_run': meta['dir']})
    logging.info('%s', rows[-1])
  table = markdown(rows, n, real.count,
                   about.get('judge') or about['features'])
  print(table)
  out = _OUT.value
  files.atomic_write(os.path.join(out, 'rejection_tradeoff.md'),
                     lambda f: f.write(table.encode()))
  files.write_json(os.path.join(out, 'rejection_tradeoff.json'),
                   {'num_samples': n, 'held_out': real.count, **about,
                    'points': rows})
  plot(rows, os.path.join(out, 'rejection_tradeoff.png'))
  logging.info('Wrote %s', os.path.join(out, 'rejection_tradeoff.png'))


if __name__ == '__main__':
  app.run(main)

r"""Which stage 1 raises the ceiling of the samples: variants, one row each.

  python -m experiments.stage1_scaling --config=configs/fashion_mnist.py \
    --out=O --set='bottom16:model.downsample_factors=[8,2]' \
    --set='long:vqvae_train.num_train_steps=9000'

Samples are decoded by the VQ-VAE, so they get no closer to the data than
its reconstructions do (experiments/stage1_ceiling.py). Each variant is the
recipe of --config with a few fields changed (--set 'name:field=value,...',
dotted config fields, values parsed as JSON; 'base' changes nothing). It
trains stage 1 in <out>/<variant>/ (--mode=vqvae, resumed from its
checkpoints), then the shipped judge measures its reconstructions of every
held-out image against those images: FID, precision / recall, IS, class
agreement, beside stage 1's own PSNR and codes in use and the latent map
sizes (a prior's cost grows with its map's positions).

Rows are added to <out>/stage1_scaling.json as each variant finishes and a
variant already there with the same changes is not run again, so an
interrupted study continues where it stopped. Writes
<out>/stage1_scaling.md (the table, with the real-vs-real floor at
--num_train training images). A variant whose <out>/<variant>/vqvae already
holds a finished run (a link to another workdir's vqvae/, say) is measured
as it is; its train minutes are that run's own (metrics.json's
wall_time_s).
"""

import functools
import os
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import ml_collections

from experiments import prior_scaling
from experiments import stage1_ceiling
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import stages

_SAMPLE_KEYS = ('num_examples', 'fid', 'precision', 'recall',
                'inception_score', 'class_agreement')


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import its functions beside other experiments)."""
  config = config_flags.DEFINE_config_file(
      'config', 'configs/fashion_mnist.py', 'The recipe the variants change.')
  out = flags.DEFINE_string(
      'out', None, "Directory of the variants' workdirs and tables.")
  extra = flags.DEFINE_multi_string(
      'set', [], "A variant 'name:field=value,field=value' (dotted config "
      "fields, values parsed as JSON); 'base' alone runs --config as it is.")
  base = flags.DEFINE_bool('base', True, "Run 'base' (--config unchanged) "
                           'first.')
  num_train = flags.DEFINE_integer(
      'num_train', 10_000, 'Training images of the real-vs-real floor.')
  flags.mark_flags_as_required(['out'])
  return config, out, extra, base, num_train


def stage1_recipe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model and config.vqvae_train, flattened: what a row was
  trained with, whatever --config said then."""
  recipe = {}
  for section in ('model', 'vqvae_train'):
    for key, value in config[section].items():
      recipe[f'{section}.{key}'] = (list(value) if isinstance(value, tuple)
                                    else value)
  return recipe


def run_variant(config: ml_collections.ConfigDict, workdir: str,
                num_train: int) -> dict[str, Any]:
  """Trains (or resumes) stage 1 of `config` in `workdir`; measures it."""
  stages.run('vqvae', config, workdir)
  trained = files.read_json(os.path.join(workdir, 'vqvae', 'metrics.json'))
  rows = stage1_ceiling.ceilings(config, workdir, num_train)
  levels = builders.num_levels(config)
  return {
      'latent_shapes': [list(s) for s in builders.level_shapes(config)],
      'train_minutes': trained['wall_time_s'] / 60,
      'steps': trained['step'],
      'psnr_area': trained['eval/psnr_area'],
      'used_fraction': [trained[f'eval/used_fraction_level{i}']
                        for i in range(levels)],
      'perplexity': [trained[f'eval/perplexity_level{i}']
                     for i in range(levels)],
      'reconstructions': {k: rows['reconstructions_vs_held_out'].get(k)
                          for k in _SAMPLE_KEYS},
      'real_vs_real': {k: rows['train_vs_held_out'].get(k)
                       for k in _SAMPLE_KEYS},
  }


def format_table(rows: dict[str, Any]) -> str:
  """A markdown table of the rows, in their order, and the floor."""
  head = ['variant', 'latent maps', 'steps', 'train min', 'PSNR (28x28)',
          'codes used', 'FID', 'precision', 'recall', 'IS', 'class agr.',
          'changes']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in rows.items():
    r = row['result']
    s = r['reconstructions']
    agreement = s.get('class_agreement')
    lines.append('| ' + ' | '.join([
        name, ', '.join(f'{h}x{w}' for h, w in r['latent_shapes']),
        str(r['steps']), f'{r["train_minutes"]:.1f}',
        f'{r["psnr_area"]:.2f} dB',
        ' / '.join(f'{100 * u:.0f}%' for u in r['used_fraction']),
        f'{s["fid"]:.3f}', f'{s["precision"]:.3f}', f'{s["recall"]:.3f}',
        f'{s["inception_score"]:.2f}',
        '-' if agreement is None else f'{100 * agreement:.1f}%',
        ', '.join(f'{k}={v}' for k, v in row['changes'].items()) or '-',
    ]) + ' |')
  if rows:
    f = next(iter(rows.values()))['result']['real_vs_real']
    agreement = f.get('class_agreement')
    lines.append(
        f'\nReal-vs-real floor ({f["num_examples"]} training images against '
        f'the held-out split, same judge): FID {f["fid"]:.3f}, precision '
        f'{f["precision"]:.3f}, recall {f["recall"]:.3f}, IS '
        f'{f["inception_score"]:.2f}' + (
            '' if agreement is None else
            f', class agreement {100 * agreement:.1f}%') + '.')
  return '\n'.join(lines) + '\n'


def run_study(config: ml_collections.ConfigDict, out: str,
              todo: dict[str, dict[str, Any]], num_train: int,
              run_fn=run_variant) -> dict[str, Any]:
  """Runs the variants of `todo` (name -> changes) not yet in
  <out>/stage1_scaling.json; returns name -> {'changes', 'recipe',
  'result'} of every variant of `todo`."""
  os.makedirs(out, exist_ok=True)
  table_path = os.path.join(out, 'stage1_scaling.json')
  rows = files.read_json(table_path) or {}
  for name, changes in todo.items():
    variant = prior_scaling.apply_changes(config, changes)
    recipe = stage1_recipe(variant)
    done = rows.get(name)
    if done and done['recipe'] != recipe:
      differ = sorted(k for k in recipe if done['recipe'].get(k) != recipe[k])
      raise app.UsageError(
          f'{table_path} has a row {name!r} of another stage-1 recipe '
          f'(differing: {", ".join(differ)}). Fix: use another --out, or '
          'name the variant anew.')
    if done:
      print(f'{name}: already in {table_path}')
      continue
    print(f'--- {name}: {changes or "the recipe as configured"}')
    result = run_fn(variant, os.path.join(out, name), num_train)
    rows[name] = {'changes': changes, 'recipe': recipe, 'result': result}
    files.write_json(table_path, rows)  # Atomic: a kill loses one variant.
    print(format_table({name: rows[name]}).splitlines()[2])
  return {n: rows[n] for n in todo}


def main(argv, flag_values):
  del argv
  config, out, extra, base, num_train = (f.value for f in flag_values)
  todo = {'base': {}} if base else {}
  for spec in extra:
    name, changes = prior_scaling.parse_set(spec)
    todo[name] = changes
  for changes in todo.values():
    prior_scaling.apply_changes(config, changes)  # Refuse unknown fields now.
  shown = run_study(config, out, todo, num_train)
  table = format_table(shown)
  print('\nReconstructions of the held-out split, measured by the judge:')
  print(table)
  files.atomic_write(os.path.join(out, 'stage1_scaling.md'),
                     lambda f: f.write(table.encode()))


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

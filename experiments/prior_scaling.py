r"""How the priors' quality scales with size, length and recipe.

  python -m experiments.prior_scaling --base_workdir=workdir/fashion_mnist \
    --out=experiments/figures/prior_scaling                       # all
  python -m experiments.prior_scaling --variants=base,wide,long ...
  python -m experiments.prior_scaling --set='c64_s4k:prior.level_0.num_channels=64,prior.level_1.num_channels=64,prior.num_train_steps=4000' ...

Every variant trains both levels' priors on the SAME extracted codes: the
stage-1 VQ-VAE and codes of --base_workdir (made there first by --mode=vqvae
and --mode=codes when missing), linked into <out>/<variant>/, which gets its
own prior_<i>/ and samples. Each variant is the recipe of --config with a few
fields changed, relative to it (VARIANTS: 'wide' doubles the channels of
--config, whatever they are), so the same table can be made at the tiny size.

After training, --mode=eval scores --num_samples class-balanced samples
(temperature 1, no rejection, no guidance: the model as trained) with the
config's ruler: Fashion-MNIST's shipped judge (eval.features='auto'), never
the classifier that scores rejection. A row: train and held-out bits per
code of each level and their gap (overfitting), the judge's class agreement,
precision, recall, FID and IS of the samples beside the real-vs-real floor,
parameters, and training minutes (wall clock of --mode=prior, both levels;
they depend on what else the machine runs, so compare them within one study
on an idle machine).

Rows are added to <out>/prior_scaling.json as each variant finishes, and a
variant already there with the same changes and sample count is not run
again: an interrupted study continues where it stopped (each variant's
training also resumes from its checkpoints). Writes <out>/prior_scaling.md
(the table) and <out>/prior_scaling.png (class agreement and precision
against training minutes).
"""

import functools
import json
import os
import re
import time
from typing import Any, Callable

from absl import app
from absl import flags
from ml_collections import config_flags
import ml_collections

from vqvae2_jax import files
from vqvae2_jax import stages


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import its functions beside other experiments)."""
  config = config_flags.DEFINE_config_file(
      'config', 'configs/fashion_mnist.py', 'The recipe the variants change.')
  base = flags.DEFINE_string(
      'base_workdir', None,
      'Workdir whose VQ-VAE and codes every variant uses (made when missing).')
  out = flags.DEFINE_string(
      'out', None, "Directory of the variants' workdirs and tables.")
  variants = flags.DEFINE_list(
      'variants', None, 'Variants to run, in order (default: every preset).')
  extra = flags.DEFINE_multi_string(
      'set', [], "Extra variant 'name:field=value,field=value' (dotted config "
      'fields, values parsed as JSON, else kept as strings).')
  num_samples = flags.DEFINE_integer('num_samples', 10_000,
                                     'Samples scored per variant.')
  flags.mark_flags_as_required(['base_workdir', 'out'])
  return config, base, out, variants, extra, num_samples


Changes = dict[str, Any]


def _levels(config: ml_collections.ConfigDict) -> list[str]:
  return sorted(k for k in config.prior if k.startswith('level_'))


def _each_level(field: str, fn: Callable[[Any], Any]
                ) -> Callable[[ml_collections.ConfigDict], Changes]:
  """Changes `prior.level_<i>.<field>` to fn(its value) on every level."""
  return lambda c: {f'prior.{l}.{field}': fn(c.prior[l][field])
                    for l in _levels(c)}


def _prior(field: str, fn: Callable[[Any], Any]
           ) -> Callable[[ml_collections.ConfigDict], Changes]:
  return lambda c: {f'prior.{field}': fn(c.prior[field])}


def _both(*parts: Callable[[ml_collections.ConfigDict], Changes]
          ) -> Callable[[ml_collections.ConfigDict], Changes]:
  return lambda c: {k: v for part in parts for k, v in part(c).items()}


def _double(x):
  return 2 * x


# name -> (what it changes, the changes as a function of the recipe).
VARIANTS: dict[str, tuple[str, Callable[[ml_collections.ConfigDict],
                                        Changes]]] = {
    'base': ('the recipe as configured', lambda c: {}),
    'wide': ('twice the channels', _each_level('num_channels', _double)),
    'deep': ('twice the gated blocks', _each_level('num_layers', _double)),
    'long': ('twice the train steps', _prior('num_train_steps', _double)),
    'longer': ('four times the train steps',
               _prior('num_train_steps', lambda x: 4 * x)),
    'batch2x': ('twice the batch', _prior('batch_size', _double)),
    'lr_half': ('half the peak learning rate',
                _prior('learning_rate', lambda x: x / 2)),
    'lr_double': ('twice the peak learning rate',
                  _prior('learning_rate', _double)),
    'no_dropout': ('no dropout in the gated blocks',
                   _each_level('dropout_rate', lambda x: 0.0)),
    'dropout_0.2': ('dropout 0.2 in the gated blocks',
                    _each_level('dropout_rate', lambda x: 0.2)),
    'top_attention2': ('one more attention block in the top prior',
                       lambda c: {'prior.level_0.attention_layers':
                                  c.prior.level_0.attention_layers + 1}),
    'wide_long': ('twice the channels and twice the steps',
                  _both(_each_level('num_channels', _double),
                        _prior('num_train_steps', _double))),
    'wide_deep_long': ('twice the channels, blocks and steps',
                       _both(_each_level('num_channels', _double),
                             _each_level('num_layers', _double),
                             _prior('num_train_steps', _double))),
}


def parse_set(spec: str) -> tuple[str, Changes]:
  """'name:a.b=1,c.d=x,e=[1,2]' -> ('name', {'a.b': 1, 'c.d': 'x',
  'e': [1, 2]})."""
  name, sep, body = spec.partition(':')
  if not sep or not name or not body:
    raise app.UsageError(
        f"--set={spec!r}: expected 'name:field=value[,field=value...]'.")
  changes = {}
  # A comma starts the next field only before 'name=', so that JSON lists
  # ('model.downsample_factors=[8,2]') keep theirs.
  for item in re.split(r',(?=\s*[A-Za-z_][\w.]*=)', body):
    field, eq, value = item.partition('=')
    if not eq or not field.strip():
      raise app.UsageError(f'--set={spec!r}: {item!r} is not field=value.')
    try:
      changes[field.strip()] = json.loads(value)
    except json.JSONDecodeError:
      changes[field.strip()] = value
  return name, changes


def apply_changes(config: ml_collections.ConfigDict, changes: Changes
                  ) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted fields of `changes` set."""
  out = config.copy_and_resolve_references()
  for field, value in changes.items():
    *path, name = field.split('.')
    section = out
    for part in path:
      if part not in section:
        raise app.UsageError(f'Unknown config field {field!r}.')
      section = section[part]
    if name not in section:
      raise app.UsageError(f'Unknown config field {field!r}.')
    old = section[name]
    if isinstance(old, tuple):
      value = tuple(value)  # JSON gives a list; the field keeps its type.
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
      value = type(old)(value)
    with section.unlocked():
      section[name] = value
  return out


def prior_recipe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every field of config.prior, flattened ('level_0.num_channels': 64):
  what a row was trained with, whatever --config said then."""
  def flat(section, prefix=''):
    out = {}
    for key, value in section.items():
      if isinstance(value, ml_collections.ConfigDict):
        out.update(flat(value, f'{prefix}{key}.'))
      else:
        out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
    return out
  return flat(config.prior)


def link_stages(base: str, workdir: str) -> None:
  """Links the base workdir's VQ-VAE and codes into a variant's workdir."""
  os.makedirs(workdir, exist_ok=True)
  for name in ('vqvae', 'codes'):
    link = os.path.join(workdir, name)
    if not os.path.lexists(link):
      os.symlink(os.path.join(os.path.abspath(base), name), link)


def run_variant(config: ml_collections.ConfigDict, base: str, workdir: str,
                num_samples: int) -> dict[str, Any]:
  """Trains the priors of `config` in `workdir`, then scores their samples."""
  link_stages(base, workdir)
  start = time.time()
  trained = stages.run('prior', config, workdir)['prior']
  train_s = time.time() - start
  eval_config = config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.eval.num_samples = num_samples
    eval_config.eval.cas = False
    eval_config.sampling.rejection_keep = 1.0
    eval_config.sampling.temperature = 1.0
    eval_config.sampling.top_k = 0
    eval_config.sampling.top_p = 1.0
    eval_config.sampling.guidance = 1.0  # The model as trained.
    eval_config.sampling.guidance_per_level = ()
  report = stages.run('eval', eval_config, workdir)['eval']
  row = {'train_minutes': train_s / 60,
         'num_params': sum(m['num_params'] for m in trained.values()),
         'ruler': report.get('judge') or report.get('features'),
         'ruler_sha256': report.get('judge_sha256'),
         'samples': {k: report['samples'].get(k) for k in (
             'num_examples', 'class_agreement', 'precision', 'recall', 'fid',
             'inception_score')},
         'real_vs_real': {k: report['real_vs_real'].get(k) for k in (
             'precision', 'recall', 'fid', 'inception_score')},
         'held_out_inception_score': report['held_out_inception_score'],
         'levels': {}}
  for level, p in report['priors'].items():
    row['levels'][level] = {
        'held_out': p['held_out_bits_per_code'],
        'train': p['train_bits_per_code'],
        'gap': p['held_out_bits_per_code'] - p['train_bits_per_code'],
        'step': p['step']}
  return row


def format_table(rows: dict[str, Any]) -> str:
  """A markdown table of the rows, in their order."""
  levels = sorted({l for r in rows.values() for l in r['result']['levels']})
  head = ['variant', 'params', 'train min']
  for l in levels:
    head += [f'{l} held-out', f'{l} gap']
  head += ['class agr.', 'precision', 'recall', 'FID', 'IS', 'changes']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for name, row in rows.items():
    r = row['result']
    s = r['samples']
    cells = [name, f'{r["num_params"]:,}', f'{r["train_minutes"]:.1f}']
    for l in levels:
      cells += [f'{r["levels"][l]["held_out"]:.3f}',
                f'{r["levels"][l]["gap"]:+.3f}']
    agreement = s.get('class_agreement')
    cells += ['-' if agreement is None else f'{100 * agreement:.1f}%',
              f'{s["precision"]:.3f}', f'{s["recall"]:.3f}',
              f'{s["fid"]:.3f}', f'{s["inception_score"]:.2f}',
              ', '.join(f'{k}={v}' for k, v in row['changes'].items()) or '-']
    lines.append('| ' + ' | '.join(cells) + ' |')
  if rows:
    floor = next(iter(rows.values()))['result']
    f = floor['real_vs_real']
    lines.append(
        f'\nReal-vs-real floor (training images against the held-out split, '
        f'same ruler): precision {f["precision"]:.3f}, recall '
        f'{f["recall"]:.3f}, FID {f["fid"]:.3f}, IS {f["inception_score"]:.2f}'
        f'; held-out images\' IS {floor["held_out_inception_score"]:.2f}. '
        f'Ruler: {floor["ruler"]}. gap = held-out - train bits per code.')
  return '\n'.join(lines) + '\n'


def plot(rows: dict[str, Any], path: str) -> None:
  """Class agreement (or precision) and recall against training minutes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  w, h, m = 640, 420, 60
  image = Image.new('RGB', (w, h), 'white')
  draw = ImageDraw.Draw(image)
  points = []
  for name, row in rows.items():
    r = row['result']
    quality = r['samples'].get('class_agreement')
    points.append((name, r['train_minutes'],
                   r['samples']['precision'] if quality is None else quality,
                   r['samples']['recall']))
  conditional = all(r['result']['samples'].get('class_agreement') is not None
                    for r in rows.values())
  label = 'class agreement' if conditional else 'precision'
  xs = [p[1] for p in points] or [0.0]
  ys = [v for p in points for v in p[2:]] or [0.0]
  x0, x1 = 0.0, max(xs) * 1.1 or 1.0
  y0, y1 = min(ys) - 0.02, max(ys) + 0.02

  def px(x, y):
    return (m + (x - x0) / (x1 - x0) * (w - m - 20),
            h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - m - 30))

  draw.rectangle([m, 30, w - 20, h - m], outline='black')
  draw.text((m, 8), f'{label} (red) and recall (blue) against training '
            'minutes', fill='black')
  draw.text((w // 2 - 40, h - 22), 'train minutes', fill='black')
  for frac in (0.0, 0.5, 1.0):
    x, y = px(x0 + frac * (x1 - x0), y0 + frac * (y1 - y0))
    draw.text((x - 10, h - m + 4), f'{x0 + frac * (x1 - x0):.1f}',
              fill='black')
    draw.text((4, y - 6), f'{y0 + frac * (y1 - y0):.3f}', fill='black')
  for name, minutes, quality, recall in points:
    for value, colour in ((quality, (200, 30, 30)), (recall, (30, 90, 200))):
      x, y = px(minutes, value)
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    x, y = px(minutes, quality)
    draw.text((x + 6, y - 6), name, fill=(90, 90, 90))
  files.atomic_write(path, lambda f: image.save(f, format='PNG'))


def variant_changes(config: ml_collections.ConfigDict, names: list[str],
                    extra: list[str]) -> dict[str, tuple[str, Changes]]:
  """name -> (what, changes) for the requested presets and --set variants."""
  out = {}
  for name in names:
    if name not in VARIANTS:
      raise app.UsageError(f'Unknown variant {name!r}; presets: '
                           f'{list(VARIANTS)} (or define one with --set).')
    what, fn = VARIANTS[name]
    out[name] = (what, fn(config))
  for spec in extra:
    name, changes = parse_set(spec)
    out[name] = ('--set', changes)
  return out


def run_study(config: ml_collections.ConfigDict, base: str, out: str,
              todo: dict[str, tuple[str, Changes]], num_samples: int,
              run_fn: Callable[..., dict[str, Any]] = run_variant
              ) -> dict[str, Any]:
  """Runs the variants of `todo` not yet in <out>/prior_scaling.json.

  Returns:
    name -> {'what', 'changes', 'result'} of every variant of `todo`.
  """
  os.makedirs(out, exist_ok=True)
  table_path = os.path.join(out, 'prior_scaling.json')
  rows = files.read_json(table_path) or {}
  for name, (what, changes) in todo.items():
    variant = apply_changes(config, changes)
    recipe = prior_recipe(variant)
    done = rows.get(name)
    if done and done.get('prior', recipe) != recipe:
      # The same name and changes on another --config: not this row.
      differ = sorted(k for k in recipe if done['prior'].get(k) != recipe[k])
      raise app.UsageError(
          f'{table_path} has a row {name!r} of another prior recipe '
          f'(differing: {", ".join(differ)}). Fix: use another --out for '
          'this --config, or name the variant anew with --set.')
    if (done and done['changes'] == changes and
        done['result']['samples']['num_examples'] == num_samples):
      print(f'{name}: already in {table_path}')
      continue
    print(f'--- {name}: {what} {changes or ""}')
    result = run_fn(variant, base, os.path.join(out, name), num_samples)
    rows[name] = {'what': what, 'changes': changes, 'prior': recipe,
                  'result': result}
    files.write_json(table_path, rows)  # Atomic: a kill loses one variant.
    print(format_table({name: rows[name]}).splitlines()[2])
  return {n: rows[n] for n in todo}


def main(argv, flag_values):
  del argv
  config, base, out, variants, extra, num_samples = (
      f.value for f in flag_values)
  names = variants if variants is not None else (
      [] if extra else list(VARIANTS))
  todo = variant_changes(config, names, extra)
  for _, changes in todo.values():
    apply_changes(config, changes)  # Refuse an unknown field before training.
  print(f'Base workdir {base}: stage 1 and codes (resumed when made)')
  stages.run('vqvae', config, base)
  stages.run('codes', config, base)
  shown = run_study(config, base, out, todo, num_samples)
  table = format_table(shown)
  print(f'\n{num_samples} samples per variant, temperature 1, no rejection, no guidance:')
  print(table)
  files.atomic_write(os.path.join(out, 'prior_scaling.md'),
                     lambda f: f.write(table.encode()))
  plot(shown, os.path.join(out, 'prior_scaling.png'))


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

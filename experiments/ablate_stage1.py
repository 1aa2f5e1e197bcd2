r"""Stage-1 options, one at a time, on the reference protocol.

  python -m experiments.ablate_stage1 --out=/tmp/ablate.json        # all
  python -m experiments.ablate_stage1 --variants=base,rotation --out=...
  python -m experiments.ablate_stage1 --steps=1000 --out=...        # screening

Each variant is the recipe of --config (default configs/fashion_mnist.py) at
the reference's size and budget (experiments/peer_protocol.py: 128 hidden
channels, 2 residual blocks of 32, K=512, batch 64, 3000 steps, scored on the
28x28 centre of all 10,000 test images) with a few fields changed. Rows are
added to --out as each variant finishes, and variants already there are not
run again, so an interrupted ablation continues where it stopped. The table:
centre PSNR, codes used per level, the top level's PSNR on its own, and
training seconds (train steps only; they depend on what else the machine
runs, so compare them within one ablation).
"""

import json
import os
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import peer_protocol

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/fashion_mnist.py', 'The recipe the variants change.')
_VARIANTS = flags.DEFINE_list('variants', None,
                              'Variants to run (default: all, in order).')
_STEPS = flags.DEFINE_integer('steps', 3000, 'Train steps of every run.')
_OUT = flags.DEFINE_string('out', None, 'JSON file of the rows (resumed).')
flags.mark_flag_as_required('out')

# name -> (what it changes, {dotted config field: value}). Each row changes
# the recipe of --config; 'base' changes nothing.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    'base': ('the recipe as configured', {}),
    'peer_lr': ("the reference's optimizer: Adam 3e-4, constant, no warm-up, "
                'no clipping', {'vqvae_train.learning_rate': 3e-4,
                                'vqvae_train.cosine_decay': False,
                                'vqvae_train.warmup_steps': 0,
                                'vqvae_train.grad_clip_norm': 0.0}),
    'lr_1e-3': ('peak learning rate 1e-3', {'vqvae_train.learning_rate': 1e-3}),
    'lr_2e-3': ('peak learning rate 2e-3', {'vqvae_train.learning_rate': 2e-3}),
    'no_restarts': ('no dead-code restarts', {'model.dead_code_window': 0}),
    'kmeans_init': ('codebooks initialised by k-means on the first batch',
                    {'model.kmeans_init': True}),
    'ema_decay_0.95': ('EMA decay 0.95', {'model.ema_decay': 0.95}),
    'commitment_0.1': ('commitment cost 0.1', {'model.commitment_cost': 0.1}),
    'rotation': ('rotation trick for the gradient through the quantizer',
                 {'model.quantizer_gradient': 'rotation'}),
    'l2_d16': ('l2-normalised lookup in 16 dimensions',
               {'model.l2_normalize_codes': True, 'model.embedding_dim': 16}),
    'l2_d64': ('l2-normalised lookup in 64 dimensions',
               {'model.l2_normalize_codes': True}),
    'level_dropout_0.25': ('a quarter of the train images decoded from the '
                           'top level only', {'model.level_dropout': 0.25}),
}


def _override(config, changes: dict[str, Any]):
  for field, value in changes.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


def _load(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _save(path: str, rows: dict[str, Any]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, path)  # A kill never leaves half a file.


def format_table(rows: dict[str, Any]) -> str:
  lines = [f'{"variant":<20} {"steps":>5} {"centre PSNR":>11} {"top used":>9} '
           f'{"bot used":>9} {"top-only":>8} {"train s":>8}  changes']
  for name, row in rows.items():
    r = row['result']
    changes = ', '.join(f'{k}={v}' for k, v in row['changes'].items()) or '-'
    lines.append(
        f'{name:<20} {r["step"]:>5} {r["psnr_area"]:>11.2f} '
        f'{r["used_top"]:>9.1%} {r["used_bottom"]:>9.1%} '
        f'{r["psnr_top_only"]:>8.2f} {r["train_s"]:>8.0f}  {changes}')
  return '\n'.join(lines)


def main(argv):
  del argv
  names = _VARIANTS.value or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f'Unknown variants {unknown}; known: '
                         f'{list(VARIANTS)}.')
  rows = _load(_OUT.value)
  for name in names:
    if name in rows and rows[name]['result']['step'] == _STEPS.value:
      print(f'{name}: already in {_OUT.value}')
      continue
    what, changes = VARIANTS[name]
    print(f'--- {name}: {what}')
    config = peer_protocol.apply_protocol(_CONFIG.value, _STEPS.value)
    _override(config, changes)
    result = peer_protocol.run(config, [_STEPS.value])[-1]
    rows[name] = {'what': what, 'changes': changes, 'result': result}
    _save(_OUT.value, rows)
  print(f'\nReference protocol, {_STEPS.value} steps of batch 64 (centre: '
        'the 28x28 original area; top-only: whole image from the top level '
        'alone):')
  print(format_table({n: rows[n] for n in names}))


if __name__ == '__main__':
  app.run(main)

r"""Which prior loses what the samples lack: the top one or the lower ones.

  python -m experiments.prior_attribution --config=configs/fashion_mnist.py:long \
    --workdir=W --guidance=1,1.5 --out=attribution.json

Samples fall short of the real data through stage 1 (its reconstructions
bound them) and through each level's prior. This separates the two by
keeping the true codes of the levels above some level and sampling that
level and the ones below it, for every held-out image, with its true
label. The rows, each scored by the config's ruler (Fashion-MNIST's shipped
judge by default) against the whole held-out split:

* `reconstructions`: every level's true codes, decoded (stage 1 alone);
* `sampled from level l`: the held-out image's codes of levels 0..l-1 kept,
  levels l.. sampled by the priors (the lowest level first, so the last
  row, l = 0, is the plain samples of the held-out labels).

Going down the table, each row adds one more level's prior: what a row
loses against the one above it is that level's prior's share. Pairing
makes the first rows' precision and recall pass the real-data floor (as
reconstructions do): compare rows with each other, not with the floor.

A --guidance entry with colons guides each level by its own scale, top
first (--guidance=1.3:1 guides the top prior only): where guidance acts.
The priors draw with the config's `sampling.contrast` and
`sampling.discount` (by stage 1's code frequencies), or --contrast and
--discount (one value, or one per level top first: 0:8), the discount by
--discount_rule (`experiments.discount_rules`: the library's squared rule
by default; stop 53's rows were drawn by `excess`). Until stop 53 they
drew without either: --contrast=0 --discount=0 gives the rows measured
then.

--pipeline takes anything `Pipeline.load` takes (a shipped name such as
fashion_mnist_long128, an exported file) in place of --config and
--workdir, and samples at its config's settings:

  python -m experiments.prior_attribution --pipeline=fashion_mnist_long128

Rows are printed as they finish and written to --out as JSON (the rows of
each guidance, and what the ruler and checkpoints were).
"""

import functools
import json
import time

from absl import app
from absl import flags
from experiments import discount_rules
import jax
from ml_collections import config_flags
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import files
from vqvae2_jax import parallel
from vqvae2_jax import sampling
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run


def _define_flags():
  """This script's flags (defined only when it runs, so that tests can
  import `attribution` beside other experiments)."""
  config = config_flags.DEFINE_config_file('config', None, 'Config file.')
  workdir = flags.DEFINE_string('workdir', None,
                                'A workdir with stage 1 and every prior.')
  pipeline = flags.DEFINE_string(
      'pipeline', None, 'In place of --config and --workdir: a shipped '
      'name or exported file (anything Pipeline.load takes).')
  contrast = flags.DEFINE_string(
      'contrast', None, "sampling.contrast (T:B per level); the config's "
      'when unset.')
  discount = flags.DEFINE_string(
      'discount', None, "sampling.discount (T:B per level); the config's "
      'when unset.')
  guidance = flags.DEFINE_list(
      'guidance', None, "Guidance scales (default: the config's); an entry "
      'with colons gives each level its own, top first (1.3:1: the top at '
      '1.3, the bottom unguided).')
  limit = flags.DEFINE_integer(
      'limit', 0, 'Held-out images used (the first ones); 0: all.')
  out = flags.DEFINE_string('out', None, 'JSON file of the rows.')
  rule = discount_rules.define_flag()
  return (config, workdir, guidance, limit, out, pipeline, contrast, discount,
          rule)


def split_images(pipe: api.Pipeline, split: str, mesh=None,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a split of the config's data, in order (the
  first `limit`; all for None)."""
  images, labels = [], []
  for batch_images, batch_labels, _ in eval_run.real_batches(
      pipe.config, mesh or pipe.mesh, split, limit=limit):
    images.append(batch_images)
    labels.append(batch_labels)
  return np.concatenate(images), np.concatenate(labels)


def held_out_codes(pipe: api.Pipeline, mesh, limit: int | None,
                   split: str | None = None
                   ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
  """(held-out images, their codes per level top first, their labels); of
  `split` in place of the config's eval split where given."""
  images, labels = split_images(pipe, split or pipe.config.data.eval_split,
                                mesh, limit)
  return images, pipe.encode(images), labels


Guidance = float | tuple[float, ...]


def parse_guidance(text: str) -> Guidance:
  """'1.5' -> 1.5 (every level); '1.3:1' -> (1.3, 1.0), one per level."""
  values = tuple(float(g) for g in text.split(':'))
  return values if len(values) > 1 else values[0]


def _label(guidance: Guidance) -> str:
  """'1.0' for one scale (the keys of rows written so far), '1.3:1' per
  level."""
  if isinstance(guidance, tuple):
    return builders.guidance_text(guidance)
  return str(guidance)


def complete_codes(pipe: api.Pipeline, kept: list[np.ndarray],
                   labels: np.ndarray, *, guidance: Guidance, rng: jax.Array,
                   batch_size: int, contrast: Guidance = 0.0,
                   discount: Guidance = 0.0) -> list[np.ndarray]:
  """`kept` (the codes of the levels above some level, top first) completed
  by sampling every lower level with the priors, batch by batch.

  Batch i is `sampling.sample_hierarchy` with fold_in(rng, i), the last
  batch padded (with copies of its first example) to one compiled shape.
  `guidance`, `contrast`, `discount`: one value for every level, or one per
  level, top first (`Pipeline.sample`'s; 0 is off for the last two).
  """
  code_bias = pipe.code_bias(contrast)
  code_discount = pipe.code_discount(discount)
  n = len(labels)
  out = [[] for _ in pipe.priors[len(kept):]]  # The sampled levels.
  for i, begin in enumerate(range(0, n, batch_size)):
    m = min(batch_size, n - begin)
    take = np.concatenate([np.arange(begin, begin + m),
                           np.full(batch_size - m, begin)])
    codes = sampling.sample_hierarchy(
        pipe.priors, pipe.level_shapes, batch_size=batch_size,
        labels=labels[take].astype(np.int32), rng=jax.random.fold_in(rng, i),
        mesh=pipe.mesh, guidance=guidance, code_bias=code_bias,
        code_discount=code_discount, upper_codes=[c[take] for c in kept])
    for level, level_codes in enumerate(codes[len(kept):]):
      out[level].append(np.asarray(parallel.to_host(level_codes))[:m])
  return list(kept) + [np.concatenate(level) for level in out]


def decoded_features(pipe: api.Pipeline, features, level_codes, batch: int
                     ) -> metrics_lib.FeatureStats:
  """The ruler's features of the images `level_codes` (every level's maps,
  top first) decode to, `batch` maps at a time."""
  n = len(level_codes[0])
  fake = metrics_lib.FeatureStats(max_features=n)
  for begin in range(0, n, batch):
    chunk = [c[begin:begin + batch] for c in level_codes]
    fake.add(*features(np.clip(pipe.decode(chunk), -1.0, 1.0)))
  return fake


def attribution(config, workdir: str, guidances: list[Guidance] | None,
                limit: int | None = None, report=print,
                contrast: Guidance | None = None,
                discount: Guidance | None = None,
                rule: str = discount_rules.LIBRARY_RULE) -> dict:
  """The rows (see the module docstring), per guidance.

  `config` None: `workdir` is anything `Pipeline.load` takes, sampled at
  its own config. `guidances` None: the config's. `contrast`, `discount`
  None: the config's (`sampling.contrast`, `sampling.discount`). `rule`:
  the discount's (`discount_rules.RULES`).
  """
  pipe = api.Pipeline.load(workdir, config, require_priors=True)
  with discount_rules.discount_rule(pipe, rule):
    return _attribution(pipe, workdir, guidances, limit, report, contrast,
                        discount, rule)


def _attribution(pipe, workdir, guidances, limit, report, contrast, discount,
                 rule) -> dict:
  """`attribution` of a loaded pipeline, under its discount rule."""
  config = pipe.config
  if guidances is None:
    guidances = [builders.sampling_guidance(config)]
  if contrast is None:
    contrast = builders.sampling_contrast(config)
  if discount is None:
    discount = builders.sampling_discount(config)
  mesh = pipe.mesh
  features, about = eval_run.feature_fn(config, pipe.workdir, mesh)
  images, codes, labels = held_out_codes(pipe, mesh, limit)
  real = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  real.add(*features(images))
  batch_size = max(int(config.sampling.batch_size) // mesh.size, 1) * mesh.size
  decode_batch = max(int(config.eval.batch_size) // mesh.size, 1) * mesh.size

  def score(name, level_codes):
    fake = decoded_features(pipe, features, level_codes, decode_batch)
    row = {'row': name, **eval_run.sample_metrics(config, real, fake, labels)}
    report(json.dumps(row))
    return row

  result = {'workdir': workdir, 'steps': pipe.steps, **about,
            'contrast': builders.guidance_text(contrast),
            'discount': builders.guidance_text(discount),
            'discount_rule': rule,
            'held_out_examples': len(labels),
            'reconstructions': score('reconstructions', codes),
            'guidance': {}}
  rng = jax.random.PRNGKey(config.seed)
  for g in guidances:
    rows = []
    for level in reversed(range(len(pipe.priors))):
      start = time.time()
      sampled = complete_codes(pipe, codes[:level], labels, guidance=g,
                               rng=jax.random.fold_in(rng, level),
                               batch_size=batch_size, contrast=contrast,
                               discount=discount)
      row = score(f'guidance {_label(g)}: sampled from level {level}',
                  sampled)
      row.update(sampled_from_level=level, seconds=time.time() - start)
      rows.append(row)
    result['guidance'][_label(g)] = rows
  return result


def main(argv, flag_values):
  del argv
  (config, workdir, guidance, limit, out, pipeline, contrast, discount,
   rule) = flag_values
  by_workdir = (config.value is not None, workdir.value is not None)
  if by_workdir != ((False, False) if pipeline.value else (True, True)):
    raise app.UsageError('Give --pipeline, or both --config and --workdir.')
  guidances = ([parse_guidance(g) for g in guidance.value] if guidance.value
               else None)
  result = attribution(
      config.value, pipeline.value or workdir.value, guidances,
      limit.value or None,
      contrast=None if contrast.value is None else parse_guidance(
          contrast.value),
      discount=None if discount.value is None else parse_guidance(
          discount.value), rule=rule.value)
  if out.value:
    files.write_json(out.value, result)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  app.run(functools.partial(main, flag_values=_define_flags()))

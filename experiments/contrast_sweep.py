r"""Sample quality against the sampler's contrast and discount with stage 1's
code frequencies.

  python -m experiments.contrast_sweep --pipeline=fashion_mnist_long128 \
    --contrast=0,0:0.5,0:1 --guidance=1,1.3:2 --out=contrast.json

`sampling.contrast` c draws each code from p(code | context) / freq(code)^c
(renormalised), freq the share of the level's codes stage 1 gives that
code (`api.Pipeline.code_frequencies`): above 0 the codes the level uses
everywhere (plain areas, the background) lose weight against the rarer
ones that carry the detail. For each guidance and each contrast (one value
for every level, or one per level top first, `T:B`), `Pipeline.evaluate`
draws --num_samples class-balanced samples as --mode=eval draws them and
the config's ruler (the shipped judge) scores them against the held-out
split: one row each, printed as it finishes, with the same draws' key in
every row (so contrast 0 at the config's guidance is `evaluate()`'s row;
--seed draws others). --pipeline is anything `Pipeline.load` takes.

--discount adds the other use of the frequencies, `sampling.discount` d:
each code whose p(code | context) exceeds its threshold t = d *
freq(code) drawn with weight (p - t)^2 / p, renormalised; one row per
(guidance, contrast, discount), and per --temperature where given (applied
after the discount, at every level).

--discount_rule: the library's rule (squared, the default) or a control
of the discount's shape, for this process (`experiments.discount_rules`).

--marginals=N also draws N class-balanced samples at each row's setting and
reports how far their codes' frequencies lie from stage 1's (per level,
top first: KL(stage 1 || samples) in nats, and the samples' unigram
entropy in bits beside stage 1's): what the contrast does to the codes'
overall use, apart from what it does in each context.

--grid=PATH also writes a PNG: --grid_per_class samples of each class
drawn with neither (left) and with the last --contrast and --discount
(right), at the first guidance, with the same key: where the top level
has neither, each pair shares its top codes, and the right side shows
what they change below them.
"""

import functools
import itertools
import json
import time

from absl import app
from absl import flags

from experiments import discount_rules
from experiments import prior_attribution
import jax
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import images as images_lib

def _define_flags():
  """This script's flags (defined only when it runs)."""
  return {
      'pipeline': flags.DEFINE_string(
          'pipeline', None, 'A workdir, exported file or shipped name.'),
      'contrast': flags.DEFINE_list(
          'contrast', ['0', '0:0.5'], 'Contrasts: one value for every '
          'level, or one per level, top first (T:B).'),
      'discount': flags.DEFINE_list(
          'discount', ['0'], 'Discounts: one value for every level, or one '
          'per level, top first (T:B).'),
      'guidance': flags.DEFINE_list(
          'guidance', None, "Guidance scales (T:B per level); the config's "
          'when unset.'),
      'temperature': flags.DEFINE_list(
          'temperature', None, "Softmax temperatures (every level); the "
          "config's when unset."),
      'num_samples': flags.DEFINE_integer('num_samples', 10_000,
                                          'Samples per row.'),
      'seed': flags.DEFINE_integer(
          'seed', None, "The draws' seed; the config's when unset."),
      'out': flags.DEFINE_string('out', None, 'Also write the JSON here.'),
      'grid': flags.DEFINE_string(
          'grid', None, 'Also write samples without and with the last '
          'contrast here (PNG).'),
      'grid_per_class': flags.DEFINE_integer(
          'grid_per_class', 8, 'Samples of each class on each side of --grid.'),
      'discount_rule': discount_rules.define_flag(),
      'marginals': flags.DEFINE_integer(
          'marginals', 0, "Also each row's samples' code frequencies against "
          "stage 1's, over this many samples (0: not measured)."),
  }


def temperatures(values: list[str] | None) -> list[float | None]:
  """--temperature's values as floats; unset, [None] (the config's)."""
  return [float(t) for t in values] if values else [None]


def entropy_bits(shares: np.ndarray) -> float:
  """The entropy of a distribution over codes, in bits."""
  shares = shares[shares > 0]
  return float(-np.sum(shares * np.log2(shares)))


def marginals(pipe: api.Pipeline, contrast, guidance, num_samples: int,
              seed: int | None = None, batch: int = 1000,
              discount=0.0, temperature: float | None = None) -> dict:
  """How the codes of `num_samples` class-balanced samples are spread, per
  level (top first), against stage 1's code frequencies: {'kl_nats':
  KL(stage 1 || samples), the samples' shares smoothed by half a count per
  code; 'entropy_bits': the samples' unigram entropy}. Batch i is drawn
  with fold_in(PRNGKey(seed), i) (the config's seed when None)."""
  freqs = api.Pipeline.code_frequencies(pipe)  # Stage 1's, whatever the rule.
  counts = [np.zeros(len(f)) for f in freqs]
  key = jax.random.PRNGKey(pipe.config.seed if seed is None else seed)
  classes = pipe.num_classes
  for i, start in enumerate(range(0, num_samples, batch)):
    n = min(batch, num_samples - start)
    labels = (np.arange(start, start + n) % classes) if classes else None
    _, codes = pipe.sample(labels, n, guidance=guidance if classes else 1.0,
                           contrast=contrast, discount=discount,
                           temperature=temperature,
                           key=jax.random.fold_in(key, i))
    for level, c in enumerate(codes):
      counts[level] += np.bincount(c.ravel(), minlength=len(counts[level]))
  kl, entropy = [], []
  for f, c in zip(freqs, counts):
    q = (c + 0.5) / (c.sum() + 0.5 * len(c))
    used = f > 0
    kl.append(float(np.sum(f[used] * np.log(f[used] / q[used]))))
    entropy.append(entropy_bits(c / c.sum()))
  return {'kl_nats': kl, 'entropy_bits': entropy}


def sweep(pipe: api.Pipeline, contrasts, guidances, num_samples: int,
          report=print, seed: int | None = None,
          marginal_samples: int = 0, discounts=(0.0,),
          rule: str = discount_rules.LIBRARY_RULE, temperatures=(None,)) -> list[dict]:
  """One row per (guidance, temperature, contrast, discount) (a
  temperature of None: the config's): `Pipeline.evaluate`'s
  samples (drawn with `seed`, the config's when None), and with
  `marginal_samples` > 0 the `marginals` of that many samples
  ('code_kl_nats', 'code_entropy_bits'). `rule`: the discount rule the
  caller samples under (`discount_rule`), named in each row."""
  rows = []
  for guidance, temperature, contrast, discount in itertools.product(
      guidances, temperatures, contrasts, discounts):
    start = time.time()
    given = {} if temperature is None else {'temperature': temperature}
    result = pipe.evaluate(num_samples, guidance=guidance,
                           contrast=contrast, discount=discount, key=seed,
                           **given)
    row = {'guidance': builders.guidance_text(guidance),
           'contrast': builders.guidance_text(contrast),
           'discount': builders.guidance_text(discount),
           **{k: v for k, v in result['samples'].items()
              if k not in ('guidance', 'contrast', 'discount')},
           'real_vs_real_recall': result['real_vs_real']['recall'],
           'discount_rule': rule, 'seconds': time.time() - start}
    if marginal_samples:
      spread = marginals(pipe, contrast, guidance, marginal_samples, seed,
                         discount=discount, temperature=temperature)
      row.update(code_kl_nats=spread['kl_nats'],
                 code_entropy_bits=spread['entropy_bits'])
    report(json.dumps(row))
    rows.append(row)
  return rows


def grid(pipe: api.Pipeline, path: str, contrast, guidance, per_class: int,
         seed: int | None = None, discount=0.0) -> None:
  """Writes `per_class` samples of each class (one class a row) with
  neither contrast nor discount (left) and with `contrast` and `discount`
  (right), drawn with the same key."""
  key = pipe.config.seed if seed is None else seed
  labels, n = None, per_class
  if pipe.num_classes:
    labels, n = np.repeat(np.arange(pipe.num_classes), per_class), None
  plain, _ = pipe.sample(labels, n, guidance=guidance, contrast=0.0,
                         discount=0.0, key=key)
  contrasted, _ = pipe.sample(labels, n, guidance=guidance,
                              contrast=contrast, discount=discount, key=key)
  images_lib.write_side_by_side(path,
                                images_lib.image_grid(plain, per_class),
                                images_lib.image_grid(contrasted, per_class))


def main(argv, flag_values):
  del argv
  pipeline = flag_values['pipeline'].value
  pipe = api.Pipeline.load(pipeline, require_priors=True)
  guidances = ([prior_attribution.parse_guidance(g)
                for g in flag_values['guidance'].value]
               if flag_values['guidance'].value
               else [builders.sampling_guidance(pipe.config)])
  contrasts = [prior_attribution.parse_guidance(c)
               for c in flag_values['contrast'].value]
  discounts = [prior_attribution.parse_guidance(d)
               for d in flag_values['discount'].value]
  seed = flag_values['seed'].value
  rule = flag_values['discount_rule'].value
  with discount_rules.discount_rule(pipe, rule):
    rows = sweep(pipe, contrasts, guidances,
                 flag_values['num_samples'].value, seed=seed,
                 marginal_samples=flag_values['marginals'].value,
                 discounts=discounts, rule=rule,
                 temperatures=temperatures(flag_values['temperature'].value))
    if flag_values['grid'].value:
      grid(pipe, flag_values['grid'].value, contrasts[-1], guidances[0],
           flag_values['grid_per_class'].value, seed, discounts[-1])
  result = {'pipeline': pipeline, 'steps': pipe.steps,
            'num_samples': flag_values['num_samples'].value,
            'seed': pipe.config.seed if seed is None else seed,
            'rows': rows}
  if flag_values['marginals'].value:
    result['stage1_code_entropy_bits'] = [
        entropy_bits(f) for f in pipe.code_frequencies()]
  if flag_values['out'].value:
    with open(flag_values['out'].value, 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True, default=str)


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline'])
  app.run(functools.partial(main, flag_values=_flags))

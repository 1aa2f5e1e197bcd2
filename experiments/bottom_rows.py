r"""Where in the bottom map the samples lose the data: rows of true codes kept.

  python -m experiments.bottom_rows --pipeline=fashion_mnist_long128 \
    --rows=0,2,4,6,8 --out=rows.json

For every held-out image: the true codes of every upper level and of the
first R rows of the lowest level are kept, and the lowest level's prior
samples the rest of its map in raster order (with the image's label,
guidance 1, temperature 1), conditioned on all of them. The completed maps
are decoded and scored by the eval's ruler (the shipped judge) against the
whole held-out split, one row per R. R = 0 is `prior_attribution`'s
"sampled from" the lowest level; R = the map's height, the
reconstructions. If the prior lost the data by an early choice (a plain
item where the data had a patterned one, say), the first rows kept would
recover most of the loss; if it loses it where it draws, each row kept
recovers about its share.

--split=train (with --limit, as many images as the held-out split has)
does the same for the training images, scored against themselves: a
prior that lost recall by overfitting its training codes would draw the
training images' variants better than the held-out ones'.

--teacher_forced draws each position given the true codes before it (the
cache carries the true map, not the drawn one): with R = 0, every
position's draw from the prior's conditional given the true past, so no
early choice can lead the later ones astray. --contrast and --discount
draw with the lowest level's `sampling.contrast` and `sampling.discount`,
the discount by --discount_rule (`experiments.discount_rules`: the
library's squared rule by default; stop 52's rows were drawn by
`excess`).

The draws are the cached sampler's: position t = r * w + c of example i
draws with the noise `sampling.sample_level` uses at guidance 1, so with
a prefix equal to the sampler's own first rows the completion is the
sampler's map (the test checks this). --pipeline is anything
`Pipeline.load` takes.
"""

import functools
import json
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import discount_rules
from experiments import prior_attribution
from vqvae2_jax import api
from vqvae2_jax import sampling
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run


def _define_flags():
  """This script's flags (defined only when it runs)."""
  return {
      'pipeline': flags.DEFINE_string(
          'pipeline', None, 'A workdir, exported file or shipped name.'),
      'rows': flags.DEFINE_list(
          'rows', ['0', '2', '4', '6', '8'],
          'Rows of the lowest level\'s true codes kept, one result each.'),
      'limit': flags.DEFINE_integer(
          'limit', 0, 'Held-out images used (the first ones); 0: all.'),
      'split': flags.DEFINE_string(
          'split', None, "The images' split (the config's eval split when "
          'unset): the training split asks whether the prior draws its own '
          'training images any better.'),
      'contrast': flags.DEFINE_float(
          'contrast', 0.0, "The lowest level's contrast with stage 1's "
          'code frequencies (`sampling.contrast`); 0: off.'),
      'discount': flags.DEFINE_float(
          'discount', 0.0, "The lowest level's discount by stage 1's code "
          'frequencies (`sampling.discount`); 0: off.'),
      'teacher_forced': flags.DEFINE_bool(
          'teacher_forced', False, 'Draw each position given the true codes '
          'before it, not the drawn ones (no error carried forward).'),
      'out': flags.DEFINE_string('out', None, 'Also write the JSON here.'),
      'discount_rule': discount_rules.define_flag(),
  }


@functools.lru_cache(maxsize=4)
def _completer(model, shape: tuple[int, int, int], discounted: bool = False):
  """jit (variables, upper codes, known lowest codes, labels, rows, rng,
  code bias [K], teacher forced, code discount [K], used only where
  `discounted`, as the samplers compile it) -> the lowest level's maps, its
  first `rows` rows the known ones; teacher forced, every position after
  them is drawn given the known codes before it (not the drawn ones)."""
  _, _, width = shape
  ids = jnp.arange(shape[0], dtype=jnp.int32)

  def complete(variables, upper, known, labels, rows, rng, bias, forced,
               discount):
    context = model.apply(variables, upper, labels, shape,
                          method=model.prepare)

    def row_inputs(r):
      noise = jax.vmap(lambda c: sampling.gumbel_noise(
          jax.random.fold_in(rng, r * width + c), ids,
          model.num_embeddings))(jnp.arange(width, dtype=jnp.int32))
      return noise, known[:, r, :].T  # [w, b, K], [w, b]

    def choose(logits, r, c, x):
      del c
      noise, true = x
      drawn = sampling.gumbel_max(noise, sampling.filter_logits(
          sampling.adjust_logits(logits, bias,
                                 discount if discounted else None),
          1.0, 0, 1.0, truncate=False))
      code = jnp.where(r < rows, true, drawn)
      return jnp.where(forced, true, code), code

    # pylint: disable-next=protected-access
    codes = sampling._scan_map(model, variables, shape, context, choose,
                               row_inputs=row_inputs)  # [h, w, b]
    return jnp.transpose(codes, (2, 0, 1))

  return jax.jit(complete)


def complete_rows(pipe: api.Pipeline, upper: Sequence[np.ndarray],
                  known: np.ndarray, labels: np.ndarray, rows: int,
                  rng: jax.Array, batch_size: int,
                  prior: tuple[Any, Any] | None = None,
                  code_bias: Any = None,
                  teacher_forced: bool = False,
                  code_discount: Any = None) -> np.ndarray:
  """The lowest level's maps: `known`'s first `rows` rows, the rest drawn.

  Batch i draws with fold_in(rng, i); the last batch is padded (with copies
  of its first example) to one compiled shape. `prior`: (model, variables)
  drawing in place of the pipeline's own prior of that level (another one
  trained on the same codes, or `prior_mixture.MixedPrior`'s).
  `code_bias`: [K] added to the logits of every drawn position (e.g. the
  level's `api.Pipeline.code_bias`); None adds nothing. `code_discount`:
  [K] taken off their probabilities after it (`sampling.discount_logits`;
  e.g. `api.Pipeline.code_discount`'s); None takes nothing. `teacher_forced`:
  each drawn position sees `known`'s codes before it, not the drawn ones
  (with rows = 0, every position drawn given the true past).
  """
  model, variables = prior or pipe.priors[len(upper)]
  n, height, width = known.shape
  complete = _completer(model, (batch_size, height, width),
                        code_discount is not None)
  discount = (jnp.zeros((model.num_embeddings,), jnp.float32)
              if code_discount is None
              else jnp.asarray(code_discount, jnp.float32))
  bias = (jnp.zeros((model.num_embeddings,), jnp.float32)
          if code_bias is None else jnp.asarray(code_bias, jnp.float32))
  out = []
  for i, begin in enumerate(range(0, n, batch_size)):
    m = min(batch_size, n - begin)
    take = np.concatenate([np.arange(begin, begin + m),
                           np.full(batch_size - m, begin)])
    labels_in = (jnp.asarray(labels[take], jnp.int32) if model.num_classes
                 else None)
    codes = complete(variables, tuple(jnp.asarray(c[take], jnp.int32)
                                      for c in upper),
                     jnp.asarray(known[take], jnp.int32), labels_in,
                     jnp.asarray(rows, jnp.int32), jax.random.fold_in(rng, i),
                     bias, jnp.asarray(teacher_forced), discount)
    out.append(np.asarray(codes)[:m])
  return np.concatenate(out)


def bottom_rows(pipe: api.Pipeline, rows: Sequence[int],
                limit: int | None = None, report=print,
                split: str | None = None, contrast: float = 0.0,
                teacher_forced: bool = False,
                discount: float = 0.0) -> dict[str, Any]:
  """The rows (see the module docstring) of `pipe`; of `split`'s images
  (scored against themselves) in place of the held-out ones where given;
  drawn with the lowest level's `contrast`, `discount` and
  `teacher_forced` as `complete_rows` takes them."""
  height = pipe.level_shapes[-1][0]
  for r in rows:  # Before minutes of work on the rows in range.
    if not 0 <= r <= height:
      raise ValueError(f'--rows {r} is outside [0, {height}]: the lowest '
                       f'level\'s map has {height} rows.')
  config, mesh = pipe.config, pipe.mesh
  features, about = eval_run.feature_fn(config, pipe.workdir, mesh)
  split = split or config.data.eval_split
  images, codes, labels = prior_attribution.held_out_codes(pipe, mesh, limit,
                                                           split)
  real = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  real.add(*features(images))
  batch = int(config.eval.batch_size)
  upper, known = codes[:-1], np.asarray(codes[-1])
  code_bias = pipe.code_bias((0.0,) * len(upper) + (contrast,))[-1]
  code_discount = pipe.code_discount((0.0,) * len(upper) + (discount,))[-1]
  out = []
  for r in rows:
    drawn = complete_rows(pipe, upper, known, labels, r,
                          jax.random.PRNGKey(config.seed), batch,
                          code_bias=code_bias, teacher_forced=teacher_forced,
                          code_discount=code_discount)
    fake = prior_attribution.decoded_features(pipe, features,
                                              [*upper, drawn], batch)
    row = {'rows_kept': r, **eval_run.sample_metrics(config, real, fake,
                                                     labels)}
    report(json.dumps(row))
    out.append(row)
  return {'steps': pipe.steps, **about, 'split': split,
          'contrast': contrast, 'discount': discount,
          'teacher_forced': teacher_forced,
          'held_out_examples': len(labels), 'rows': out}


def main(argv, flag_values):
  del argv
  pipeline = flag_values['pipeline'].value
  pipe = api.Pipeline.load(pipeline, require_priors=True)
  rule = flag_values['discount_rule'].value
  with discount_rules.discount_rule(pipe, rule, compiled=(_completer,)):
    result = {'pipeline': pipeline, 'discount_rule': rule, **bottom_rows(
        pipe, [int(r) for r in flag_values['rows'].value],
        flag_values['limit'].value or None,
        split=flag_values['split'].value,
        contrast=flag_values['contrast'].value,
        discount=flag_values['discount'].value,
        teacher_forced=flag_values['teacher_forced'].value)}
  if flag_values['out'].value:
    with open(flag_values['out'].value, 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True, default=str)


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline'])
  app.run(functools.partial(main, flag_values=_flags))

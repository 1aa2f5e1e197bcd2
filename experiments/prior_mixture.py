r"""Lowest-level priors mixed: do lower held-out bits buy the samples' recall?

  python -m experiments.prior_mixture --pipeline=fashion_mnist_long128 \
    --mix=fashion_mnist_long128,W1,W2 --out=mixture.json

Priors of the same level trained on the same codes (other widths, depths,
data) are mixed position by position, p(x_t | x_<t) = the mean of the
members' p_i(x_t | x_<t): an ensemble, whose held-out bits are below the
members' mean (and usually below the best member's). Each member alone and
then the mixture draw the lowest level of every held-out image given its
true upper codes (its label, guidance 1, `bottom_rows`' noise with no rows
kept, so a member alone draws `prior_attribution`'s "sampled from" row);
the maps are decoded by --pipeline's stage 1 and scored by its ruler
against the held-out split. A row: the priors, their held-out bits per
code (the true lowest-level codes, with the labels) and the sample
metrics.

--pipeline gives stage 1, the upper codes and the ruler; --mix names the
pipelines (anything `Pipeline.load` takes) whose lowest-level priors are
mixed, which must encode the held-out images to --pipeline's codes.
"""

import functools
import json
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bottom_rows
from experiments import prior_attribution
from vqvae2_jax import api
from vqvae2_jax import errors
from vqvae2_jax.evaluation import metrics as metrics_lib
from vqvae2_jax.evaluation import run as eval_run


def _define_flags():
  """This script's flags (defined only when it runs)."""
  return {
      'pipeline': flags.DEFINE_string(
          'pipeline', None, 'Stage 1, the upper codes and the ruler: a '
          'workdir, exported file or shipped name.'),
      'mix': flags.DEFINE_list(
          'mix', None, 'Pipelines whose lowest-level priors are mixed.'),
      'limit': flags.DEFINE_integer(
          'limit', 0, 'Held-out images used (the first ones); 0: all.'),
      'out': flags.DEFINE_string('out', None, 'Also write the JSON here.'),
  }


class MixedPrior:
  """Priors of one level as one, for `sampling._scan_map`'s cached path.

  Each method the scan names (`prepare`, `init_cache`, `step_row`,
  `step_position`) runs every member on its own variables, context and
  cache; a position's logits are log(mean_i softmax(logits_i)). Its
  variables are the members' as a tuple (`variables`).
  """
  # The scan passes model.<method> as `method=`: names stand in for them.
  prepare, init_cache, step_row, step_position = (
      'prepare', 'init_cache', 'step_row', 'step_position')

  def __init__(self, priors: Sequence[tuple[Any, Any]]):
    self.models = tuple(model for model, _ in priors)
    self.variables = tuple(variables for _, variables in priors)
    first = self.models[0]
    for model in self.models[1:]:
      if (model.num_embeddings, model.num_classes) != (
          first.num_embeddings, first.num_classes):
        raise ValueError('Mixed priors need the same codes and classes: '
                         f'{model.num_embeddings} codes, {model.num_classes} '
                         f'classes against {first.num_embeddings}, '
                         f'{first.num_classes}.')
    self.num_embeddings = first.num_embeddings
    self.num_classes = first.num_classes

  def apply(self, variables, *args, method: str):
    members = list(zip(self.models, variables))
    if method in ('prepare', 'init_cache'):
      return tuple(model.apply(v, *args, method=getattr(model, method))
                   for model, v in members)
    if method == 'step_row':
      cache, context, *rest = args
      return tuple(model.apply(v, c, x, *rest, method=model.step_row)
                   for (model, v), c, x in zip(members, cache, context))
    if method == 'step_position':
      cache, context, *rest = args
      outs = [model.apply(v, c, x, *rest, method=model.step_position)
              for (model, v), c, x in zip(members, cache, context)]
      return (mix_logits([logits for logits, _ in outs]),
              tuple(c for _, c in outs))
    raise ValueError(f'MixedPrior has no method {method!r}.')


def mix_logits(logits: Sequence[jax.Array]) -> jax.Array:
  """log(mean_i softmax(logits_i)) over the last axis, float32."""
  logp = jnp.stack([jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
                    for x in logits])
  return jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(len(logits))


def held_out_bits(priors: Sequence[tuple[Any, Any]],
                  upper: Sequence[np.ndarray], known: np.ndarray,
                  labels: np.ndarray, batch_size: int) -> dict[str, Any]:
  """Bits per code of `known` (the level's true maps, given `upper` and
  `labels`) under each prior and under their mixture:
  {'members': [...], 'mixture': ...}."""
  picked = []  # [members, n, h, w]: log p of each true code, in nats.
  for model, variables in priors:
    chunks = []
    for begin in range(0, len(known), batch_size):
      chunk = slice(begin, begin + batch_size)
      codes = jnp.asarray(known[chunk], jnp.int32)
      # pylint: disable-next=protected-access
      logp = api._code_log_probs(
          model, variables, codes,
          tuple(jnp.asarray(c[chunk], jnp.int32) for c in upper),
          jnp.asarray(labels[chunk], jnp.int32))
      chunks.append(np.asarray(jnp.take_along_axis(
          logp, codes[..., None], axis=-1)[..., 0], np.float64))
    picked.append(np.concatenate(chunks))
  picked = np.stack(picked)
  mixture = np.logaddexp.reduce(picked, axis=0) - np.log(len(priors))
  bits = lambda nats: float(-nats.mean() / np.log(2.0))
  return {'members': [bits(p) for p in picked], 'mixture': bits(mixture)}


def _check_same_codes(name: str, other: api.Pipeline, images: np.ndarray,
                      codes: Sequence[np.ndarray], count: int = 500) -> None:
  """`other` must encode the held-out images to --pipeline's codes."""
  got = other.encode(images[:count])
  if len(got) != len(codes) or not all(
      np.array_equal(np.asarray(g), np.asarray(c[:count]))
      for g, c in zip(got, codes)):
    raise errors.UserError(
        f'--mix {name} encodes the held-out images to other codes than '
        "--pipeline's: mix priors trained on the same stage 1's codes (a "
        "workdir made from --pipeline's stage 1, e.g. with "
        '--config.vqvae_train.from_export).')


def mixture_rows(pipe: api.Pipeline, mix: Sequence[tuple[str, api.Pipeline]],
                 limit: int | None = None, report=print) -> dict[str, Any]:
  """Each member of `mix` (name, pipeline) alone, then all mixed: a row
  each (see the module docstring)."""
  if not mix:
    raise ValueError('--mix names no pipeline.')
  config, mesh = pipe.config, pipe.mesh
  images, codes, labels = prior_attribution.held_out_codes(pipe, mesh, limit)
  for name, other in mix:
    _check_same_codes(name, other, images, codes)
  features, about = eval_run.feature_fn(config, pipe.workdir, mesh)
  real = metrics_lib.FeatureStats(max_features=eval_run.MAX_REAL_FEATURES)
  real.add(*features(images))
  batch = int(config.eval.batch_size)
  upper, known = codes[:-1], np.asarray(codes[-1])
  priors = [other.priors[len(upper)] for _, other in mix]
  bits = held_out_bits(priors, upper, known, labels, batch)
  names = [name for name, _ in mix]
  runs = [([name], prior, b)
          for name, prior, b in zip(names, priors, bits['members'])]
  if len(mix) > 1:
    mixed = MixedPrior(priors)
    runs.append((names, (mixed, mixed.variables), bits['mixture']))
  out = []
  for members, prior, held_out in runs:
    drawn = bottom_rows.complete_rows(
        pipe, upper, known, labels, 0, jax.random.PRNGKey(config.seed),
        batch, prior=prior)
    fake = prior_attribution.decoded_features(pipe, features,
                                              [*upper, drawn], batch)
    row = {'priors': members, 'held_out_bits': held_out,
           **eval_run.sample_metrics(config, real, fake, labels)}
    report(json.dumps(row))
    out.append(row)
  return {'steps': pipe.steps, **about, 'held_out_examples': len(labels),
          'rows': out}


def main(argv, flag_values):
  del argv
  pipeline = flag_values['pipeline'].value
  pipe = api.Pipeline.load(pipeline, require_priors=True)
  mix = [(name, pipe if name == pipeline
          else api.Pipeline.load(name, require_priors=True))
         for name in flag_values['mix'].value]
  result = {'pipeline': pipeline, **mixture_rows(
      pipe, mix, flag_values['limit'].value or None)}
  if flag_values['out'].value:
    with open(flag_values['out'].value, 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True, default=str)


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline', 'mix'])
  app.run(functools.partial(main, flag_values=_flags))

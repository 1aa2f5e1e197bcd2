r"""Sampling probes: changes to how a pipeline draws or decodes its samples
that the library does not make, each measured by the judge beside the
pipeline as it samples (docs/results.md, "Where recall stands").

  none                  the pipeline as it samples (its config's settings).
  project:R             decode, then encode and decode again R times: the
                        samples become images whose codes stage 1 gives.
  temperature:T0:T1     a softmax temperature per level, top first (the
                        library has one for every level).
  class_discount:D      the bottom level's discount thresholds from each
                        class's own code frequencies (stage 1's codes of the
                        training images, by label), D * freq(code | class),
                        in place of D * freq(code); other levels as the
                        config discounts them.

Every row is `Pipeline.evaluate` of `--num_samples` class-balanced samples
with the same key, drawn `--batch_size` at a time: a batch holds one class
(the class discount needs it), so the rows are comparable with each other,
not with rows drawn at the config's batch size.

python -m experiments.sampling_probes --pipeline=fashion_mnist_long128 \
  --probes=none,project:1,temperature:1.1:1,class_discount:8 --out=rows.json
"""

import contextlib
import functools
import json
import time
from typing import Any, Iterator
from unittest import mock

from absl import app
from absl import flags
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import errors
from vqvae2_jax import sampling
from vqvae2_jax.data import idx_files

PROBES = ('none', 'project', 'temperature', 'class_discount')


def _define_flags():
  flags.DEFINE_string('pipeline', None, 'A workdir, an exported file or a '
                      'shipped name (Pipeline.load).')
  flags.DEFINE_list('probes', ['none'], 'Probes, each a row: none, '
                    'project:R, temperature:T0:T1, class_discount:D.')
  flags.DEFINE_integer('num_samples', 10000, 'Samples per row.')
  flags.DEFINE_integer('batch_size', 200, 'Maps drawn at once; must divide '
                       'each class\'s share of --num_samples.')
  flags.DEFINE_integer('seed', 0, 'The draws\' key, the same in every row.')
  flags.DEFINE_string('data_dir', None, 'The Fashion-MNIST .gz files for '
                      'the class frequencies (default: Debian\'s).')
  flags.DEFINE_string('out', '', 'JSON file for the rows.')
  return flags.FLAGS


def parse(probe: str) -> tuple[str, tuple[float, ...]]:
  """'temperature:1.1:1' -> ('temperature', (1.1, 1.0))."""
  name, *values = probe.split(':')
  if name not in PROBES or (name == 'none') != (not values):
    raise app.UsageError(f'--probes: {probe!r} is not one of none, '
                         'project:R, temperature:T0:T1, class_discount:D.')
  return name, tuple(float(v) for v in values)


@contextlib.contextmanager
def projected(pipe: api.Pipeline, rounds: int) -> Iterator[None]:
  """`pipe.decode` decodes, then encodes and decodes again `rounds` times."""
  decode = pipe.decode

  def project(codes):
    images = decode(codes)
    for _ in range(rounds):
      images = decode(pipe.encode(np.clip(images, -1.0, 1.0)))
    return images

  with mock.patch.object(pipe, 'decode', project):
    yield


@contextlib.contextmanager
def level_temperatures(temperatures: tuple[float, ...]) -> Iterator[None]:
  """Each level sampled at its own temperature (top first)."""
  sample_level = sampling.sample_level

  def at_level(*args, **kwargs):
    kwargs['temperature'] = temperatures[len(kwargs['cond_codes'])]
    return sample_level(*args, **kwargs)

  with mock.patch.object(sampling, 'sample_level', at_level):
    yield


def class_code_shares(codes: np.ndarray, labels: np.ndarray,
                      num_codes: int, num_classes: int) -> np.ndarray:
  """[classes, K] share of each code among each class's codes."""
  table = np.stack([
      np.bincount(codes[labels == c].ravel(), minlength=num_codes)
      for c in range(num_classes)]).astype(np.float64)
  if np.any(table.sum(1) == 0):
    raise errors.ConfigError('A class has no training codes. Fix: pass '
                             'codes of every class.')
  return table / table.sum(1, keepdims=True)


@contextlib.contextmanager
def class_discount(shares: np.ndarray, discount: float) -> Iterator[None]:
  """The lowest level's discount thresholds are `discount` * shares[class]
  of each batch's class (a batch must hold one class); levels above keep
  the discount they are given."""
  sample_hierarchy = sampling.sample_hierarchy

  def by_class(priors, level_shapes, *, labels, code_discount, **kwargs):
    classes = np.unique(np.asarray(labels))
    if len(classes) != 1:
      raise ValueError(f'A batch of classes {classes.tolist()}: the class '
                       'discount needs one class a batch (--batch_size).')
    code_discount = [*(code_discount or [None] * len(priors))]
    code_discount[-1] = sampling.frequency_discount(shares[classes[0]],
                                                    discount)
    return sample_hierarchy(priors, level_shapes, labels=labels,
                            code_discount=code_discount, **kwargs)

  with mock.patch.object(sampling, 'sample_hierarchy', by_class):
    yield


def training_shares(pipe: api.Pipeline, data_dir: str | None
                    ) -> np.ndarray:
  """`class_code_shares` of the lowest level's codes of Fashion-MNIST's
  training images under `pipe`'s stage 1."""
  images, labels = idx_files.read_split('fashion_mnist', 'train', data_dir,
                                        image_size=pipe.config.data.image_size)
  codes = np.concatenate([pipe.encode(images[i:i + 2000])[-1]
                          for i in range(0, len(images), 2000)])
  return class_code_shares(codes, labels, pipe.priors[-1][0].num_embeddings,
                           int(pipe.config.data.num_classes))


def probe_rows(pipe: api.Pipeline, probes: list[str], num_samples: int,
               seed: int, shares: Any = None, report=print) -> list[dict]:
  """One row per probe: `pipe.evaluate(num_samples, key=seed)` under it.
  `shares`: `class_code_shares`, for class_discount probes."""
  rows = []
  for probe in probes:
    name, values = parse(probe)
    context = {
        'none': contextlib.nullcontext,
        'project': lambda: projected(pipe, int(values[0])),
        'temperature': lambda: level_temperatures(values),
        'class_discount': lambda: class_discount(shares, values[0]),
    }[name]
    start = time.time()
    with context():
      samples = pipe.evaluate(num_samples, key=seed)['samples']
    row = {'probe': probe, 'seconds': time.time() - start,
           **{k: samples[k] for k in ('precision', 'recall', 'fid',
                                      'class_agreement', 'inception_score')
              if k in samples}}
    report(json.dumps(row))
    rows.append(row)
  return rows


def main(argv, flag_values):
  del argv
  f = {k: flag_values[k].value for k in ('pipeline', 'probes', 'num_samples',
                                         'batch_size', 'seed', 'data_dir',
                                         'out')}
  probes = [parse(p) for p in f['probes']]  # Refused before loading.
  pipe = api.Pipeline.load(f['pipeline'], require_priors=True)
  classes = int(pipe.config.data.num_classes)
  by_class = any(name == 'class_discount' for name, _ in probes)
  if by_class and not (classes and pipe.config.sampling.conditional):
    raise app.UsageError('class_discount needs a pipeline that samples by '
                         'class.')
  if f['num_samples'] % (max(classes, 1) * f['batch_size']):
    raise app.UsageError(
        f'--num_samples={f["num_samples"]} is not a whole number of batches '
        f'of --batch_size={f["batch_size"]} per class ({classes} classes).')
  pipe.config.sampling.batch_size = f['batch_size']
  shares = training_shares(pipe, f['data_dir']) if by_class else None
  rows = probe_rows(pipe, f['probes'], f['num_samples'], f['seed'], shares)
  if f['out']:
    with open(f['out'], 'w') as fh:
      json.dump({'pipeline': f['pipeline'], 'num_samples': f['num_samples'],
                 'batch_size': f['batch_size'], 'seed': f['seed'],
                 'rows': rows}, fh, indent=1, sort_keys=True)


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['pipeline'])
  app.run(functools.partial(main, flag_values=_flags))

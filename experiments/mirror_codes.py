r"""Adds the codes of mirrored training images to a workdir's training codes.

  python -m experiments.mirror_codes --workdir=W --classes=0,1,2,3,4,6,8

A data augmentation for the priors, measured in docs/results.md ("Which
prior loses the recall"): each training image of the given classes is
mirrored left to right, encoded by the workdir's stage 1, and its codes
(with its label) appended to workdir/codes/train, after the originals,
which keep their places (so the trainer's scoring of the first training
examples still scores real images). The held-out codes are untouched.
Fashion-MNIST's footwear (5 sandal, 7 sneaker, 9 ankle boot) all point
one way, so the default mirrors the other seven classes only.

W must hold a finished stage 1 and complete codes of it (--mode=codes),
and no priors yet: then train them with --mode=prior (not --mode=all or
--mode=codes, which would see codes other than the extraction's plan and
extract them again). The shards are rewritten through `codes.write_shard`
(atomic, with their digests), and the manifest records the classes
mirrored; a workdir already mirrored is refused.
"""

import functools
import glob
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import prior_attribution
from vqvae2_jax import api
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import codes as codes_lib

# Fashion-MNIST's classes whose images are about left-right symmetric.
SYMMETRIC_CLASSES = (0, 1, 2, 3, 4, 6, 8)
_MARK = 'mirrored_classes'


def _define_flags():
  """This script's flags (defined only when it runs)."""
  return {
      'workdir': flags.DEFINE_string(
          'workdir', None, 'A workdir with stage 1 and its codes.'),
      'classes': flags.DEFINE_list(
          'classes', [str(c) for c in SYMMETRIC_CLASSES],
          'The labels whose training images are mirrored.'),
  }


def training_images(pipe: api.Pipeline) -> tuple[np.ndarray, np.ndarray]:
  """The config's training images and labels, in the codes' order."""
  return prior_attribution.split_images(pipe, pipe.config.data.train_split)


def mirror_codes(workdir: str, classes: Sequence[int]) -> dict[str, Any]:
  """Appends the codes of the mirrored training images of `classes`.

  Returns:
    {'original', 'mirrored', 'num_examples', 'num_shards', 'classes',
    'changed': share of codes per level that mirroring changed}.

  Raises:
    errors.MissingStageError: no complete codes.
    errors.UserError: priors already trained, codes already mirrored, or
      training images that are not the codes' (other data, another
      stage 1).
  """
  wd = workdir_lib.Workdir(workdir)
  codes_dir = wd.codes
  # Refuses missing or incomplete codes, naming --mode=codes.
  dataset = codes_lib.CodeDataset(codes_dir, None)
  manifest = dataset.manifest
  if _MARK in manifest:
    raise errors.UserError(
        f'{codes_dir} already holds mirrored codes (classes '
        f'{manifest[_MARK]}). Fix: extract the codes again (delete '
        f'{codes_dir}, --mode=codes) to start over.')
  trained = [d for d in glob.glob(os.path.join(workdir, 'prior_*'))
             if os.path.isdir(d)]
  if trained:
    raise errors.UserError(
        f'{workdir} already has priors ({", ".join(sorted(trained))}), '
        'trained on the codes as they are. Fix: use a copy of the workdir '
        'without them.')
  train = dataset.split('train')
  n = train.num_examples
  # (A copy: the shards' files are replaced below.)
  records = np.concatenate([train.shard(i) for i in range(train.num_shards)])
  assert len(records) == n, (len(records), n)

  pipe = api.Pipeline.load(workdir, priors=False)
  images, labels = training_images(pipe)
  levels = [f'level_{i}' for i in range(len(dataset.num_embeddings))]
  # The images must be the codes' images, in their order: the first ones'
  # codes again, exactly.
  check = min(n, 256)
  again = pipe.encode(images[:check])
  if (len(images) != n or not np.array_equal(labels, records['label']) or
      any(not np.array_equal(np.asarray(c), records[k][:check])
          for c, k in zip(again, levels, strict=True))):
    raise errors.UserError(
        f'The training images of {workdir}\'s config are not the ones its '
        'codes were extracted from (other data or another stage 1). Fix: '
        'extract the codes again (--mode=codes) before mirroring.')

  keep = np.isin(labels, np.asarray(list(classes)))
  mirrored = images[keep][:, :, ::-1, :]
  codes = pipe.encode(mirrored)
  extra = np.zeros(len(mirrored), records.dtype)
  extra['label'] = labels[keep]
  for c, k in zip(codes, levels, strict=True):
    extra[k] = np.asarray(c)
  changed = [float(np.mean(extra[k] != records[k][keep])) for k in levels]

  merged = np.concatenate([records, extra])
  size = int(manifest['splits']['train']['shard_size'])
  num_shards = -(-len(merged) // size)
  # The new shards first, then the manifest that names them, and only then
  # the old shards go (their names carry the old count): a run killed
  # before the manifest leaves the extraction as it was.
  for i in range(num_shards):
    codes_lib.write_shard(
        codes_lib.shard_path(codes_dir, 'train', i, num_shards),
        merged[i * size:(i + 1) * size])
  for name in (codes_lib.PLAN, codes_lib.MANIFEST):
    path = os.path.join(codes_dir, name)
    described = files.read_json(path)
    described['splits']['train'].update(num_examples=len(merged),
                                         num_shards=num_shards)
    described[_MARK] = sorted(int(c) for c in classes)
    files.write_json(path, described)
  if num_shards != train.num_shards:
    old = [codes_lib.shard_name(i, train.num_shards)
           for i in range(train.num_shards)]
    for name in old:
      os.remove(os.path.join(codes_dir, 'train', name))
    digests = codes_lib.read_digests(codes_dir) or {}
    files.write_json(os.path.join(codes_dir, codes_lib.DIGESTS),
                     {k: v for k, v in digests.items()
                      if k not in {f'train/{name}' for name in old}})
  return {'original': n, 'mirrored': len(extra), 'num_examples': len(merged),
          'num_shards': num_shards, 'classes': sorted(int(c) for c in classes),
          'changed': changed}


def main(argv, flag_values):
  del argv
  result = mirror_codes(flag_values['workdir'].value,
                        [int(c) for c in flag_values['classes'].value])
  print(json.dumps(result))


if __name__ == '__main__':
  _flags = _define_flags()
  flags.mark_flags_as_required(['workdir'])
  app.run(functools.partial(main, flag_values=_flags))

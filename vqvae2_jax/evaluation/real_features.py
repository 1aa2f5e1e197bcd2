"""The real images' side of the sample metrics, saved once to a file.

`Pipeline.evaluate` scores samples against the ruler's features of the
whole held-out split and of the first training images (the real-vs-real
floor). Reading those images needs TensorFlow and the dataset; an
accelerator image often has neither. `Pipeline.write_real_features(path)`
records the ruler's outputs for the real images, batch by batch, where the
data can be read; `Pipeline.evaluate(real_features=path)` adds the same
batches back in the same order elsewhere, so its figures are the ones the
images themselves give, bit for bit.

The file (.npz, written atomically) holds, for each of 'held_out' and
'floor', the features, the class probabilities and the length of each
batch as the ruler scored it, and a JSON header: the ruler (its
description and digest, as the report records them), the dataset, the
splits and the version of this format. It is read with checks: a file of
another ruler or dataset, or with fewer floor images than samples asked
for, is refused with the fix.
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import json
import os
from typing import Any
import zipfile

import numpy as np

from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax.evaluation import metrics as metrics_lib

VERSION = 1
PARTS = ('held_out', 'floor')
# The header fields that must equal the evaluating pipeline's.
MATCHED = ('dataset', 'held_out_split', 'floor_split', 'features',
           'judge_sha256', 'classifier_fingerprint', 'classifier_step')

Batches = list[tuple[np.ndarray, np.ndarray]]


class RealFeaturesError(errors.UserError, ValueError):
  """A real-features file that is missing, damaged or of another ruler."""


def recorder(features_of):
  """(a FeatureFn that also keeps each batch it returns, that list)."""
  kept: Batches = []

  def record(images):
    f, p = features_of(images)
    kept.append((np.asarray(f), np.asarray(p)))
    return f, p

  return record, kept


def _lossless_float32(x: np.ndarray) -> np.ndarray:
  """x as float32 where that loses nothing (a float32 network's outputs,
  widened), else as it is."""
  narrow = x.astype(np.float32)
  return narrow if np.array_equal(narrow.astype(x.dtype), x) else x


def write(path: str, header: Mapping[str, Any],
          parts: Mapping[str, Batches]) -> None:
  """Writes the batches of each part in `PARTS` and `header` to `path`."""
  arrays = {}
  for part in PARTS:
    batches = parts[part]
    arrays[f'{part}_features'] = _lossless_float32(
        np.concatenate([f for f, _ in batches]))
    arrays[f'{part}_probs'] = _lossless_float32(
        np.concatenate([p for _, p in batches]))
    arrays[f'{part}_batches'] = np.asarray([len(f) for f, _ in batches],
                                           np.int64)
  header = {**header, 'version': VERSION}
  arrays['header'] = np.frombuffer(
      json.dumps(header, sort_keys=True).encode(), np.uint8)
  files.atomic_write(path, lambda f: np.savez(f, **arrays))


@contextlib.contextmanager
def _opened(path: str) -> Iterator[tuple[dict[str, Any], Any]]:
  """(the header, the npz) of a real-features file, closed on leaving; a
  missing, unreadable or other-version file is an error."""
  if not os.path.isfile(path):
    raise RealFeaturesError(
        f'No real-features file at {path}. Fix: write it where the dataset '
        'can be read, with Pipeline.write_real_features(path), and copy it '
        'here.')
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise _unreadable(path, e) from e
  with data:
    try:
      header = json.loads(bytes(data['header']).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise _unreadable(path, e) from e
    if header.get('version') != VERSION:
      raise RealFeaturesError(
          f'{path} is of format version {header.get("version")}, this code '
          f'reads {VERSION}. Fix: write it again with '
          'Pipeline.write_real_features(path).')
    yield header, data


def _unreadable(path: str, e: Exception) -> RealFeaturesError:
  return RealFeaturesError(
      f'{path} is not a readable real-features file ({e}). Fix: write it '
      'again with Pipeline.write_real_features(path).')


def load(path: str, expected: Mapping[str, Any], num_floor: int,
         max_features: int) -> tuple[metrics_lib.FeatureStats,
                                     metrics_lib.FeatureStats]:
  """(held-out stats, the floor's stats of its first `num_floor` images),
  as the ruler gave them when the file was written.

  expected: the evaluating pipeline's header fields (`MATCHED`); any that
  differ from the file's are named in the error.
  """
  expected = json.loads(json.dumps(dict(expected), sort_keys=True))
  with _opened(path) as (header, data):
    differ = [k for k in MATCHED if header.get(k) != expected.get(k)]
    if differ:
      shown = '; '.join(f'{k}: file {header.get(k)!r}, this pipeline '
                        f'{expected.get(k)!r}' for k in differ)
      raise RealFeaturesError(
          f'{path} holds the real images of another ruler or dataset '
          f'({shown}). Fix: write it with this pipeline and ruler '
          '(Pipeline.write_real_features).')
    have = int(np.sum(data['floor_batches']))
    if num_floor > have:
      raise RealFeaturesError(
          f'{path} holds the floor of {have} training images, and '
          f'{num_floor} samples were asked for (the floor has as many). '
          f'Fix: write it again with num_samples={num_floor} or more, or '
          f'evaluate at most {have} samples.')
    return (_replay(data, 'held_out', max_features, None),
            _replay(data, 'floor', num_floor, num_floor))


def _replay(data: Any, part: str, max_features: int,
            limit: int | None) -> metrics_lib.FeatureStats:
  """FeatureStats of one part, its batches added in their order (the first
  `limit` rows only, as `run.real_batches` cuts the floor)."""
  features, probs = data[f'{part}_features'], data[f'{part}_probs']
  stats = metrics_lib.FeatureStats(max_features=max_features)
  start = 0
  for length in _lengths(data[f'{part}_batches'], limit):
    stats.add(features[start:start + length].astype(np.float64),
              probs[start:start + length].astype(np.float64))
    start += length
  return stats


def _lengths(batches: Sequence[int], limit: int | None) -> list[int]:
  """The batch lengths, the last cut so that they sum to `limit`."""
  out, seen = [], 0
  for length in map(int, batches):
    if limit is not None:
      if seen >= limit:
        break
      length = min(length, limit - seen)
    out.append(length)
    seen += length
  return out

"""Extracted codes on disk: the format, its writer helpers and its readers.

Stage 2 trains on the integer codes of every image, extracted once by
`train.extract.extract_codes` into `workdir/codes/`:

  codes/
    plan.json          what is being extracted: the VQ-VAE (step, config
                       fingerprint, digest of its variables), level shapes,
                       K per level, and each split's size and sharding.
    train/00000-of-00006.npy ...   shards of the training split
    eval/00000-of-00001.npy  ...   shards of the held-out split
    digests.json       each shard's SHA-256, as its bytes were written:
                       {"train/00000-of-00006.npy": "<hex>", ...}
    manifest.json      a copy of plan.json, written last: the extraction is
                       complete exactly when this file exists.

A shard is a `.npy` file of structured records, one per example, in the
split's order: field 'label' (int32) and fields 'level_<i>' ([h_i, w_i]
unsigned ints, the smallest type that holds K-1). Each shard is written to a
temporary name and renamed when complete, so a killed extraction never leaves
a partial file under a final name; a rerun with the same plan keeps the
finished shards. Readers memory-map the shards, so a split larger than memory
streams from disk, and they refuse codes whose VQ-VAE differs from the
current stage-1 checkpoint.

Every shard's digest is recorded when it is written and checked whenever the
codes are read, or found complete by `--mode=codes`: a damaged shard (a
flipped byte, truncated, emptied, removed) is refused in one line naming it
(`CodeShardDamagedError`), and `--mode=codes` extracts it again. A shard on
disk without a recorded digest (a kill between its rename and the record) is
extracted again too. Extractions made before digests existed (no
digests.json) are read with one warning, unverified: their provenance is
still checked, and deleting workdir/codes gets them verified.

Files are plain local (or network-mounted) paths, written by process 0; on a
multi-host set-up `workdir` must be on a filesystem every host sees.

The batches that stage 2 trains on are made from these readers by
`data.code_iterators`.
"""

from collections.abc import Mapping, Sequence
import hashlib
import os
from typing import Any

from absl import logging
import numpy as np

from vqvae2_jax import errors
from vqvae2_jax import files

FORMAT_VERSION = 1
PLAN = 'plan.json'
MANIFEST = 'manifest.json'
DIGESTS = 'digests.json'
SPLITS = ('train', 'eval')  # The roles; the source split names are in the plan.
# The temporary name `files.atomic_write` gives a file until it is complete.
_TMP_SUFFIX = '.tmp'


def code_dtype(num_embeddings: int) -> np.dtype:
  """The smallest unsigned integer type that holds codes 0..K-1."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if num_embeddings - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f'num_embeddings={num_embeddings} is too large.')


def record_dtype(level_shapes: Sequence[Sequence[int]],
                 num_embeddings: Sequence[int]) -> np.dtype:
  """The structured dtype of one example: its label and each level's codes."""
  fields = [('label', '<i4')]
  for i, (shape, k) in enumerate(zip(level_shapes, num_embeddings)):
    fields.append((f'level_{i}', code_dtype(k).newbyteorder('<'), tuple(shape)))
  return np.dtype(fields)


def make_records(codes: Sequence[np.ndarray], labels: np.ndarray,
                 num_embeddings: Sequence[int]) -> np.ndarray:
  """Packs code maps and labels into records for `write_shard`.

  Args:
    codes: per level (top first), int [n, h_i, w_i] with values in [0, K_i).
    labels: int [n].
    num_embeddings: K of each level.

  Returns:
    A structured array [n] of `record_dtype`.
  """
  codes = [np.asarray(c) for c in codes]
  shapes = [c.shape[1:] for c in codes]
  records = np.zeros(len(labels), record_dtype(shapes, num_embeddings))
  records['label'] = labels
  for i, (c, k) in enumerate(zip(codes, num_embeddings)):
    if c.size and (c.min() < 0 or c.max() >= k):
      raise ValueError(f'Level {i} codes outside [0, {k}).')
    records[f'level_{i}'] = c
  return records


def shard_name(index: int, num_shards: int) -> str:
  return f'{index:05d}-of-{num_shards:05d}.npy'


def shard_path(codes_dir: str, split: str, index: int, num_shards: int) -> str:
  return os.path.join(codes_dir, split, shard_name(index, num_shards))


def write_shard(path: str, records: np.ndarray) -> None:
  """Writes one shard atomically (temporary file, fsync, rename).

  The SHA-256 of the bytes written is then recorded in the codes
  directory's digests.json (`path` is <codes dir>/<split>/<name>); a shard
  renamed but not yet recorded counts as not written (`prepare_directory`).
  """
  digest = hashlib.sha256()
  files.atomic_write(path, lambda f: np.save(
      files.HashingWriter(f, digest), records, allow_pickle=False))
  split_dir, name = os.path.split(os.path.abspath(path))
  codes_dir, role = os.path.split(split_dir)
  recorded = read_digests(codes_dir) or {}
  recorded[f'{role}/{name}'] = digest.hexdigest()
  files.write_json(os.path.join(codes_dir, DIGESTS), recorded)


def read_digests(codes_dir: str) -> dict[str, str] | None:
  """{'<split>/<shard name>': sha256 hex} recorded so far; None if no file.

  A damaged digests.json records nothing ({}): every shard then counts as
  unverified and is refused by readers and extracted again.
  """
  try:
    return files.read_json(os.path.join(codes_dir, DIGESTS))
  except ValueError:
    return {}


class CodeShardDamagedError(errors.UserError, ValueError):
  """A code shard whose bytes are not those written (or that is missing)."""


def check_shard(codes_dir: str, role: str, index: int, num_shards: int,
                digests: Mapping[str, str]) -> None:
  """Refuses a shard whose SHA-256 differs from the one recorded for it.

  Args:
    codes_dir: workdir/codes.
    role, index, num_shards: which shard.
    digests: from `read_digests`.

  Raises:
    CodeShardDamagedError: naming the file; missing, unreadable, or damaged.
  """
  path = shard_path(codes_dir, role, index, num_shards)
  key = f'{role}/{shard_name(index, num_shards)}'
  fix = ('Fix: run --mode=codes with the same --config and --workdir; it '
         'extracts the damaged shard again.')
  try:
    actual = files.sha256_file(path)
  except OSError as e:
    raise CodeShardDamagedError(
        f'Code shard {path} cannot be read ({e.strerror or e}). {fix}') from e
  if key not in digests:
    raise CodeShardDamagedError(
        f'Code shard {path} has no recorded digest in {DIGESTS} (its write '
        f'was interrupted). {fix}')
  if actual != digests[key]:
    raise CodeShardDamagedError(
        f'Code shard {path} is damaged: its SHA-256 differs from the one '
        f'recorded when it was written ({os.path.getsize(path)} bytes now). '
        f'{fix}')


def _shard_intact(codes_dir: str, role: str, index: int, num_shards: int,
                  digests: Mapping[str, str] | None) -> bool:
  """Whether the shard is on disk and (where digests exist) intact."""
  if not os.path.exists(shard_path(codes_dir, role, index, num_shards)):
    return False
  if digests is None:
    return True  # An extraction of before digests: unverified.
  try:
    check_shard(codes_dir, role, index, num_shards, digests)
  except CodeShardDamagedError as e:
    logging.warning('%s', str(e).split(' Fix: ')[0])
    return False
  return True


def make_plan(*, vqvae: Mapping[str, Any], level_shapes: Sequence[Sequence[int]],
              num_embeddings: Sequence[int], num_classes: int,
              splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The description of an extraction (and, once complete, its manifest).

  Args:
    vqvae: provenance of the codes: {'step', 'fingerprint', 'digest'} (see
      `train.extract.vqvae_provenance`).
    level_shapes: [h, w] of each level's code map, top first.
    num_embeddings: K of each level.
    num_classes: labels are in [0, num_classes) (0: unlabelled).
    splits: role ('train'/'eval') -> {'source': the data split's name,
      'num_examples': int, 'shard_size': examples per shard}.

  Returns:
    The plan as a JSON-compatible dict.
  """
  split_info = {}
  for role, info in splits.items():
    n, size = int(info['num_examples']), int(info['shard_size'])
    if n < 1 or size < 1:
      raise ValueError(f'Split {role!r}: {n} examples, shard size {size}.')
    split_info[role] = {'source': str(info['source']), 'num_examples': n,
                        'shard_size': size, 'num_shards': -(-n // size)}
  return files.normalise_json({
      'format_version': FORMAT_VERSION, 'vqvae': dict(vqvae),
      'level_shapes': [list(s) for s in level_shapes],
      'num_embeddings': list(num_embeddings), 'num_classes': int(num_classes),
      'splits': split_info})


def prepare_directory(codes_dir: str, plan: Mapping[str, Any]
                      ) -> dict[str, list[int]]:
  """Gets `codes_dir` ready to extract `plan`; returns the shards still to do.

  Temporary files of a killed run are removed. When the directory holds an
  extraction of another plan (e.g. the VQ-VAE trained further since), its
  manifest and shards are deleted first, so that nothing stale survives.

  Args:
    codes_dir: workdir/codes.
    plan: from `make_plan`.

  Returns:
    role -> indices of the shards not yet on disk (all of them, at first).
  """
  plan = files.normalise_json(plan)
  os.makedirs(codes_dir, exist_ok=True)
  old = files.read_json(os.path.join(codes_dir, PLAN))
  if old != plan and os.path.exists(os.path.join(codes_dir, DIGESTS)):
    os.remove(os.path.join(codes_dir, DIGESTS))
  for role in SPLITS:
    split_dir = os.path.join(codes_dir, role)
    if not os.path.isdir(split_dir):
      continue
    for name in os.listdir(split_dir):
      if name.endswith(_TMP_SUFFIX) or old != plan:
        os.remove(os.path.join(split_dir, name))
  if old != plan:
    if old is not None:
      logging.info('Codes in %s are from another extraction plan (VQ-VAE '
                   'step %s); extracting again.', codes_dir,
                   old.get('vqvae', {}).get('step'))
    manifest = os.path.join(codes_dir, MANIFEST)
    if os.path.exists(manifest):
      os.remove(manifest)
    files.write_json(os.path.join(codes_dir, PLAN), plan)
  # A shard counts as written when its recorded digest matches: a damaged
  # one (or one killed before its digest was recorded) is written again.
  digests = read_digests(codes_dir) or {}
  todo = {}
  for role, info in plan['splits'].items():
    n = info['num_shards']
    todo[role] = [i for i in range(n)
                  if not _shard_intact(codes_dir, role, i, n, digests)]
    for i in todo[role]:
      path = shard_path(codes_dir, role, i, n)
      if os.path.exists(path):
        os.remove(path)
  return todo


def is_complete(codes_dir: str, plan: Mapping[str, Any]) -> bool:
  """Whether `codes_dir` holds a finished, intact extraction of `plan`.

  Reads only (a finished extraction may sit in a read-only workdir). Every
  shard's digest is checked; a damaged one is named in a warning and makes
  the extraction incomplete, so that `--mode=codes` writes it again.
  """
  plan = files.normalise_json(plan)
  if (files.read_json(os.path.join(codes_dir, PLAN)) != plan or
      not os.path.exists(os.path.join(codes_dir, MANIFEST))):
    return False
  digests = read_digests(codes_dir)
  if digests is None:
    _warn_unverified(codes_dir)
  # Not all(...) of a generator: every damaged shard is named.
  return all([_shard_intact(codes_dir, role, i, info['num_shards'], digests)
              for role, info in plan['splits'].items()
              for i in range(info['num_shards'])])


_WARNED_UNVERIFIED: set[str] = set()


def _warn_unverified(codes_dir: str) -> None:
  """One warning per directory: codes of before digests are not verified."""
  if codes_dir in _WARNED_UNVERIFIED:
    return
  _WARNED_UNVERIFIED.add(codes_dir)
  logging.warning(
      'Codes in %s have no %s (extracted by an earlier version): their '
      'shards are used unverified. To verify them, delete that directory '
      'and run --mode=codes again.', codes_dir, DIGESTS)


def count_shards(codes_dir: str, plan: Mapping[str, Any]) -> int:
  """How many of `plan`'s shards are on disk (each is whole: atomic writes)."""
  return sum(os.path.exists(shard_path(codes_dir, role, i, info['num_shards']))
             for role, info in files.normalise_json(plan)['splits'].items()
             for i in range(info['num_shards']))


def missing_bytes(codes_dir: str, plan: Mapping[str, Any]) -> int:
  """About how many bytes `plan`'s shards not yet on disk take."""
  plan = files.normalise_json(plan)
  itemsize = record_dtype(plan['level_shapes'],
                          plan['num_embeddings']).itemsize
  total = 0
  for role, info in plan['splits'].items():
    n, size = info['num_examples'], info['shard_size']
    for i in range(info['num_shards']):
      if not os.path.exists(shard_path(codes_dir, role, i,
                                       info['num_shards'])):
        total += 128 + itemsize * min(size, n - i * size)  # Header, records.
  return total


def finalize(codes_dir: str, plan: Mapping[str, Any]) -> None:
  """Marks the extraction complete by writing the manifest (last)."""
  digests = read_digests(codes_dir) or {}
  for role, info in files.normalise_json(plan)['splits'].items():
    n = info['num_shards']
    missing = [i for i in range(n)
               if not os.path.exists(shard_path(codes_dir, role, i, n)) or
               f'{role}/{shard_name(i, n)}' not in digests]
    if missing:
      raise RuntimeError(f'Cannot finalize {codes_dir}: split {role!r} lacks '
                         f'shards {missing}.')
  files.write_json(os.path.join(codes_dir, MANIFEST), plan)


class CodesError(errors.UserError, ValueError):
  """Extracted codes that cannot be used: damaged, or of another format.

  Also a ValueError, for callers that catch those.
  """


class CodesMismatchError(CodesError):
  """The extracted codes come from a different VQ-VAE than the current one."""


def read_manifest(codes_dir: str) -> dict[str, Any]:
  """The manifest of a complete extraction.

  Raises:
    errors.MissingStageError: no complete extraction in `codes_dir`.
    CodesError: the extraction has another format version.
  """
  manifest = files.read_json(os.path.join(codes_dir, MANIFEST))
  if manifest is None:
    partial = os.path.exists(os.path.join(codes_dir, PLAN))
    raise errors.MissingStageError(
        f'No complete code extraction in {codes_dir}'
        f'{" (an extraction was started but did not finish)" if partial else ""}'
        '. Fix: run --mode=codes with the same --config and --workdir.')
  if manifest.get('format_version') != FORMAT_VERSION:
    raise CodesError(
        f'Codes in {codes_dir} have format version '
        f'{manifest.get("format_version")}, this code reads {FORMAT_VERSION}. '
        'Fix: delete that directory and run --mode=codes again.')
  return manifest


def check_provenance(manifest: Mapping[str, Any], vqvae: Mapping[str, Any],
                     codes_dir: str) -> None:
  """Refuses codes extracted by a VQ-VAE other than `vqvae`.

  Args:
    manifest: from `read_manifest`.
    vqvae: the current stage-1 checkpoint's {'step', 'fingerprint', 'digest'}.
    codes_dir: for the message.

  Raises:
    CodesMismatchError: naming what differs and the fix.
  """
  recorded = files.normalise_json(manifest['vqvae'])
  current = files.normalise_json(vqvae)
  if recorded == current:
    return
  diffs = []
  for key in sorted(set(recorded) | set(current)):
    old, new = recorded.get(key), current.get(key)
    if old == new:
      continue
    if key == 'fingerprint' and isinstance(old, dict) and isinstance(new, dict):
      fields = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
      diffs.append(f'config fields {fields}')
    elif key == 'digest':
      diffs.append('weights (digest)')
    else:
      diffs.append(f'{key}: codes {old!r}, checkpoint {new!r}')
  raise CodesMismatchError(
      f'The codes in {codes_dir} were extracted with a different VQ-VAE than '
      f'the current stage-1 checkpoint (VQ-VAE step {current.get("step")}); '
      f'differs in: {"; ".join(diffs)}. Fix: re-run --mode=codes with this '
      '--workdir to extract codes from the current VQ-VAE.')


class CodeSplit:
  """Random access to one split's codes, memory-mapped from its shards."""

  def __init__(self, codes_dir: str, role: str, manifest: Mapping[str, Any]):
    info = manifest['splits'][role]
    self.role = role
    self.source = info['source']
    self.num_examples = int(info['num_examples'])
    self.level_shapes = [tuple(s) for s in manifest['level_shapes']]
    self.num_embeddings = list(manifest['num_embeddings'])
    self._shard_size = int(info['shard_size'])
    num_shards = int(info['num_shards'])
    expected = record_dtype(self.level_shapes, self.num_embeddings)
    digests = read_digests(codes_dir)
    if digests is None:
      _warn_unverified(codes_dir)
    self._shards = []
    for i in range(num_shards):
      path = shard_path(codes_dir, role, i, num_shards)
      size = min(self._shard_size, self.num_examples - i * self._shard_size)
      if digests is not None:
        check_shard(codes_dir, role, i, num_shards, digests)
      try:
        shard = np.load(path, mmap_mode='r', allow_pickle=False)
      except (OSError, ValueError, EOFError) as e:
        # (An empty file is an EOFError.)
        raise CodesError(f'Cannot read code shard {path} ({e}). Fix: delete '
                         f'{codes_dir} and run --mode=codes again.') from e
      if shard.dtype != expected or shard.shape != (size,):
        raise CodesError(
            f'Code shard {path} holds {shard.shape} records of {shard.dtype}, '
            f'the manifest says ({size},) of {expected}. Fix: delete '
            f'{codes_dir} and run --mode=codes again.')
      self._shards.append(shard)

  @property
  def num_levels(self) -> int:
    return len(self.level_shapes)

  @property
  def num_shards(self) -> int:
    return len(self._shards)

  def shard(self, index: int) -> np.ndarray:
    """The records of shard `index` as stored: [shard size] of `record_dtype`.

    A read-only memory map; `read` is the way to get examples in int32.
    """
    return self._shards[index]

  def read(self, indices: np.ndarray, levels: Sequence[int]
           ) -> dict[str, Any]:
    """Examples at `indices` (any order, repeats allowed).

    Args:
      indices: int [n] in [0, num_examples).
      levels: which levels' codes to return, e.g. (0, 1).

    Returns:
      {'codes': [int32 [n, h_l, w_l] for l in levels], 'label': int32 [n]}.
    """
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0
                         or indices.max() >= self.num_examples):
      raise IndexError(f'Indices outside [0, {self.num_examples}).')
    shard_of, offset = np.divmod(indices, self._shard_size)
    out = {'label': np.zeros(len(indices), np.int32)}
    for level in levels:
      out[level] = np.zeros((len(indices), *self.level_shapes[level]), np.int32)
    for s in np.unique(shard_of):
      where = np.nonzero(shard_of == s)[0]
      # Sorted reads touch each page of the memory map once.
      order = np.argsort(offset[where], kind='stable')
      records = self._shards[s][offset[where][order]]
      out['label'][where[order]] = records['label']
      for level in levels:
        out[level][where[order]] = records[f'level_{level}']
    return {'codes': [out[level] for level in levels], 'label': out['label']}


class CodeDataset:
  """A complete, provenance-checked extraction in workdir/codes."""

  def __init__(self, codes_dir: str, vqvae: Mapping[str, Any] | None):
    """Opens `codes_dir`.

    Args:
      codes_dir: workdir/codes.
      vqvae: the current stage-1 checkpoint's provenance; None skips the
        check (only for inspecting codes without a VQ-VAE at hand).

    Raises:
      errors.MissingStageError: the extraction is missing or incomplete.
      CodesMismatchError: it was made with another VQ-VAE.
    """
    self.codes_dir = codes_dir
    self.manifest = read_manifest(codes_dir)
    if vqvae is not None:
      check_provenance(self.manifest, vqvae, codes_dir)
    self.level_shapes = [tuple(s) for s in self.manifest['level_shapes']]
    self.num_embeddings = list(self.manifest['num_embeddings'])
    self.num_classes = int(self.manifest['num_classes'])
    self._splits = {}

  def split(self, role: str) -> CodeSplit:
    if role not in self.manifest['splits']:
      raise KeyError(f'No split {role!r} in {self.codes_dir}; it has '
                     f'{sorted(self.manifest["splits"])}.')
    if role not in self._splits:
      self._splits[role] = CodeSplit(self.codes_dir, role, self.manifest)
    return self._splits[role]

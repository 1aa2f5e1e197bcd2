"""Input pipelines: tfds datasets and image folders as sharded global batches.

Batches are dicts of global `jax.Array`s sharded over the mesh's data axes
(`parallel.data_sharding`):
  'image': float32 [batch, size, size, channels] in [-1, 1],
  'label': int32 [batch] (0 everywhere when data.num_classes == 0),
  'mask':  bool [batch], eval batches only (False on padding).

Each process reads its own share of a split (`tfds.split_for_jax_process`,
the same rule for image folders) and contributes `global_batch /
process_count` examples per batch. Training reads the split as
`data.input_streams` streams (0: one per process): stream i is share i of
that many, with its own shuffle buffer and seed, and contributes
`global_batch / streams` examples to every batch; each process reads its
consecutive streams. The batches are hence the same for any number of
processes that divides the streams (a job on 2 hosts trains as on 1, and
resumes on either). Decoding and preprocessing (resize and
centre crop, or padding 28 -> 32 for the MNIST family; channel conversion;
random flips; uint8 -> float) run inside tf.data.

Order, determinism and resume. A training stream is a sequence of epochs
over its share. Epoch e is the share in storage order shuffled by a buffer
seeded with (seed, stream, e) (for image folders: a
full permutation of the file indices). The batch at step s holds stream
positions [s * b, (s + 1) * b) with b the per-stream batch, so a restart at
step N starts epoch N * b // share_size and skips N * b % share_size
elements of it before anything is parsed or decoded: restarting costs
reading at most one epoch of serialized records per stream (Fashion-MNIST:
well under a second; image folders: nothing, their records are file
indices), never decoding N batches. Random flips are a stateless function of (seed,
position). Hence `create_train_iterator(..., start_step=N)` yields exactly
what an uninterrupted run yields from step N, for a given number of
streams.
"""

import atexit
import collections
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Iterator
import weakref

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import parallel
from vqvae2_jax.data import image_folder
from vqvae2_jax.data import layout
from vqvae2_jax.data import tfds_prepare

tf = console.tensorflow()  # Quietly, and off GPUs and TPUs.
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,g-bad-import-order

Batch = dict[str, jax.Array]

_DEVICE_PREFETCH = 2  # Batches laid out on the devices ahead of use.
_FOREVER = 2**62  # "Infinitely many" epochs for tf.data.Dataset.range.
_READ_BUFFER_BYTES = 8 << 20  # Per TFRecord file being read.


@dataclasses.dataclass(frozen=True)
class _Source:
  """A process's share of a split as cheap, undecoded records.

  Attributes:
    records: finite, ordered dataset of undecoded elements.
    num_local: elements in `records`.
    num_total: examples in the whole split (all processes).
    decode: element -> (uint8 image [h, w, c], int32 label), in graph mode.
    pad_small: pad (not resize) images smaller than the target size.
    buffer_size: shuffle buffer for training epochs.
  """
  records: tf.data.Dataset
  num_local: int
  num_total: int
  decode: Callable[[Any], tuple[tf.Tensor, tf.Tensor]]
  pad_small: bool
  buffer_size: int


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` (all processes together)."""
  if data_config.name == 'image_folder':
    return len(image_folder.load_split(
        data_config.image_folder, split, int(data_config.num_classes),
        int(data_config.get('max_image_pixels', 0))))
  builder = tfds_prepare.prepare_builder(data_config)
  return builder.info.splits[split].num_examples


def local_num_examples(data_config: ml_collections.ConfigDict, split: str,
                       *, train: bool) -> int:
  """Examples of `split` that this process reads (`layout.process_range`).

  Args:
    data_config: the config's `data` section.
    split: the split's name.
    train: the share of training (remainder dropped) or of evaluation.

  Returns:
    The size of this process's share; `num_examples` is the whole split's.
  """
  return _source(data_config, split, train=train).num_local


def create_train_iterator(data_config: ml_collections.ConfigDict, *,
                          global_batch_size: int, mesh: Mesh, seed: int,
                          start_step: int = 0) -> Iterator[Batch]:
  """Infinite, shuffled training batches, resumable at any step.

  Args:
    data_config: the config's `data` section.
    global_batch_size: examples per batch over all processes; must divide by
      the number of devices in `mesh`.
    mesh: batches are sharded with `parallel.data_sharding(mesh)`.
    seed: seeds the order and the random flips.
    start_step: number of batches an earlier run already consumed.

  Returns:
    An iterator of {'image': float32 [B, S, S, C] in [-1, 1],
    'label': int32 [B]} global arrays; the same for the same arguments, and
    with `start_step=N` the continuation of the stream after N batches.
  """
  local_batch = _local_batch_size(global_batch_size, mesh)
  streams = train_streams(data_config)
  stream_batch = _stream_batch_size(global_batch_size, streams)
  mine = streams // jax.process_count()
  first_stream = jax.process_index() * mine
  parts = [_train_stream(data_config, index, streams,
                         stream_batch=stream_batch, seed=seed,
                         start_step=start_step)
           for index in range(first_stream, first_stream + mine)]
  if len(parts) == 1:
    ds = parts[0]
  else:  # This process's rows of a batch: its streams' parts in order.
    ds = tf.data.Dataset.zip(tuple(parts)).map(
        lambda *batches: tuple(tf.concat(t, axis=0) for t in zip(*batches)))
  logging.info('Train input: %r as %d stream(s), %d on this process; batch '
               '%d per process, starting at step %d.',
               data_config.train_split, streams, mine, local_batch,
               start_step)
  return _global_batches(
      _finish(ds), mesh,
      _source_description(data_config, data_config.train_split))


def train_streams(data_config: ml_collections.ConfigDict) -> int:
  """The number of training input streams: `data.input_streams` (0: one per
  process); a multiple of the number of processes."""
  streams = int(data_config.get('input_streams', 0)) or jax.process_count()
  if streams % jax.process_count():
    raise errors.ConfigError(
        f'config.data.input_streams is {streams}, not a multiple of the '
        f'{jax.process_count()} processes. Fix: use a multiple of '
        f'{jax.process_count()} (or 0, one stream per process).')
  return streams


def _stream_batch_size(global_batch_size: int, streams: int) -> int:
  if global_batch_size % streams:
    raise errors.ConfigError(
        f'Global batch size {global_batch_size} does not divide by the '
        f'{streams} input streams (config.data.input_streams). Fix: use a '
        f'batch size that is a multiple of {streams}, or fewer streams.')
  return global_batch_size // streams


def _train_stream(data_config: ml_collections.ConfigDict, index: int,
                  count: int, *, stream_batch: int, seed: int,
                  start_step: int) -> tf.data.Dataset:
  """Batches of `stream_batch` from input stream `index` of `count`.

  The stream reads share `index` of `count` of the training split; its
  order and flips depend on (seed, index) only (see the module docstring).
  """
  source = _source(data_config, data_config.train_split, train=True,
                   share=(index, count))
  if source.num_local < stream_batch:
    raise errors.ConfigError(
        f'Split {data_config.train_split!r} has {source.num_local} examples '
        f'per input stream, fewer than the per-stream batch {stream_batch}. '
        'Fix: lower the batch size or use a larger split.')
  seed = _mix(seed, index)
  first = int(start_step) * stream_batch
  start_epoch, offset = divmod(first, source.num_local)

  def epoch(e):
    return source.records.shuffle(
        source.buffer_size, seed=_mix_tf(seed, e),
        reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch)
  ds = ds.skip(offset).enumerate(first)  # Position in the stream.
  preprocess = _preprocess_fn(data_config, source.pad_small,
                              flip_seed=seed if data_config.random_flip
                              else None)
  ds = ds.map(lambda pos, element: preprocess(*source.decode(element), pos),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  logging.info('Input stream %d of %d: %d examples, epoch %d, offset %d.',
               index, count, source.num_local, start_epoch, offset)
  return ds.batch(stream_batch, drop_remainder=True)


def create_eval_iterator(data_config: ml_collections.ConfigDict, *,
                         split: str | None = None, global_batch_size: int,
                         mesh: Mesh) -> Iterator[Batch]:
  """One ordered pass over `split` (default `data_config.eval_split`).

  No shuffling or flipping. The last batch is padded with zero images whose
  'mask' is False; every process yields the same number of batches.

  Args:
    data_config: the config's `data` section.
    split: split to read; None for `data_config.eval_split`.
    global_batch_size: examples per batch over all processes; must divide by
      the number of devices in `mesh`.
    mesh: batches are sharded with `parallel.data_sharding(mesh)`.

  Returns:
    A finite iterator of {'image': float32 [B, S, S, C], 'label': int32 [B],
    'mask': bool [B]} global arrays.
  """
  split = data_config.eval_split if split is None else split
  local_batch = _local_batch_size(global_batch_size, mesh)
  source = _source(data_config, split, train=False)
  # Shares differ by at most one example; all processes pad to the largest.
  per_process = -(-source.num_total // jax.process_count())
  num_batches = max(1, -(-per_process // local_batch))
  preprocess = _preprocess_fn(data_config, source.pad_small, flip_seed=None)

  def real(element):
    image, label = preprocess(*source.decode(element), 0)
    return image, label, True

  ds = source.records.map(real, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
  size, channels = int(data_config.image_size), int(data_config.channels)
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros([size, size, channels], tf.float32), tf.constant(0, tf.int32),
       False)).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda image, label, mask: {'image': image, 'label': label,
                                          'mask': mask})
  return _global_batches(_finish(ds), mesh,
                         _source_description(data_config, split))


def _local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The per-process share of a global batch, after divisibility checks."""
  num_devices = parallel.num_batch_shards(mesh)
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise errors.ConfigError(
        f'Global batch size {global_batch_size} does not divide by the '
        f'{num_devices} devices of the mesh. Fix: use a multiple of '
        f'{num_devices} for the batch size.')
  if global_batch_size % jax.process_count():
    raise ValueError(
        f'Global batch size {global_batch_size} does not divide by the '
        f'{jax.process_count()} processes.')
  return global_batch_size // jax.process_count()


def _mix(seed: int, value: int) -> int:
  """A 31-bit seed from (seed, value), different for each pair."""
  digest = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(value)])
  return int(digest.generate_state(1)[0] & 0x7FFFFFFF)


def _mix_tf(seed: int, value: tf.Tensor) -> tf.Tensor:
  """tf.int64 seed from a Python seed and a tensor (epoch), in graph mode."""
  return (tf.cast(value, tf.int64) * 1_000_003 + seed) % (2**31 - 1)


def _source(data_config: ml_collections.ConfigDict, split: str, *,
            train: bool, share: tuple[int, int] | None = None) -> _Source:
  """Share `share` = (index, count) of `split`; None: this process's."""
  if share is None:
    share = (jax.process_index(), jax.process_count())
  if data_config.name == 'image_folder':
    return _folder_source(data_config, split, train=train, share=share)
  return _tfds_source(data_config, split, train=train, share=share)


def _tfds_source(data_config: ml_collections.ConfigDict, split: str, *,
                 train: bool, share: tuple[int, int]) -> _Source:
  """Share (index, count) of a tfds split, as serialized records."""
  builder = tfds_prepare.prepare_builder(data_config)
  features = builder.info.features
  image_key = _image_key(features, builder.name)
  has_label = _check_labels(features, data_config, builder.name)
  share = tfds.split_for_jax_process(split, process_index=share[0],
                                     process_count=share[1],
                                     drop_remainder=train)
  skip_decoding = {image_key: tfds.decode.SkipDecoding()}
  records = _serialized_records(builder, share)
  if records is None:  # Not TFRecord files: let tfds read (and parse) them.
    records = builder.as_dataset(
        split=share, shuffle_files=False, decoders=skip_decoding,
        read_config=tfds.ReadConfig(try_autocache=False))
    parse = lambda element: element
  else:
    parse = functools.partial(features.deserialize_example,
                              decoders=skip_decoding)
  image_feature = features[image_key]

  def decode(record):
    element = parse(record)
    image = image_feature.decode_example(element[image_key])
    if has_label:
      label = tf.cast(element['label'], tf.int32)
    else:
      label = tf.constant(0, tf.int32)
    return image, label

  return _Source(records=records,
                 num_local=builder.info.splits[share].num_examples,
                 num_total=builder.info.splits[split].num_examples,
                 decode=decode,
                 pad_small=builder.name in layout.PAD_DATASETS,
                 buffer_size=max(1, int(data_config.shuffle_buffer)))


def _serialized_records(builder: tfds.core.DatasetBuilder, share
                        ) -> tf.data.Dataset | None:
  """The share's records, unparsed, in a fixed order; None if not TFRecord.

  Shuffling and skipping (on resume) act on these strings, which is some 30
  times faster than on the parsed examples `as_dataset` yields.
  """
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    return None
  instructions = builder.info.splits[share].file_instructions
  filenames = [os.fspath(i.filename) if os.path.isabs(os.fspath(i.filename))
               else os.path.join(builder.data_dir, os.fspath(i.filename))
               for i in instructions]
  files = tf.data.Dataset.from_tensor_slices(
      (filenames, np.asarray([i.skip for i in instructions], np.int64),
       np.asarray([i.take for i in instructions], np.int64)))

  def read(filename, skip, take):
    return tf.data.TFRecordDataset(
        filename, buffer_size=_READ_BUFFER_BYTES).skip(skip).take(take)

  # Round-robin over up to 16 files at once: parallel reads, fixed order.
  return files.interleave(read, cycle_length=min(16, len(filenames)),
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)


def _image_key(features, name: str) -> str:
  if 'image' in features and isinstance(features['image'],
                                        tfds.features.Image):
    return 'image'
  for key, feature in features.items():
    if isinstance(feature, tfds.features.Image):
      return key
  raise errors.ConfigError(f'tfds dataset {name!r} has no image feature '
                           f'({list(features)}). Fix: use an image dataset.')


def _check_labels(features, data_config: ml_collections.ConfigDict,
                  name: str) -> bool:
  """Whether labels are read; raises when they contradict num_classes."""
  num_classes = int(data_config.num_classes)
  if num_classes == 0:
    return False
  label = features['label'] if 'label' in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise errors.ConfigError(
        f'config.data.num_classes is {num_classes} but tfds dataset {name!r} '
        'has no class label. Fix: set --config.data.num_classes=0.')
  if label.num_classes != num_classes:
    raise errors.ConfigError(
        f'config.data.num_classes is {num_classes} but tfds dataset {name!r} '
        f'has {label.num_classes} classes. Fix: set '
        f'--config.data.num_classes={label.num_classes}.')
  return True


def _folder_source(data_config: ml_collections.ConfigDict, split: str, *,
                   train: bool, share: tuple[int, int]) -> _Source:
  """Share (index, count) of an image folder split, as file indices."""
  folder = image_folder.load_split(
      data_config.image_folder, split, int(data_config.num_classes),
      int(data_config.get('max_image_pixels', 0)))
  start, stop = layout.process_range(len(folder), drop_remainder=train,
                                     share=share)
  reader = image_folder.SafeReader(folder.paths[start:stop],
                                   int(data_config.channels),
                                   min_size=int(data_config.image_size))
  labels = tf.constant(folder.labels[start:stop], tf.int32)
  channels = int(data_config.channels)

  def decode(index):
    image = tf.numpy_function(reader, [index], tf.uint8, stateful=False)
    image.set_shape([None, None, channels])
    return image, tf.gather(labels, index)

  num_local = stop - start
  return _Source(records=tf.data.Dataset.range(num_local),
                 num_local=num_local, num_total=len(folder), decode=decode,
                 pad_small=False, buffer_size=max(1, num_local))


def _preprocess_fn(data_config: ml_collections.ConfigDict, pad_small: bool,
                   flip_seed: int | None):
  """(uint8 image [h, w, c], label, position) -> (float image, label)."""
  size, channels = int(data_config.image_size), int(data_config.channels)

  def preprocess(image, label, position):
    image = _to_channels(image, channels)
    image = _fit(image, size, pad_small)
    if flip_seed is not None:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=tf.stack([tf.constant(flip_seed, tf.int64),
                                tf.cast(position, tf.int64)]))
    image = image * (2.0 / 255.0) - 1.0
    image = tf.ensure_shape(image, [size, size, channels])
    return image, tf.cast(label, tf.int32)

  return preprocess


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [h, w, c] (c in 1, 3, 4) -> uint8 [h, w, channels]."""
  c = image.shape[-1]
  if c is None:
    raise ValueError('Images need a known number of channels.')
  if c == 4:  # Alpha is dropped; tfds image datasets rarely have it.
    image, c = image[..., :3], 3
  elif c == 2:  # Grayscale with alpha.
    image, c = image[..., :1], 1
  if c == channels:
    return image
  if channels == 3:
    return tf.image.grayscale_to_rgb(image)
  return tf.image.rgb_to_grayscale(image)


def _fit(image: tf.Tensor, size: int, pad_small: bool) -> tf.Tensor:
  """uint8 [h, w, c] -> float32 [size, size, c] in [0, 255].

  MNIST-family images (pad_small) smaller than `size` are centred on a black
  canvas; everything else is resized (antialiased, shorter side to `size`)
  and centre-cropped; images already of the target size pass unchanged.
  """
  height, width = image.shape[0], image.shape[1]
  if pad_small and height is not None and width is not None and (
      height <= size and width <= size):
    top, left = (size - height) // 2, (size - width) // 2
    image = tf.image.pad_to_bounding_box(image, top, left, size, size)
    return tf.cast(image, tf.float32)
  if height == size and width == size:
    return tf.cast(image, tf.float32)

  def resize_and_crop():
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]),
                              method='bilinear', antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[top:top + size, left:left + size]
    return tf.clip_by_value(cropped, 0.0, 255.0)

  shape = tf.shape(image)
  return tf.cond(tf.logical_and(tf.equal(shape[0], size),
                                tf.equal(shape[1], size)),
                 lambda: tf.cast(image, tf.float32), resize_and_crop)


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


class InputError(errors.UserError, OSError):
  """Reading the input failed (damaged files); the message names the source."""


def _source_description(data_config: ml_collections.ConfigDict,
                        split: str) -> tuple[str, str]:
  """What a batch stream reads, and how to repair it, for error messages."""
  if data_config.name == 'image_folder':
    return (f'image folder {data_config.image_folder!r} split {split!r}',
            "check the folder's files (truncated, unreadable?) or point "
            '--config.data.image_folder at readable images')
  data_dir = tfds_prepare.data_dir_or_default(data_config)
  dataset_dir = os.path.join(data_dir, re.split(r'[:/]', data_config.name)[0])
  return (f'tfds dataset {data_config.name!r} split {split!r} in {data_dir}',
          f'its prepared files are damaged: delete {dataset_dir} and '
          'prepare it again with --mode=data')


class _ClosableIterator:
  """The only strong reference to a tf.data iterator, so it can be closed.

  A tf.data iterator destroyed while the interpreter shuts down hangs the
  process for good when Python functions of its pipeline (the image-folder
  reader) are still running: their threads can no longer take the GIL, and
  the iterator's destructor waits for them. Destroyed earlier, it waits a
  moment and returns. So every iterator is closed at the latest by an
  atexit hook (atexit runs before the shutdown), and the error path drops
  the iterator before raising (a chained traceback would keep it alive).
  """

  def __init__(self, ds: tf.data.Dataset):
    _close_iterators_at_exit()
    self._iterator = ds.as_numpy_iterator()
    _LIVE_ITERATORS.add(self)

  def __next__(self):
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    self._iterator = None


_LIVE_ITERATORS: 'weakref.WeakSet[_ClosableIterator]' = weakref.WeakSet()


@functools.cache
def _close_iterators_at_exit() -> None:
  atexit.register(lambda: [i.close() for i in list(_LIVE_ITERATORS)])


def _read_error(error: tf.errors.OpError, source: tuple[str, str]) -> str:
  """One line naming the source, TF's cause and the fix."""
  what, fix = source
  detail = (error.message or '').strip().splitlines() or ['(no message)']
  # Drop TF's op decorations around the cause.
  detail = re.sub(r'^\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$', '',
                  detail[0])
  return (f'Reading {what} failed: {type(error).__name__}: {detail}. Fix: '
          f'{fix} (--verbosity=1 logs the traceback)')


def _global_batches(ds: tf.data.Dataset, mesh: Mesh,
                    source: tuple[str, str]) -> Iterator[Batch]:
  """Lays out each process-local numpy batch as global sharded arrays.

  Args:
    ds: batches of this process, numpy-convertible.
    mesh: the mesh the global arrays are sharded over.
    source: (what the stream reads, how to repair it), for read errors.

  Returns:
    An iterator of global batches; a failure inside tf.data (a damaged
    record, an undecodable split) raises `InputError` naming the source.
  """
  def batches():
    iterator = _ClosableIterator(ds)
    try:
      while True:
        failure = None
        try:
          batch = next(iterator)
        except StopIteration:
          return
        except tf.errors.OpError as e:
          logging.debug('The input pipeline failed:', exc_info=True)
          failure = _read_error(e, source)
        if failure is not None:
          # Raised outside the handler: TF's traceback would hold the
          # iterator (see _ClosableIterator).
          iterator.close()
          raise InputError(failure)
        # A split whose files all fail to decode ends the run here, on the
        # main thread (see image_folder.SafeReader).
        image_folder.raise_if_unreadable()
        if isinstance(batch, tuple):
          batch = {'image': batch[0], 'label': batch[1]}
        yield parallel.shard_batch(batch, mesh)
    finally:
      iterator.close()

  return _prefetch(batches(), _DEVICE_PREFETCH)


def _prefetch(iterator: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Keeps `size` batches transferred ahead so copies overlap the step."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

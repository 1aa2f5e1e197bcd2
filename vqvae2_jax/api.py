"""A trained VQ-VAE-2 from Python: encode, decode, sample, score.

  from vqvae2_jax import Pipeline

  pipe = Pipeline.load('workdir/fashion_mnist', 'configs/fashion_mnist.py')
  codes = pipe.encode(images)       # uint8 [n, 32, 32, 1] (or float [-1, 1])
  recon = pipe.decode(codes)        # float32 [n, 32, 32, 1] in about [-1, 1]
  images, codes = pipe.sample(labels=[0, 7, 9], temperature=1.0, key=0)
  bits = pipe.log_prob(images_uint8, labels=[0, 7, 9])  # bits per image
  report = pipe.evaluate(10_000)    # the samples by the judge (reads data)

`Pipeline.load` reads the newest checkpoint of every finished stage in a
workdir (the same provenance checks as `--mode=sample`: a prior trained on
another VQ-VAE's codes is refused). Each method compiles once per batch
shape and runs on the config's mesh (all devices by default); batches that
do not split over the devices are padded and the padding dropped.

Images go in as uint8 [n, H, W, C] in [0, 255] (as read from files) or as
floats already in [-1, 1] (as the input pipeline makes them); any other
range is named, `encode(images, pixel_range=(0, 1))`, and a float array
with every pixel in [0, 1] is refused without it (it is [0, 1] data far
more often than [-1, 1] images with no dark pixel). NaN or infinite
pixels are refused. Images of the dataset's original size on a padded
canvas (28x28 Fashion-MNIST on 32x32) are padded as the input pipeline
pads them; any other size than the model's is refused, never resized.
Images come out as float32 in [-1, 1] up to the decoder's small
overshoot; `to_uint8` converts them.
"""

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import operator
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
from flax import serialization

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import config_validation
from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import files
from vqvae2_jax import loading
from vqvae2_jax import parallel
from vqvae2_jax import pretrained
from vqvae2_jax import sampling
from vqvae2_jax import workdir as workdir_lib
from vqvae2_jax.data import layout
from vqvae2_jax.models import pixelcnn

PyTree = Any
EXPORT_FORMAT = 'vqvae2_jax.export/1'  # Written into every exported file.


class PipelineInputError(errors.UserError, ValueError):
  """Images, codes or labels a pipeline cannot take; the message says why."""


class ExportDamagedError(PipelineInputError):
  """An exported file whose parts differ from the ones it was written with."""


# What each part of an exported file holds, for the damaged-file message.
_EXPORT_PARTS = {'config': 'config', 'steps': 'checkpoint steps',
                 'vqvae_fingerprint': 'VQ-VAE fingerprint',
                 'vqvae_digest': 'VQ-VAE digest', 'vqvae': 'VQ-VAE weights',
                 'prior_fingerprints': 'prior fingerprints',
                 'prior_dtype': "priors' stored dtype"}


def _stored_prior(variables: PyTree, dtype: str) -> PyTree:
  """A prior's variables on the host as an export stores them (`dtype`)."""
  if dtype not in builders.EXPORT_DTYPES:
    raise PipelineInputError(
        f'prior_dtype is {dtype!r}. Fix: use one of {builders.EXPORT_DTYPES}.')
  host = jax.tree.map(parallel.to_host, variables)
  if dtype == 'float32':
    return host
  limit = float(np.finfo(np.float16).max)

  def half(x):
    if not np.issubdtype(x.dtype, np.floating):
      return x
    if x.size and float(np.max(np.abs(x))) > limit:
      raise PipelineInputError(
          f'A prior weight of magnitude {float(np.max(np.abs(x))):.3g} is '
          f'beyond float16 (at most {limit:g}). Fix: export with '
          "prior_dtype='float32'.")
    return x.astype(np.float16)
  return jax.tree.map(half, host)


def _loaded_prior(stored: PyTree) -> PyTree:
  """A prior's variables as stored -> as computed (float16 to float32)."""
  return jax.tree.map(
      lambda x: x.astype(np.float32) if x.dtype == np.float16 else x, stored)


def _export_digests(payload: dict[str, Any]) -> dict[str, str]:
  """SHA-256 of each part of an export's payload (each prior on its own).

  A part's digest is over its msgpack bytes, which are the bytes it has in
  the file (msgpack writes a value the same wherever it lies); so the
  digests recorded at export time tell which part of a loaded file changed.
  """
  parts = {k: v for k, v in payload.items() if k in _EXPORT_PARTS}
  parts.update({f'priors/{level}': v
                for level, v in payload.get('priors', {}).items()})
  return {name: hashlib.sha256(serialization.msgpack_serialize(v)).hexdigest()
          for name, v in parts.items()}


def _hash_parts(spans: dict[tuple[Any, ...], memoryview],
                pool: concurrent.futures.Executor
                ) -> dict[str, concurrent.futures.Future]:
  """SHA-256 of each part of an export over its bytes in the file.

  The digests of `_export_digests` (from `files.read_msgpack`'s spans,
  depth 2) without serialising the payload again; hashed side by side in
  `pool` (hashlib lets go of the GIL): the other parts first (small; the
  priors' weights are checked last), then the priors', the largest first.
  """
  parts = {key[0]: span for key, span in spans.items()
           if len(key) == 1 and key[0] in _EXPORT_PARTS}
  priors = {f'priors/{key[1]}': span for key, span in spans.items()
            if len(key) == 2 and key[0] == 'priors'}
  order = list(parts) + sorted(priors, key=lambda name: -len(priors[name]))
  parts.update(priors)
  return {name: pool.submit(lambda b: hashlib.sha256(b).hexdigest(),
                            parts[name]) for name in order}


def _file_digests(spans: dict[tuple[Any, ...], memoryview]
                  ) -> dict[str, str]:
  """`_export_digests` of a file's payload, from its bytes."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    return {name: future.result()
            for name, future in _hash_parts(spans, pool).items()}


@contextlib.contextmanager
def _export_digests_checked(path: str, payload: dict[str, Any],
                            spans: dict[tuple[Any, ...], memoryview]
                            ) -> Iterator[None]:
  """Refuses a file whose parts differ from their recorded digests.

  Every part but the priors' weights is checked before the body; those are
  hashed while it runs (it puts them on the devices) and checked when it
  ends, also when it raised: a damaged part is the error then. So the body
  may use every other part.

  An export of before digests (no 'digests' entry) loads with one warning:
  only its VQ-VAE weights can be checked (against 'vqvae_digest').

  Args:
    path: the file, for the messages.
    payload: what it holds.
    spans: where each part's bytes lie (`files.read_msgpack`, depth 2).

  Raises:
    ExportDamagedError: naming the file and every damaged part.
  """
  if 'digests' not in payload:
    logging.warning(
        '%s has no digests (exported by an earlier version): its prior '
        'weights are not verified. To verify them, export it again with '
        '--mode=export.', path)
    yield
    return
  try:
    recorded = json.loads(payload['digests'])
  except (TypeError, ValueError):
    recorded = None
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    actual = _hash_parts(spans, pool)
    if not isinstance(recorded, dict) or set(recorded) != set(actual):
      raise ExportDamagedError(
          f'{path} is damaged: its table of digests does not list its '
          'parts. Fix: export it again (--mode=export) or copy it again '
          'from its source.')

    def refuse_damaged(names):
      damaged = [name for name in sorted(names)
                 if actual[name].result() != recorded[name]]
      if damaged:
        what = ', '.join(
            f'level {name.split("/")[1]} prior weights' if name.startswith(
                'priors/') else _EXPORT_PARTS[name] for name in damaged)
        raise ExportDamagedError(
            f'{path} is damaged: its {what} differ from the SHA-256 '
            'recorded when it was exported. Fix: export it again '
            '(--mode=export) or copy it again from its source.')

    try:
      refuse_damaged([n for n in actual if not n.startswith('priors/')])
    except ExportDamagedError:
      refuse_damaged(actual)  # Naming every damaged part.
    try:
      yield
    finally:
      refuse_damaged(actual)


def _export_json(path: str, payload: dict[str, Any], part: str,
                 kind: type) -> Any:
  """The JSON text of an exported file's `part`, parsed, of type `kind`.

  The digests check a part against what was exported; this refuses one
  that was damaged before (or a file of before digests) in one line, not
  with a JSONDecodeError.

  Raises:
    ExportDamagedError: naming the file and the part.
  """
  try:
    value = json.loads(payload[part])
  except KeyError:
    problem = f'it has no {part!r} part'
  except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError.
    problem = f'its {part!r} part is not JSON ({type(e).__name__})'
  else:
    if isinstance(value, kind):
      return value
    problem = (f'its {part!r} part is a JSON {type(value).__name__}, not a '
               f'{kind.__name__}')
  raise ExportDamagedError(
      f'{path} is damaged: {problem}. Fix: export it again '
      '(--mode=export) or copy it again from its source.')


def load_config(config: str | ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """A validated config from a ConfigDict or 'path/to/config.py[:variant]'."""
  if isinstance(config, str):
    path, _, variant = config.partition(':')
    if not os.path.isfile(path):
      raise errors.ConfigError(
          f'No config file {path!r}. Fix: pass the config the workdir was '
          'trained with, e.g. configs/fashion_mnist.py.')
    spec = importlib.util.spec_from_file_location(
        f'_pipeline_config_{abs(hash(os.path.abspath(path)))}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
      config = (module.get_config(variant) if variant else
                module.get_config())
    except ValueError as e:
      # Config files import only ml_collections: their refusals (an unknown
      # variant) are plain ValueErrors; the one that names a fix is the
      # user's to make.
      if 'Fix:' not in str(e):
        raise
      raise errors.ConfigError(f'{config}: {e}') from e
  config_validation.validate_config(config, check_dataset=False)
  return config


def _with_settings(config: ml_collections.ConfigDict,
                   precision: Optional[str] = None,
                   sampling: Mapping[str, Any] | None = None
                   ) -> ml_collections.ConfigDict:
  """`config`, or one validated copy with config.prior.precision (where
  not None) and these config.sampling fields (a shipped spec's) set."""
  fields = {('sampling', name): value
            for name, value in (sampling or {}).items()}
  if precision is not None:
    fields['prior', 'precision'] = precision
  if not fields:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for (section, name), value in fields.items():
      config[section][name] = value
  config_validation.validate_config(config, check_dataset=False)
  return config


def _use_cpu_devices(config: ml_collections.ConfigDict) -> None:
  """On a CPU, config.mesh.cpu_devices devices, as the command line runs.

  JAX takes the count only before its first use (`parallel.split_host_cpu`);
  when it started with another count (JAX code ran before the load) and
  XLA_FLAGS does not choose one, one warning line says so.
  """
  count = int(config.mesh.get('cpu_devices', 0))
  if count <= 0 or parallel.split_host_cpu(count):
    return
  if (parallel.HOST_DEVICE_FLAG not in os.environ.get('XLA_FLAGS', '') and
      jax.default_backend() == 'cpu' and jax.local_device_count() != count):
    logging.warning(
        'Pipeline on %d CPU device(s), not config.mesh.cpu_devices=%d: JAX '
        'started before the load (results differ from the command line\'s in '
        'the last digits); load before any JAX code runs to use %d.',
        jax.local_device_count(), count, count)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.rint((np.asarray(images) + 1.0) * 127.5), 0,
                 255).astype(np.uint8)


# How far float pixels may lie beyond their range, as a fraction of its
# span (0.05 in [-1, 1]): a decoder's small overshoot, not another range.
_RANGE_TOLERANCE = 0.025


def _shown(value: Any) -> str:
  """`value`'s repr on one line, at most 60 characters (for a message)."""
  text = ' '.join(repr(value).split())
  return text if len(text) <= 60 else text[:57] + '...'


def _pixel_range(pixel_range: Any) -> tuple[float, float]:
  """(low, high) from a caller's pixel_range.

  Raises:
    PipelineInputError: not two finite numbers with low < high.
  """
  try:
    low, high = (float(v) for v in pixel_range)
  except (TypeError, ValueError):
    low = high = math.nan
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise PipelineInputError(
        f'pixel_range is {_shown(pixel_range)}. Fix: pass (low, high) with '
        'low < high, the range of the images\' pixel values, e.g. (0, 1) or '
        '(0, 255).')
  return low, high


def _scaled_pixels(x: np.ndarray,
                   pixel_range: Optional[Sequence[float]]) -> np.ndarray:
  """Checked pixels -> float32 in [-1, 1] (see `Pipeline.encode`).

  Args:
    x: [n, h, w, c] images of a real dtype.
    pixel_range: (low, high) of `x`'s values, or None: uint8 is [0, 255],
      floats are [-1, 1] unless every pixel is in [0, 1] (refused: that is
      what [0, 1] data looks like, and the caller says which it is).

  Raises:
    PipelineInputError: another dtype, a NaN or infinite pixel, values
      outside the range (beyond `_RANGE_TOLERANCE`), or floats in [0, 1]
      without a pixel_range.
  """
  floating = np.issubdtype(x.dtype, np.floating)
  if pixel_range is not None:
    low, high = _pixel_range(pixel_range)
  elif x.dtype == np.uint8:
    low, high = 0.0, 255.0
  elif floating:
    low, high = -1.0, 1.0
  else:
    low = high = None
  if low is None or not (floating or np.issubdtype(x.dtype, np.integer)):
    raise PipelineInputError(
        f'Images of dtype {x.dtype}. Fix: pass uint8 in [0, 255] or floats '
        'in [-1, 1], or name their range with pixel_range=(low, high).')
  if floating:
    finite = np.isfinite(x)
    if not finite.all():
      first = int(np.argmin(finite.reshape(len(x), -1).all(axis=1)))
      raise PipelineInputError(
          f'Images hold {int(x.size - finite.sum())} NaN or infinite pixel '
          f'value(s), the first in image {first}. Fix: replace them (e.g. '
          'np.nan_to_num) or leave those images out.')
  if not x.size:
    return x.astype(np.float32)
  lo, hi = float(x.min()), float(x.max())
  tolerance = _RANGE_TOLERANCE * (high - low)
  if pixel_range is None and floating and lo >= 0.0 and hi <= 1.0 + tolerance:
    raise PipelineInputError(
        f'Float images span [{lo:g}, {hi:g}], no pixel below 0: they look '
        'like [0, 1] data, and the model takes [-1, 1]. Fix: pass '
        'pixel_range=(0, 1) to rescale them (or pixel_range=(-1, 1) if they '
        'are [-1, 1] images).')
  if lo < low - tolerance or hi > high + tolerance:
    what = 'Float images' if pixel_range is None else 'Images'
    hint = ('pixel_range=(0, 255)' if lo >= 0.0 and hi <= 255.0 else
            'pixel_range=(low, high)')
    raise PipelineInputError(
        f'{what} span [{lo:g}, {hi:g}], not [{low:g}, {high:g}]. Fix: pass '
        f'uint8 images, floats in [-1, 1], or name their range with {hint} '
        '(clip a decoder\'s overshoot with np.clip).')
  x = x.astype(np.float32)
  if (low, high) != (-1.0, 1.0):
    x = (x - np.float32(low)) * np.float32(2.0 / (high - low)) - 1.0
  return x


class Pipeline:
  """A trained VQ-VAE and (when trained) its priors, ready to use.

  Attributes:
    config: the run's config.
    mesh: where the computations run.
    vqvae: the VQ-VAE module; `vqvae_variables` its variables.
    priors: (module, variables) of each level's prior, top first; empty when
      the workdir has none (then `sample` and `log_prob` are unavailable).
    steps: the checkpoint step of each loaded stage, e.g. {'vqvae': 3000,
      'prior_0': 2000, 'prior_1': 2000}.
    workdir: the workdir it was loaded from; None for a file.
  """

  def __init__(self, config: ml_collections.ConfigDict, vqvae: Any,
               vqvae_variables: PyTree,
               priors: Sequence[tuple[Any, PyTree]] = (),
               steps: Optional[dict[str, int]] = None,
               mesh: Optional[Mesh] = None, workdir: Optional[str] = None):
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.create_mesh(config.mesh) if mesh is None else mesh
    self.vqvae = vqvae
    self.vqvae_variables = vqvae_variables
    self.priors = list(priors)
    self.steps = dict(steps or {})
    self.image_shape = builders.image_shape(config)  # (H, W, C)
    self.level_shapes = [tuple(s) for s in builders.level_shapes(config)]
    self.num_classes = int(config.data.num_classes)
    self._area = layout.original_area(config.data)
    data = parallel.data_sharding(self.mesh)
    self._encode = jax.jit(
        functools.partial(vqvae.apply, method=vqvae.encode),
        in_shardings=(None, data), out_shardings=data)
    self._decode = jax.jit(
        functools.partial(vqvae.apply, method=vqvae.decode_codes),
        in_shardings=(None, data), out_shardings=data)

  @classmethod
  def load(cls, workdir: str,
           config: str | ml_collections.ConfigDict | None = None, *,
           mesh: Optional[Mesh] = None, use_polyak: bool = True,
           priors: bool = True, require_priors: bool = False,
           compilation_cache_dir: str = '',
           precision: Optional[str] = None) -> 'Pipeline':
    """The newest checkpoints of every finished stage in `workdir`, or an
    exported pipeline file (`export`; then `config` is not needed).

    Args:
      workdir: the run's --workdir, the path of an exported file, or the
        name of a shipped pretrained pipeline (`pretrained.PRETRAINED`,
        e.g. 'fashion_mnist'; its digest is checked, and it samples at its
        spec's settings, `PretrainedSpec.sampling`) where no such path
        exists.
      config: the config it was trained with: a ConfigDict or a config
        file path ('configs/fashion_mnist.py', or with ':variant'); None
        reads workdir/config.json, which every run records.
      mesh: where to run (default: the config's mesh over all devices; on
        a CPU, config.mesh.cpu_devices devices as on the command line when
        no JAX code ran before, else one warning line says it is not so).
      use_polyak: the priors' Polyak-averaged weights where saved.
      priors: also load the priors (False: only the VQ-VAE).
      require_priors: every level's prior must load (--mode=sample); else a
        workdir without priors of every level loads without any.
      compilation_cache_dir: keep the compiled samplers and decoder in this
        directory (JAX's persistent compilation cache, for the whole
        process; see `parallel.use_compilation_cache`), so that the first
        image of a later process skips their compilation. '' leaves JAX's
        setting as it is.
      precision: the priors' and sampler's matrix-product precision
        ('default', 'high' or 'highest'; see config.prior.precision), in
        place of the config's. On a GPU 'default' is TF32; 'highest' is full
        float32, slower. The weights do not depend on it.

    Raises:
      errors.MissingStageError: no stage-1 checkpoint in `workdir` (or, with
        `require_priors`, no prior checkpoint of a level).
      errors.CheckpointMismatchError: checkpoints of another config, or
        priors trained on another VQ-VAE's codes.
    """
    # Before anything compiles. Loading itself compiles no model: shapes come
    # from `jax.eval_shape`, weights from the checkpoint or file.
    parallel.use_compilation_cache(compilation_cache_dir)
    if workdir in pretrained.PRETRAINED and not os.path.exists(workdir):
      spec = pretrained.PRETRAINED[workdir]
      return cls._from_file(pretrained.checked_path(workdir), config, mesh,
                            precision, sampling=spec.sampling)
    if os.path.isfile(workdir):
      return cls._from_file(workdir, config, mesh, precision)
    if config is None:
      recorded = workdir_lib.Workdir(workdir).config_json
      if not os.path.isfile(recorded):
        raise errors.ConfigError(
            f'{workdir} has no config.json (it is written by runs of this '
            'version). Fix: pass the config it was trained with, e.g. '
            "Pipeline.load(workdir, 'configs/fashion_mnist.py').")
      try:
        with open(recorded) as f:
          config = json.load(f)
      except ValueError:  # JSONDecodeError, UnicodeDecodeError.
        config = None
      if not isinstance(config, dict):
        raise errors.ConfigError(
            f'{recorded} is damaged (not the JSON object a run writes). Fix: '
            'pass the config it was trained with, e.g. '
            "Pipeline.load(workdir, 'configs/fashion_mnist.py').")
      config = ml_collections.ConfigDict(config)
    config = _with_settings(load_config(config), precision)
    if mesh is None:
      _use_cpu_devices(config)
      mesh = parallel.create_mesh(config.mesh)
    vqvae, variables, step = loading.load_vqvae(config, workdir, mesh)
    steps = {'vqvae': step}
    loaded = []
    if priors:
      provenance = loading.vqvae_provenance(config, variables, step)
      for level in range(builders.num_levels(config)):
        if not (require_priors or os.path.isdir(
            workdir_lib.Workdir(workdir).prior(level))):
          break
        model, prior_variables, prior_step = loading.load_prior(
            config, workdir, level, vqvae=provenance, mesh=mesh,
            use_polyak=use_polyak)
        loaded.append((model, prior_variables))
        steps[f'prior_{level}'] = prior_step
      if len(loaded) < builders.num_levels(config):
        loaded = []  # Sampling and scoring need every level.
    return cls(config, vqvae, variables, loaded, steps, mesh, workdir)

  def export(self, path: str, prior_dtype: str = 'float32') -> str:
    """Writes config, variables and provenance of every stage to one file.

    A msgpack file (flax.serialization) that `Pipeline.load(path)` reads
    back with no workdir and no config file: the config as JSON, the
    VQ-VAE's variables with its fingerprint and digest, each prior's
    variables with its fingerprint, the checkpoint steps, and the SHA-256
    of each of these parts, which loading checks (a damaged file is refused,
    naming the part). Written atomically (a temporary file renamed), so a
    failure leaves no partial file.

    Args:
      path: the file to write.
      prior_dtype: how the priors' floating-point weights are stored:
        'float32' (as trained), or 'float16' (half their bytes; loading
        computes in float32 from the weights rounded to float16, about 3
        significant digits, so the file's samples are those of the
        rounded weights, not the trained weights' own). The VQ-VAE is
        stored as trained.

    Raises:
      PipelineInputError: an unknown `prior_dtype`, or a weight beyond
        float16's range.
    """
    provenance = loading.vqvae_provenance(self.config, self.vqvae_variables,
                                          self.steps.get('vqvae', 0))
    payload = {
        'format': EXPORT_FORMAT,
        'config': self.config.to_json(),
        'steps': json.dumps(self.steps),
        'vqvae_fingerprint': json.dumps(provenance['fingerprint']),
        'vqvae_digest': provenance['digest'],
        # Replicated over every process's devices: each host's copy.
        'vqvae': jax.tree.map(parallel.to_host, self.vqvae_variables),
        'priors': {str(level): _stored_prior(variables, prior_dtype)
                   for level, (_, variables) in enumerate(self.priors)},
        'prior_fingerprints': json.dumps([
            builders.prior_fingerprint(self.config, level, provenance)
            for level in range(len(self.priors))]),
    }
    if prior_dtype != 'float32':  # float32 files stay as they were.
      payload['prior_dtype'] = prior_dtype
    payload['digests'] = json.dumps(_export_digests(payload), sort_keys=True)
    data = serialization.msgpack_serialize(payload)
    if jax.process_index() == 0:  # One writer of the one file.
      try:
        files.atomic_write(path, lambda f: f.write(data))
      except OSError as e:
        if not files.is_disk_full(e):
          raise
        raise files.disk_full_error(
            os.path.dirname(os.path.abspath(path)), e,
            f'{path} was not written (no partial file is left) and nothing '
            'else changed', needed=len(data)) from e
    return path

  @classmethod
  def _from_file(cls, path: str, config: Any, mesh: Optional[Mesh],
                 precision: Optional[str] = None,
                 sampling: Mapping[str, Any] | None = None) -> 'Pipeline':
    """An exported file; `sampling`: config.sampling fields set over its
    config's (a shipped spec's)."""
    # One read; the weights are views of it, hashed where they lie.
    try:
      payload, spans = files.read_msgpack(path, span_depth=2)
    except OSError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise PipelineInputError(
          f'{path} is not an exported pipeline ({type(e).__name__}). Fix: '
          'pass a workdir, or a file written by --mode=export.') from e
    if not isinstance(payload, dict) or payload.get('format') != EXPORT_FORMAT:
      raise PipelineInputError(
          f'{path} is not an exported pipeline of format {EXPORT_FORMAT}. '
          'Fix: export it again with --mode=export of this version.')
    # The priors' weights are hashed while they go to the devices.
    with _export_digests_checked(path, payload, spans):
      saved = _export_json(path, payload, 'config', dict)
      if config is not None:
        raise PipelineInputError(
            f'{path} carries its own config. Fix: call Pipeline.load({path!r}) '
            'without one.')
      config = _with_settings(load_config(ml_collections.ConfigDict(saved)),
                              precision, sampling)
      if builders.vqvae_fingerprint(config) != _export_json(
          path, payload, 'vqvae_fingerprint', dict):
        raise PipelineInputError(
            f'{path}: its config does not match its VQ-VAE fingerprint (a '
            'damaged or edited file). Fix: export it again.')
      if mesh is None:
        _use_cpu_devices(config)
        mesh = parallel.create_mesh(config.mesh)
      vqvae = builders.build_vqvae(config)
      variables = jax.device_put(payload['vqvae'], parallel.replicated(mesh))
      if loading.variables_digest(variables) != payload['vqvae_digest']:
        raise PipelineInputError(
            f'{path}: the VQ-VAE weights do not match their digest (a damaged '
            'file). Fix: export it again.')
      stored = payload.get('prior_dtype', 'float32')
      if stored not in builders.EXPORT_DTYPES:
        raise ExportDamagedError(
            f'{path}: its priors are stored as {stored!r}, not one of '
            f'{builders.EXPORT_DTYPES} (a damaged file, or one of a newer '
            'version). Fix: export it again with this version.')
      priors = [(builders.build_prior(config, level),
                 jax.device_put(_loaded_prior(payload['priors'][str(level)]),
                                parallel.replicated(mesh)))
                for level in range(len(payload['priors']))]
      steps = _export_json(path, payload, 'steps', dict)
    return cls(config, vqvae, variables, priors, steps, mesh)

  # Inputs.

  def _images(self, images: Any,
              pixel_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """Checked images -> float32 [n, H, W, C] in [-1, 1] on the canvas.

    Args:
      images: see `encode`.
      pixel_range: see `encode`.

    Raises:
      PipelineInputError: a shape, dtype, size or pixel value the model
        cannot take (see `encode`).
    """
    h, w, c = self.image_shape
    try:
      x = np.asarray(images)
    except ValueError as e:  # Ragged: images of different shapes.
      raise PipelineInputError(
          f'Images do not stack into one array ({e}). Fix: pass one array '
          f'[n, {h}, {w}, {c}], every image of the same size.') from e
    if x.ndim == 3 and c == 1 and (x.shape[1:] == (h, w) or (
        self._area is not None and x.shape[1:] == self._area_hw())):
      x = x[..., None]  # [n, h, w] grayscale.
    if x.ndim != 4 or x.shape[-1] != c:
      raise PipelineInputError(
          f'Images have shape {x.shape}. Fix: pass [n, {h}, {w}, {c}] '
          f'({c} channel{"s" if c > 1 else ""}, as the model was trained).')
    self._check_size(x.shape[1], x.shape[2])
    x = _scaled_pixels(x, pixel_range)
    if x.shape[1:3] == self._area_hw() and self._area is not None:
      # The dataset's original size: pad as the input pipeline does (black).
      top, left, ah, aw = self._area
      canvas = np.full((x.shape[0], h, w, c), -1.0, np.float32)
      canvas[:, top:top + ah, left:left + aw] = x
      x = canvas
    return x

  def _check_size(self, height: int, width: int) -> None:
    """Refuses images of another size than the canvas or the originals.

    Only the dataset's original size (28x28 Fashion-MNIST on a 32x32
    canvas) is padded, as the input pipeline pads it; any other size would
    need a resize or a crop that the model never saw in training, so the
    caller chooses it. A smaller image is never upscaled.
    """
    h, w, _ = self.image_shape
    if (height, width) in ((h, w), self._area_hw()):
      return
    originals = (f' (or pass the {self._area[2]}x{self._area[3]} originals, '
                 'which are padded as in training)' if self._area else '')
    if height < h or width < w:
      raise PipelineInputError(
          f'Images are {height}x{width}, smaller than the model\'s {h}x{w} '
          f'(they are not upscaled). Fix: pad or resize them to {h}x{w}'
          f'{originals}.')
    raise PipelineInputError(
        f'Images are {height}x{width}, not the model\'s {h}x{w}. Fix: resize '
        f'or crop them to {h}x{w}{originals}.')

  def _area_hw(self) -> tuple[int, int] | None:
    return None if self._area is None else (self._area[2], self._area[3])

  def _codes(self, codes: Sequence[Any]) -> list[np.ndarray]:
    if len(codes) != len(self.level_shapes):
      raise PipelineInputError(
          f'Got {len(codes)} code maps. Fix: pass one per level, top first '
          f'({len(self.level_shapes)} levels of shapes '
          f'{[list(s) for s in self.level_shapes]}).')
    out = []
    k = int(self.config.model.num_embeddings)
    for level, (c, shape) in enumerate(zip(codes, self.level_shapes)):
      c = np.asarray(c)
      if c.ndim != 3 or c.shape[1:] != shape or c.shape[0] != np.shape(
          codes[0])[0]:
        raise PipelineInputError(
            f'Codes of level {level} have shape {c.shape}. Fix: pass '
            f'[n, {shape[0]}, {shape[1]}] integer maps, the same n at every '
            'level.')
      if not np.issubdtype(c.dtype, np.integer) or (
          c.size and (c.min() < 0 or c.max() >= k)):
        raise PipelineInputError(
            f'Codes of level {level} must be integers in [0, {k}). Fix: pass '
            'codes from `encode` or `sample`.')
      out.append(c.astype(np.int32))
    return out

  def _labels(self, labels: Any, n: int) -> Optional[np.ndarray]:
    """Checked labels -> int32 [n] (num_classes = no label), or None."""
    labels = pixelcnn.check_labels(labels, n, self.num_classes,
                                   error=PipelineInputError,
                                   no_label_ok=False, per='image')
    return None if labels is None else np.array(labels, np.int32)

  # Batching: pad to a multiple of the devices, run, drop the padding.

  def _padded(self, x: np.ndarray) -> np.ndarray:
    n, d = x.shape[0], self.mesh.size
    padded = -(-max(n, 1) // d) * d
    if padded == n:
      return x
    pad = np.zeros((padded - n, *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])

  def _needs_priors(self, what: str) -> None:
    if not self.priors:
      raise PipelineInputError(
          f'{what} needs the priors of every level, and this pipeline has '
          'none. Fix: train them (--mode=prior, or --mode=all) in the same '
          'workdir, then load it again.')

  # The API.

  def encode(self, images: Any, *,
             pixel_range: Optional[Sequence[float]] = None
             ) -> list[np.ndarray]:
    """Images -> code maps per level, top first.

    Args:
      images: [n, H, W, C] uint8 in [0, 255] or float in [-1, 1] (also
        [n, H, W] for one channel, and the dataset's original size, e.g.
        28x28 on a 32x32 canvas, padded as in training). Other sizes are
        refused, never resized. Float values may lie beyond [-1, 1] by
        0.05 (a decoder's overshoot). A float array with no pixel below 0
        (and none above 1.05) is refused without `pixel_range`: that is
        [0, 1] data, and its meaning in [-1, 1] (every pixel at least
        mid-grey) is too rare to guess.
      pixel_range: (low, high), the range of the images' values, rescaled
        to [-1, 1]: (0, 1) for floats in [0, 1], (0, 255) for [0, 255]
        floats, (-1, 1) to pass [-1, 1] floats that are all >= 0. Any
        integer or float dtype; None: uint8 is [0, 255], floats [-1, 1].

    Returns:
      [n, h_l, w_l] int32 codes of each level, top first.

    Raises:
      PipelineInputError: a shape, size or dtype the model cannot take,
        NaN or infinite pixels, values outside the range, floats in [0, 1]
        without `pixel_range`, or a `pixel_range` that is not (low, high).
    """
    x = self._images(images, pixel_range)
    n = x.shape[0]
    codes = self._encode(self.vqvae_variables, self._padded(x))
    return [np.asarray(c)[:n] for c in codes]

  def decode(self, codes: Sequence[Any]) -> np.ndarray:
    """Code maps (top first, [n, h_l, w_l] ints) -> float32 [n, H, W, C]."""
    codes = self._codes(codes)
    n = codes[0].shape[0]
    images = self._decode(self.vqvae_variables,
                          [self._padded(c) for c in codes])
    return np.asarray(images)[:n]

  def reconstruct(self, images: Any, *,
                  pixel_range: Optional[Sequence[float]] = None
                  ) -> np.ndarray:
    """decode(encode(images)): float32 [n, H, W, C] (see `encode`)."""
    return self.decode(self.encode(images, pixel_range=pixel_range))

  def code_frequencies(self) -> list[np.ndarray]:
    """How often stage 1 uses each code of each level, top first: [K]
    float64 shares summing to 1.

    Its quantizers' usage statistics ('vq_stats' 'cluster_size': the codes
    each one chose per training batch, averaged over its last steps), which
    follow the extracted training codes' own frequencies closely (the logs
    of the two correlate at 0.99 on `:long`'s levels).

    Raises:
      PipelineInputError: a stage 1 without those statistics.
    """
    stats = self.vqvae_variables.get('vq_stats', {})
    out = []
    for level in range(len(self.level_shapes)):
      counts = stats.get(f'quantizers_{level}', {}).get('cluster_size')
      if counts is None:
        raise PipelineInputError(
            f'This stage 1 holds no code usage for level {level} (its '
            "variables lack 'vq_stats'/'quantizers_{level}'/'cluster_size'"
            '). Fix: load a stage 1 trained by this project, or sample '
            'with contrast 0.')
      counts = np.asarray(parallel.to_host(counts), np.float64)
      out.append(counts / counts.sum())
    return out

  def code_bias(self, contrast: float | Sequence[float]
                ) -> list[Optional[jax.Array]]:
    """The sampler's logit bias of each level (`sampling.contrast_bias` of
    `code_frequencies`; None where the level's contrast is 0), as
    `sampling.sample_hierarchy` takes it.

    `contrast`: one value for every level, or one per level, top first.
    """
    return self._of_frequencies('contrast', contrast, sampling.contrast_bias)

  def code_discount(self, discount: float | Sequence[float]
                    ) -> list[Optional[jax.Array]]:
    """The sampler's discount of each level (`sampling.frequency_discount`
    of `code_frequencies`; None where the level's discount is 0), as
    `sampling.sample_hierarchy` takes it.

    `discount`: one value for every level, or one per level, top first.
    """
    return self._of_frequencies('discount', discount,
                                sampling.frequency_discount)

  def _of_frequencies(self, name: str, setting: float | Sequence[float],
                      make) -> list[Optional[jax.Array]]:
    """`make(code frequencies, value)` of each level whose value of
    `setting` (one for every level, or one per level) is not 0, else None.
    """
    levels = len(self.level_shapes)
    values = builders.per_level(setting, levels)
    if len(values) != levels:
      raise PipelineInputError(
          f'{name} {tuple(setting)} names {len(values)} levels, not '
          f'{levels}. Fix: pass one value, or one per level, top first.')
    if not any(values):
      return [None] * levels
    return [make(f, v) if v else None
            for f, v in zip(self.code_frequencies(), values)]

  def sample(self, labels: Any = None, n: Optional[int] = None, *,
             temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             guidance: Optional[float | Sequence[float]] = None,
             contrast: Optional[float | Sequence[float]] = None,
             discount: Optional[float | Sequence[float]] = None,
             key: int | jax.Array = 0
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Samples images from the priors (exact ancestral sampling).

    Args:
      labels: [n] class indices, or None (the prior's unconditional path).
      n: how many samples, an integer >= 1 (a numpy integer too); needed
        when labels is None, else len(labels).
      temperature, top_k, top_p: the sampler's controls (1.0, 0, 1.0: the
        model as trained). None: the config's (`sampling.temperature`,
        `sampling.top_k`, `sampling.top_p`), as `--mode=sample` and
        `evaluate` draw.
      guidance: classifier-free guidance scale (needs labels); 1.0 is off,
        above 1 follows the labels more closely, at twice the compute (see
        `sampling.sample_level`); or one scale per level, top first. None:
        the config's (`sampling.guidance`, or `guidance_per_level` where
        set) when labels are given, as `--mode=sample` draws; else 1.0.
      contrast: draw each code from p(code | context) / freq(code)^c, freq
        stage 1's code frequencies (`code_bias`): 0 is off; 0.75 on the
        bottom level of `:long` lifts recall by 0.04 to 0.05 at the same
        precision (docs/results.md); one value for every level or one per
        level, top first. None: the config's (`sampling.contrast`).
      discount: draw only the codes whose p(code | context) exceeds t =
        d * freq(code), each with weight (p - t)^2 / p, renormalised
        (`code_discount`, `sampling.discount_logits`): 0 is off; a code is
        drawn only where its context makes it more than d times as likely
        as its overall share (docs/results.md); one value for every level
        or one per level, top first. None: the config's
        (`sampling.discount`).
      key: an integer seed (a numpy integer too) or a PRNG key
        (`jax.random.key` or `jax.random.PRNGKey`); the same key gives the
        same samples, and a seed the samples of `jax.random.PRNGKey(seed)`.

    Returns:
      (images float32 [n, H, W, C], codes per level [n, h_l, w_l] int32).

    Raises:
      PipelineInputError: no priors, an `n` or `key` of another kind, or
        labels that are not n class indices.
    """
    self._needs_priors('Sampling')
    if labels is not None and n is None:
      n = len(labels) if np.ndim(labels) else 1  # A scalar: refused below.
    n = _count(n)
    rng = _prng_key(key)
    if guidance is None:
      guidance = (1.0 if labels is None else
                  builders.sampling_guidance(self.config))
    if labels is None and np.any(np.asarray(guidance) != 1.0):
      raise PipelineInputError(
          f'guidance is {builders.guidance_text(guidance)}, but no labels '
          'were given: guidance follows class labels. Fix: pass labels, or '
          'guidance=1.0.')
    labels = self._labels(labels, n)
    batch = self._padded(np.zeros((n,), np.int32)).shape[0]
    if labels is not None:
      labels = self._padded(labels)
      labels[n:] = labels[0]
    s = self.config.sampling
    temperature = s.temperature if temperature is None else temperature
    top_k = s.top_k if top_k is None else top_k
    top_p = s.top_p if top_p is None else top_p
    if contrast is None:
      contrast = builders.sampling_contrast(self.config)
    if discount is None:
      discount = builders.sampling_discount(self.config)
    codes = sampling.sample_hierarchy(
        self.priors, self.level_shapes, batch_size=batch, labels=labels,
        rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
        mesh=self.mesh, unroll=self.config.sampling.unroll,
        dtype=self.config.sampling.dtype or None, guidance=guidance,
        code_bias=self.code_bias(contrast),
        code_discount=self.code_discount(discount),
        step_kernel=s.get('step_kernel', 'xla'))
    codes = [np.asarray(c)[:n] for c in codes]
    return self.decode(codes), codes

  def log_prob_codes(self, codes: Sequence[Any], labels: Any = None
                     ) -> np.ndarray:
    """Bits of each level's codes under its prior: float64 [levels, n]."""
    self._needs_priors('Scoring')
    codes = self._codes(codes)
    n = codes[0].shape[0]
    labels = self._labels(labels, n)
    padded = [self._padded(c) for c in codes]
    if labels is not None:
      labels = self._padded(labels)
    bits = []
    for level, (model, variables) in enumerate(self.priors):
      nats = _level_nats(model, variables, padded[level],
                         tuple(padded[:level]), labels)
      bits.append(np.asarray(nats, np.float64)[:n] / math.log(2.0))
    return np.stack(bits)

  def log_prob(self, images: Any, labels: Any = None, *,
               pixel_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """-log2 p(codes of each image) under the priors: float64 [n], in bits.

    The likelihood of an image's codes (every level, top first) given its
    label (or the unconditional path for labels=None); divide by the code
    count (sum of h_l * w_l) for bits per code. `images` and `pixel_range`
    as in `encode` (which refuses what it refuses).
    """
    return self.log_prob_codes(
        self.encode(images, pixel_range=pixel_range), labels).sum(axis=0)

  @console.python_console()  # Its progress line and summary, from Python.
  def evaluate(self, num_samples: int = 10_000, *,
               guidance: Optional[float | Sequence[float]] = None,
               temperature: Optional[float] = None,
               top_k: Optional[int] = None, top_p: Optional[float] = None,
               contrast: Optional[float | Sequence[float]] = None,
               discount: Optional[float | Sequence[float]] = None,
               key: Optional[int | jax.Array] = None,
               features: Optional[str] = None,
               real_features: Optional[str] = None) -> dict[str, Any]:
    """Sample quality as --mode=eval measures it, for any loaded pipeline.

    `num_samples` class-balanced samples (unconditional where the config
    samples so), drawn as --mode=eval draws them, and as many training
    images (the real-vs-real floor), each scored against the whole
    held-out split by the config's ruler (the shipped judge on
    Fashion-MNIST): FID, KID, Inception Score, precision and recall, class
    agreement. At the config's settings the figures are those of
    --mode=eval's report on the same workdir (a shipped model's are those
    its spec quotes): `Pipeline.load('fashion_mnist_long128').evaluate()`.
    The plain sampler: no rejection. Reads the dataset's held-out and
    training splits (Fashion-MNIST from Debian's package or a prepared
    copy; other data as the config's `data` section finds it); about 2
    minutes for 10,000 samples of `:long` on a 2-core CPU. Where the
    dataset cannot be read (an accelerator image without TensorFlow), the
    real images' side comes from a file `write_real_features` made
    elsewhere: the same figures.

    Args:
      num_samples: how many samples (and floor images), an integer >= 1.
      guidance, temperature, top_k, top_p, contrast, discount: the
        sampler's controls (see `sample`); None takes the config's
        (`sampling`), as --mode=eval does.
      key: an integer seed or a PRNG key (as for `sample`); None: the
        config's seed.
      features: the ruler, as config.eval.features names it ('judge',
        'auto', 'classifier' or 'inception'; the last two need the domain
        classifier of a loaded workdir); None: the config's.
      real_features: a file of `write_real_features` (of the same ruler and
        data, with at least `num_samples` floor images) to read the real
        images' features from instead of the dataset; None reads the data.

    Returns:
      {'samples': {fid, kid, inception_score, precision, recall,
      class_agreement (conditional only), num_examples, and the controls},
      'real_vs_real': the floor's figures, 'held_out_examples', the ruler
      ('features', and the judge's name and digest), 'seconds'}.

    Raises:
      PipelineInputError: no priors, or a `num_samples` or `key` of another
        kind.
      errors.ConfigError: an unknown ruler, or one that needs the domain
        classifier of a workdir for a pipeline loaded from a file.
      errors.MissingPackageError: TensorFlow or tfds, which read the
        dataset, is not installed (and no `real_features` was given).
      evaluation.real_features.RealFeaturesError: `real_features` is
        missing, damaged, of another ruler or data, or holds fewer floor
        images than `num_samples`.
    """
    self._needs_priors('Evaluating')
    n = _integer(num_samples)
    if n is None or n < 1:
      raise PipelineInputError(
          f'num_samples is {_shown(num_samples)}. Fix: pass an integer >= 1 '
          '(10,000 for the figures the docs quote).')
    s = self.config.sampling
    conditional = bool(s.conditional and self.num_classes)
    if (guidance is not None and not conditional
        and np.any(np.asarray(guidance) != 1.0)):
      raise PipelineInputError(
          f'guidance is {builders.guidance_text(guidance)}, but this config '
          'samples without labels (sampling.conditional is off or the data '
          'has no classes): guidance follows class labels. Fix: leave '
          'guidance out.')
    rng = _prng_key(self.config.seed if key is None else key)
    # Imported when first used (it loads the metrics and the judge).
    from vqvae2_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top
    doing = 'Pipeline.evaluate' if real_features is not None else (
        'Pipeline.evaluate without real_features (a file that '
        'Pipeline.write_real_features writes where the data is read)')
    with errors.reading_images(doing):
      return eval_run.evaluate_pipeline(
          self, n, rng=rng,
          temperature=s.temperature if temperature is None else temperature,
          top_k=s.top_k if top_k is None else top_k,
          top_p=s.top_p if top_p is None else top_p,
          guidance=(builders.sampling_guidance(self.config)
                    if guidance is None else guidance),
          contrast=(builders.sampling_contrast(self.config)
                    if contrast is None else contrast),
          discount=(builders.sampling_discount(self.config)
                    if discount is None else discount), features=features,
          real_features=None if real_features is None else os.fspath(
              real_features))

  def write_real_features(self, path: str, num_samples: int = 10_000, *,
                          features: Optional[str] = None) -> dict[str, Any]:
    """Writes the real images' side of `evaluate` to `path` (.npz): the
    ruler's features and class probabilities of the whole held-out split
    and of the first `num_samples` training images (the floor), batch by
    batch. `evaluate(real_features=path)` reads them instead of the
    dataset, on any machine, and gives the figures the images give; so a
    GPU image without TensorFlow can measure samples against data read
    here. About 15 s for Fashion-MNIST's 10,000 + 10,000 on a 2-core CPU
    (11 MB with the judge).

    Args:
      path: the file; written atomically, replacing one there.
      num_samples: how many floor images: the most samples the file can
        evaluate (an integer >= 1).
      features: the ruler, as for `evaluate`; None: the config's.

    Returns:
      The file's header (ruler, dataset, splits) and the counts written.

    Raises:
      errors.MissingPackageError: TensorFlow or tfds is not installed.
    """
    n = _integer(num_samples)
    if n is None or n < 1:
      raise PipelineInputError(
          f'num_samples is {_shown(num_samples)}. Fix: pass an integer >= 1 '
          '(as many as the samples the file is to evaluate).')
    from vqvae2_jax.evaluation import run as eval_run  # pylint: disable=g-import-not-at-top
    with errors.reading_images('Pipeline.write_real_features'):
      return eval_run.write_real_features(self, os.fspath(path), n,
                                          features=features)


def _integer(value: Any) -> Optional[int]:
  """`value` as a Python int when it is an integer (not a bool), else None.

  Python and numpy integers, and 0-d integer arrays (numpy or JAX).
  """
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (np.ndarray, jax.Array)):
    if value.shape or not jax.dtypes.issubdtype(value.dtype, np.integer):
      return None
    return int(value)
  try:
    return operator.index(value)
  except TypeError:
    return None


def _count(n: Any) -> int:
  """`sample`'s n as an int >= 1.

  Raises:
    PipelineInputError: n is not an integer >= 1.
  """
  count = _integer(n)
  if count is None or count < 1:
    raise PipelineInputError(
        f'n is {_shown(n)}. Fix: pass an integer n >= 1 (or labels, one per '
        'sample).')
  return count


def _prng_key(key: Any) -> jax.Array:
  """`sample`'s key: a PRNG key as given, or PRNGKey(seed) of an integer.

  Raises:
    PipelineInputError: neither an integer seed (of 64 bits) nor a key.
  """
  seed = _integer(key)
  if seed is not None:
    try:
      return jax.random.PRNGKey(seed)
    except OverflowError:
      pass
  else:
    try:
      return sampling.typed_key(key)
    except sampling.SamplingInputError:
      pass
  raise PipelineInputError(
      f'key is {_shown(key)} ({type(key).__name__}). Fix: pass an integer '
      'seed (64 bits at most) or one key from jax.random.key(seed) or '
      'jax.random.PRNGKey(seed).')


@functools.partial(jax.jit, static_argnums=0)
def _code_log_probs(model, variables, codes, cond_codes, labels):
  """Log-probabilities of every code at every position of a level's maps
  under its prior (the full, teacher-forced path): float32 [b, h, w, K]."""
  logits = model.apply(variables, codes, cond_codes=cond_codes,
                       labels=labels if model.num_classes else None,
                       train=False)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _level_nats(model, variables, codes, cond_codes, labels):
  """Negative log-likelihood in nats of each map, [b]."""
  logp = _code_log_probs(model, variables, codes, cond_codes, labels)
  picked = jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked, axis=(1, 2))


def export_workdir(config: ml_collections.ConfigDict,
                   workdir: str) -> dict[str, Any]:
  """--mode=export: every finished stage of `workdir` as one file.

  Writes workdir/export/<dataset>_vqvae<step>_prior<steps>.msgpack (see
  `Pipeline.export`; `_float16` before `.msgpack` where
  config.prior.export_dtype stores the priors' weights so), which
  `Pipeline.load(path)` reads with no workdir or config file. An existing
  file of the same steps is left as it is.

  Returns:
    {'path', 'bytes', 'steps'}.
  """
  pipe = Pipeline.load(workdir, config)
  if not pipe.priors:
    raise errors.UserError(
        f'{workdir} has no trained priors to export with the VQ-VAE. Fix: '
        'run --mode=prior (or --mode=all) first.')
  prior_steps = '-'.join(str(pipe.steps[f'prior_{level}'])
                         for level in range(len(pipe.priors)))
  dtype = config.prior.get('export_dtype', 'float32')
  name = (f'{config.data.name.replace("/", "_").replace(":", "_")}'
          f'_vqvae{pipe.steps["vqvae"]}_prior{prior_steps}'
          f'{"" if dtype == "float32" else "_" + dtype}.msgpack')
  path = os.path.join(workdir_lib.Workdir(workdir).export, name)
  if not os.path.exists(path):
    files.ensure_writable(os.path.dirname(path), 'the exported pipeline')
    pipe.export(path, prior_dtype=dtype)
  size = os.path.getsize(path)
  console.say('Exported pipeline: %s (%.1f MB); from Python: '
              'vqvae2_jax.Pipeline.load(%r)', path, size / 1e6, path)
  return {'path': path, 'bytes': size, 'steps': pipe.steps}

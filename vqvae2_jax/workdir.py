"""The one map of a workdir's layout: where each stage reads and writes.

  wd = Workdir('/tmp/vqvae2_fmnist')
  wd.vqvae                  # /tmp/vqvae2_fmnist/vqvae
  wd.prior(1)               # /tmp/vqvae2_fmnist/prior_1
  checkpoint_dir(wd.vqvae)  # /tmp/vqvae2_fmnist/vqvae/checkpoints

A workdir holds:

  config.json         the config of the latest accepted run (`Pipeline.load`)
  data/               --mode=data: preview.png, summary.json, log.txt
  vqvae/              stage 1: checkpoints/, images/, metrics.json, log.txt
  codes/              --mode=codes: the extracted codes (`data.codes`)
  prior_<level>/      stage 2, one per level (0 = top): as vqvae/
  samples/<run>/      --mode=sample: samples.png, codes.npz, meta.json, ...
  classifier/         --mode=classifier: as vqvae/
  eval/               --mode=eval: report.json, report.md, cas_<examples>/
  export/             --mode=export: <data>_vqvae<s>_prior<s>[_float16].msgpack

Every stage's directory (e.g. vqvae/) keeps its orbax checkpoints in
checkpoints/, its final metrics in metrics.json and its log in log.txt;
its curves in TensorBoard's event files, or in scalars.jsonl where
TensorFlow and clu are not installed.
These names are those of every workdir written so far: old workdirs keep
working. Paths are absolute strings.
"""

import dataclasses
import os

CONFIG_FILE = 'config.json'


@dataclasses.dataclass(frozen=True, init=False)
class Workdir:
  """The paths of one workdir.

  Attributes:
    root: the workdir, as an absolute path.
  """
  root: str

  def __init__(self, root: 'str | os.PathLike[str] | Workdir'):
    """Args: root: the workdir (relative paths are made absolute now)."""
    if isinstance(root, Workdir):
      root = root.root
    object.__setattr__(self, 'root', os.path.abspath(os.fspath(root)))

  def _join(self, *names: str) -> str:
    return os.path.join(self.root, *names)

  @property
  def config_json(self) -> str:
    """The recorded config of the workdir's runs (`stages.run` writes it)."""
    return self._join(CONFIG_FILE)

  @property
  def data(self) -> str:
    """--mode=data's preview and summary."""
    return self._join('data')

  @property
  def vqvae(self) -> str:
    """Stage 1's directory."""
    return self._join('vqvae')

  @property
  def vqvae_images(self) -> str:
    """Stage 1's reconstruction grids, one per evaluation."""
    return os.path.join(self.vqvae, 'images')

  def prior(self, level: int) -> str:
    """The directory of level `level`'s prior (0 = top)."""
    return self._join(f'prior_{int(level)}')

  @property
  def codes(self) -> str:
    """The extracted codes of both splits (--mode=codes)."""
    return self._join('codes')

  def samples(self, name: str | None = None) -> str:
    """The sample runs' directory, or that of the run called `name`."""
    if name is None:
      return self._join('samples')
    return self._join('samples', name)

  @property
  def classifier(self) -> str:
    """The domain classifier's directory (--mode=classifier)."""
    return self._join('classifier')

  @property
  def eval(self) -> str:
    """--mode=eval's report."""
    return self._join('eval')

  @property
  def report_json(self) -> str:
    """The evaluation report's figures."""
    return os.path.join(self.eval, 'report.json')

  @property
  def report_md(self) -> str:
    """The evaluation report as Markdown tables."""
    return os.path.join(self.eval, 'report.md')

  def cas(self, examples: str, run: str = '') -> str:
    """A CAS classifier's directory: trained on 'samples' (of sample run
    `run`, so that each run's classifier is kept and another run's does not
    block it) or on 'reconstructions'."""
    return os.path.join(self.eval,
                        f'cas_{examples}' + (f'_{run}' if run else ''))

  @property
  def export(self) -> str:
    """--mode=export's files."""
    return self._join('export')

  def exported_files(self) -> list[str]:
    """The exported pipelines (*.msgpack) in `export`, sorted by name."""
    if not os.path.isdir(self.export):
      return []
    return [os.path.join(self.export, n) for n in sorted(os.listdir(
        self.export)) if n.endswith('.msgpack')]


def checkpoint_dir(stage_dir: 'str | os.PathLike[str]') -> str:
  """Where a stage's orbax checkpoints live: <stage_dir>/checkpoints."""
  return os.path.join(os.fspath(stage_dir), 'checkpoints')


def metrics_json(stage_dir: 'str | os.PathLike[str]') -> str:
  """A stage's final metrics: <stage_dir>/metrics.json."""
  return os.path.join(os.fspath(stage_dir), 'metrics.json')


def progress_json(stage_dir: 'str | os.PathLike[str]') -> str:
  """A stage's training figures so far, written with every checkpoint."""
  return os.path.join(os.fspath(stage_dir), 'progress.json')


def log_txt(stage_dir: 'str | os.PathLike[str]') -> str:
  """A stage's full log: <stage_dir>/log.txt."""
  return os.path.join(os.fspath(stage_dir), 'log.txt')


def scalars_jsonl(stage_dir: 'str | os.PathLike[str]') -> str:
  """A stage's logged scalars, one JSON line per write, where TensorBoard's
  event files cannot be written (no TensorFlow or clu, e.g. an accelerator
  image): <stage_dir>/scalars.jsonl."""
  return os.path.join(os.fspath(stage_dir), 'scalars.jsonl')

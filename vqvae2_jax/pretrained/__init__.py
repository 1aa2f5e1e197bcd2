r"""Shipped pretrained pipelines: exported files that load by name.

`Pipeline.load('fashion_mnist')` loads the file of the spec of that name
(an `api.Pipeline.export` file: config, VQ-VAE and priors in one msgpack),
after checking its sha256 against the one pinned here, so a user samples in
seconds before training anything. Each spec says the command that made the
file, the sampling settings it loads with and the figures the README
quotes for it at them (measured by the shipped judge), which a test checks
on a small batch of the file's own samples. A file is committed once, when
its recipe is final: a new recipe gets a new name, so a name always means
the same weights; a better way to sample them is a change of the spec's
`sampling`, not of the file.
"""

import dataclasses
import os
from typing import Any, Mapping

from vqvae2_jax import errors
from vqvae2_jax import files

_HERE = os.path.dirname(os.path.abspath(__file__))


class PretrainedFileError(errors.UserError):
  """A shipped pretrained file that is missing or not the pinned one."""


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
  """One shipped pipeline.

  Attributes:
    name: what `Pipeline.load` takes.
    filename: the exported file, relative to this directory (or absolute).
    sha256: hex digest the file must have.
    command: the commands that made it (training, then --mode=export).
    class_agreement: the judge's class agreement of its class-balanced
      samples (temperature 1, no rejection; guidance and contrast as it
      loads) as the README quotes it, over `num_samples` samples.
    num_samples: how many samples `class_agreement` was measured on.
    sampling: `config.sampling` fields that `Pipeline.load(name)` sets over
      the file's own config (e.g. `guidance_per_level`, `contrast`): the
      settings its samples default to. Loading the file by its path keeps
      the file's config as exported.
  """
  name: str
  filename: str
  sha256: str
  command: str
  class_agreement: float
  num_samples: int
  sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def path(self) -> str:
    return os.path.join(_HERE, self.filename)


# name -> spec. A better recipe ships under a new name (see above).
PRETRAINED: dict[str, PretrainedSpec] = {
    # configs/fashion_mnist.py:quality: the default's stage 1 (3000 steps)
    # and codes, priors of 96 channels trained 8000 steps each (3.16M
    # parameters; held-out bits 3.30 / 4.03). 18.7 MB. Its 10,000
    # class-balanced samples (temperature 1, no rejection) under the judge:
    # class agreement 81.4%, precision 0.842, recall 0.386, FID 2.41, IS
    # 7.13 (docs/results.md, prior scaling study, row 'quality'); with the
    # variant's guidance 1.5 (`sample(..., guidance=1.5)`): 91.8%, 0.855,
    # 0.378, 1.71, 7.99 (docs/results.md, the quality variant's trade-off);
    # at its guidance since, 1.5 top and 2 bottom (`guidance=(1.5, 2)`):
    # 92.6%, 0.857, 0.377, 1.57, 8.08; and as it loads since stop 52, at
    # :quality's present sampling, guidance 1.3 top and 2 bottom with a
    # bottom discount of 8 times the code frequencies (`guidance=(1.3, 2),
    # discount=(0, 8)`; experiments/figures/discount_quality.json): 91.5%,
    # 0.864, 0.447, 1.12, 8.10; by the discount's squared rule since stop
    # 54 (experiments/figures/discount_squared.json): 91.9%, 0.867, 0.454,
    # 1.06, 8.12.
    'fashion_mnist': PretrainedSpec(
        name='fashion_mnist',
        filename='fashion_mnist.msgpack',
        sha256=('db34f0975835e19ac0e33bbdddced895'
                '1f071023951d577fb42e264f67d88d60'),
        command=(
            # Makes W's stage 1 and codes first when missing.
            'python -m experiments.prior_scaling --base_workdir=W --out=O '
            "--set='quality:prior.level_0.num_channels=96,"
            'prior.level_1.num_channels=96,prior.num_train_steps=8000,'
            'prior.polyak_decay=0.9995,prior.eval_every=8000,'
            "prior.checkpoint_every=1000'; python -m vqvae2_jax.main "
            '--config=configs/fashion_mnist.py:quality --workdir=O/quality '
            # The file's config samples as the variant did when it was
            # made, without guidance (`sampling` sets it on load).
            "'--config.sampling.guidance_per_level=()' --mode=export"),
        class_agreement=0.919,
        num_samples=10_000,
        sampling={'guidance_per_level': (1.3, 2.0), 'discount': (0.0, 8.0)}),
    # configs/fashion_mnist.py:long as of stop 41, the top prior 64 channels
    # wide (:long now widens it to 128: 'fashion_mnist_long128'): stage 1 trained 9000 steps, the priors
    # 16000, the bottom prior 128 channels (3.58M prior parameters;
    # held-out bits 3.82 / 4.59). 20.4 MB. Its 10,000 class-balanced
    # samples under the judge at guidance 1.4: class agreement 92.5%,
    # precision 0.893, recall 0.541, FID 0.84, IS 8.20 (docs/results.md,
    # "Which prior loses the recall"); the best shipped until stop 43.
    'fashion_mnist_long': PretrainedSpec(
        name='fashion_mnist_long',
        filename='fashion_mnist_long.msgpack',
        sha256=('4feda442e81b2ecd712a7d9abd319a7c'
                '8e2b8cd1c3c5687abb65cda4575c1e90'),
        command='; '.join(
            'python -m vqvae2_jax.main --config=configs/fashion_mnist.py:long '
            '--config.prior.level_0.num_channels=64 '
            "--config.sampling.guidance=1.4 '--config.sampling."
            f"guidance_per_level=()' --workdir=W --mode={mode}"
            for mode in ('vqvae', 'codes', 'prior', 'export')),
        class_agreement=0.9247,
        num_samples=10_000),  # Its file's config samples at guidance 1.4.
    # configs/fashion_mnist.py:long as of stop 43: stage 1 trained 9000
    # steps, both priors 128 channels wide and trained 16000 steps (5.51M
    # prior parameters; held-out bits 3.73 / 4.59), samples drawn with
    # guidance 1.3 at the top level and 2 at the bottom. The priors' weights
    # are stored in float16 (17.1 MB; 28.1 MB in float32, over the ~20 MB
    # cap for shipped files): its 10,000 class-balanced samples under the
    # judge (experiments/export_dtype.py, rows in
    # experiments/figures/export_dtype_long.json): class agreement 92.95%,
    # precision 0.892, recall 0.569, FID 0.73, IS 8.29, against the float32
    # weights' 92.94%, 0.893, 0.571, 0.73, 8.29 (97.5% of the samples the
    # same codes). As it loads since stop 52, at :long's sampling since:
    # guidance 1.15 top, 2 bottom, and a bottom discount of 8 times the
    # code frequencies (`guidance=(1.15, 2), discount=(0, 8)`; `python -m
    # experiments.contrast_sweep --pipeline=fashion_mnist_long128
    # --contrast=0 --discount=0:8 --guidance=1.15:2`, rows in
    # experiments/figures/discount_long128.json): 92.58%, 0.893, 0.649,
    # 0.42, 8.26; by the discount's squared rule since stop 54
    # (experiments/figures/discount_squared.json): 92.53%, 0.891, 0.647,
    # 0.40, 8.26. The best shipped.
    'fashion_mnist_long128': PretrainedSpec(
        name='fashion_mnist_long128',
        filename='fashion_mnist_long128.msgpack',
        sha256=('d3d555b392a2b23ac80b50fd05269cc4'
                '574f5b2e7f2a3252f8bc71f9983754f6'),
        command='; '.join(
            'python -m vqvae2_jax.main --config=configs/fashion_mnist.py:long '
            f'--workdir=W --mode={mode}'
            for mode in ('vqvae', 'codes', 'prior',
                         'export --config.prior.export_dtype=float16')),
        class_agreement=0.9253,
        num_samples=10_000,
        # The file's config samples at guidance (1.3, 2.0), without.
        sampling={'guidance_per_level': (1.15, 2.0),
                  'discount': (0.0, 8.0)}),
}


def checked_path(name: str) -> str:
  """The path of pretrained pipeline `name`, after checking its digest.

  Raises:
    PretrainedFileError: `name` is not shipped, its file is missing (an
      install without the package data), or it is not the pinned file.
  """
  spec = PRETRAINED.get(name)
  if spec is None:
    raise PretrainedFileError(
        f'No pretrained pipeline named {name!r}. Fix: use one of '
        f'{sorted(PRETRAINED) or "(none shipped)"}, or pass a workdir or an '
        'exported file.')
  if not os.path.isfile(spec.path):
    raise PretrainedFileError(
        f'The pretrained file {spec.path} is missing (installed without the '
        'package data?). Fix: install from a checkout with '
        '`pip install -e .`, or export it yourself: ' + spec.command)
  found = files.sha256_file(spec.path)
  if found != spec.sha256:
    raise PretrainedFileError(
        f'{spec.path} has sha256 {found}, not the shipped {spec.sha256}. '
        'Fix: restore the file from the repository (git checkout -- '
        f'{spec.filename}), or load your own export by its path.')
  return spec.path

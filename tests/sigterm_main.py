"""vqvae2_jax.main with a SIGTERM sent to itself at a chosen phase.

  python -m tests.sigterm_main <phase> --config=... --workdir=... --mode=...

A preemption notice at a deterministic point, not after a guessed sleep:
the process signals itself from inside the phase, and the handler runs at
once, on the main thread, as a notice from outside would. Phases:

  codes       after the first code shard is written;
  prior_eval  at the start of a prior's evaluation (its final one, when the
              stage's last checkpoint is on disk without metrics.json);
  sample      as the first batch of maps is sampled;
  eval        as the evaluation report starts its work.
"""

import os
import signal
import sys

from absl import app

from vqvae2_jax import main
from vqvae2_jax import sampling
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.evaluation import run as eval_run
from vqvae2_jax.train import prior_trainer


def _first_call_signals(module, name):
  """Makes `module.name` send SIGTERM to this process when first called."""
  real, calls = getattr(module, name), []

  def wrapped(*args, **kwargs):
    if not calls:
      calls.append(1)
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  setattr(module, name, wrapped)


def _after_first_shard():
  real, written = codes_lib.write_shard, []

  def write_shard(path, records):
    real(path, records)
    if not written:
      written.append(path)
      os.kill(os.getpid(), signal.SIGTERM)

  codes_lib.write_shard = write_shard


_PHASES = {
    'codes': _after_first_shard,
    'prior_eval': lambda: _first_call_signals(prior_trainer, 'evaluate'),
    'sample': lambda: _first_call_signals(sampling, 'sample_hierarchy'),
    'eval': lambda: _first_call_signals(eval_run, '_reconstruction_pass'),
}

if __name__ == '__main__':
  _PHASES[sys.argv.pop(1)]()
  # pylint: disable-next=protected-access
  app.run(main.main, flags_parser=main._parse_flags)

r"""Runs a stage of VQ-VAE-2, or the whole pipeline.

  python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
    --workdir=/tmp/vqvae2_fmnist --mode=all

Modes: data (prepare and preview the input), vqvae (stage 1), codes (extract
the training set's codes), prior (stage 2), sample (stage 3), classifier (the
domain classifier: rejection scorer and CAS recipe), eval (the evaluation
report), export (every stage in one file for `vqvae2_jax.Pipeline.load`),
all (the classifier only where rejection, CAS or the ruler uses it).
Every stage resumes from what `workdir` already holds.

The console shows each stage's header, progress, results and files, and
every warning; the full log of a training stage is in workdir/<stage>/log.txt
(`console`). --verbosity=1 adds this project's details and the tracebacks
of user errors; --verbosity=2 also the libraries' INFO lines (orbax, JAX,
TensorFlow: thousands of lines).
"""

import os
import re
import sys

_ASKED = [int(m.group(2)) for m in (
    re.fullmatch(r'--?(v|verbosity)=(\d+)', a) for a in sys.argv) if m]
if not _ASKED or _ASKED[-1] < 2:
  # TensorFlow's C++ start-up banners (INFO; warnings too unless --verbosity
  # is 1), unless --verbosity=2 asks for them (before anything imports
  # TensorFlow).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL',
                        '1' if _ASKED and _ASKED[-1] == 1 else '2')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vqvae2_jax import console
from vqvae2_jax import errors
from vqvae2_jax import hostmem
from vqvae2_jax import stages

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    'config', None, 'Configuration file, e.g. configs/fashion_mnist.py.',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, codes, samples and metrics.')
flags.DEFINE_enum('mode', 'all', list(stages.MODES), 'Stage to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def _show_tracebacks() -> bool:
  """--verbosity=1 (or more) shows the traceback of a user-fixable error."""
  return FLAGS.verbosity >= 1


def _config_problem(error: Exception) -> str:
  """One line saying what is wrong with --config or an override, and a fix."""
  try:
    filename = FLAGS['config'].config_filename
  except Exception:  # pylint: disable=broad-except
    # Parsing failed before the flag kept its argument: read the command line.
    filename = next((a.split('=', 1)[1] for a in sys.argv
                     if a.startswith('--config=')), '?')
  path = filename.split(':')[0]
  if not os.path.isfile(path):
    return (f'--config={filename}: there is no file {path!r} (from '
            f'{os.getcwd()}). Fix: pass a config file, e.g. '
            '--config=configs/fashion_mnist.py')
  text = str(error).encode().decode('unicode_escape')
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if hint:
    return (f'--config: no field {hint.group(2)!r}. Fix: did you mean '
            f'{hint.group(1)!r}? (see {path} and configs/common.py)')
  return (f'--config={filename} or one of its --config.* overrides could not '
          f'be loaded: {text.strip()}. Fix: correct the file or the override '
          '(--verbosity=1 shows the traceback)')


def _verbose(argv: list[str]) -> bool:
  """--verbosity=1 (or more) on the command line, before flags are parsed."""
  return any(re.fullmatch(r'--?(v|verbosity)=[1-9]\d*', a) for a in argv)


def _flag_fix(error: flags.Error) -> str | None:
  """One line for a flag whose loading raised an error with a fix.

  A config file refusing its argument (`get_config('small')`) reaches absl
  as a flag error holding the config's traceback; its last line that holds
  "Fix:" is the message. None for other flag errors.
  """
  lines = [line for line in str(error).splitlines() if 'Fix:' in line]
  if not lines:
    return None
  message = re.sub(r'^\w+(Error|Exception): ', '', lines[-1].strip())
  flag = re.match(r'flag (--\S+?): ', str(error))
  return f'{flag.group(1)}: {message}' if flag else message


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config mistakes that carry a fix as one line.

  A misspelled --config.* field, or a config file that refuses its variant
  (configs/fashion_mnist.py:small), is one line ending in "Fix: ..."; with
  --verbosity=1 absl's full message and the traceback.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fix = _flag_fix(e)
    if fix is not None and not _verbose(argv):
      sys.exit(f'Error: {fix}')
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --helpshort or '
             '--helpfull to see help on flags.')
  except (AttributeError, KeyError) as e:
    if _verbose(argv):
      raise
    sys.exit(f'Error: {_config_problem(e)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    config = FLAGS.config
    config.data  # pylint: disable=pointless-statement
    # (ml_collections reports a bad file or override on first use.)
  except Exception as e:  # pylint: disable=broad-except
    if _show_tracebacks():
      raise
    sys.exit(f'Error: {_config_problem(e)}')
  if FLAGS.verbosity < 1:
    console.quiet()
  elif FLAGS.verbosity == 1:
    console.project_details()
  # Before JAX and TensorFlow start their threads (see hostmem). TensorFlow
  # is imported only by a stage that reads data or writes metrics
  # (`console.tensorflow`), so a config mistake fails in a few seconds.
  hostmem.tune_malloc()
  logging.info('Mode %s, workdir %s', FLAGS.mode, FLAGS.workdir)
  try:
    stages.run(FLAGS.mode, config, FLAGS.workdir)
  except errors.Preempted as e:
    # Not a failure: the checkpoint is saved and a rerun resumes (exit 0).
    logging.warning('%s', e)
  except errors.UserError as e:
    # Bad input, or a stage whose input another --mode makes: the message
    # says what to do; a traceback would only hide it.
    if _show_tracebacks():
      raise
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

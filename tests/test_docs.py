"""The README stays a short guide whose commands, links and paths are true.

README.md is the guide (set-up commands first, a code map, usage); docs/
holds the measurements. These checks keep both honest: the two set-up
commands are the ones scripts/ and .ci/ run, every relative link and every
repository path they name exists, every `python -m` module they run is in
the repository, every --mode has a row in the code map, and nothing points
at a machine-specific place a user does not have.
"""

import pathlib
import re

import pytest

from vqvae2_jax import stages

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_README = _ROOT / 'README.md'
_MAX_README_LINES = 260
_SETUP_COMMANDS = ('bash scripts/demo.sh', 'bash scripts/test.sh')
# Folders whose text must not point into this project's build machine.
_NO_MACHINE_PATHS = ('docs', 'experiments', 'configs', 'colabs', 'scripts')
_MACHINE_PATHS = ('/work/', '../shared', 'shared/peer')
# Modules a command may run that are not files of this repository.
_EXTERNAL_MODULES = ('pytest', 'pip', 'venv', 'tensorboard')
# A repository path named in the text: a top-level folder, then a file.
_REPO_PATH = re.compile(
    r'(?<![\w/.-])((?:vqvae2_jax|experiments|configs|tests|scripts|colabs|'
    r'docs)/[\w/.-]*\.(?:py|sh|ipynb|msgpack|md|png))')
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
_FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.M | re.S)


def _markdown_files() -> list[pathlib.Path]:
  return [_README] + sorted((_ROOT / 'docs').glob('*.md'))


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def _anchors(path: pathlib.Path) -> set[str]:
  text = _FENCE.sub('', path.read_text())
  return {_anchor(m.group(1))
          for m in re.finditer(r'^#+ (.+)$', text, re.M)}


def test_docs_folder_holds_the_measurements():
  names = {p.name for p in (_ROOT / 'docs').glob('*.md')}
  assert {'results.md', 'benchmarks.md'} <= names


def test_docs_readme_is_a_short_guide():
  lines = _README.read_text().splitlines()
  assert len(lines) <= _MAX_README_LINES, (
      f'README.md has {len(lines)} lines; measurements belong in docs/.')


def test_docs_readme_starts_with_the_two_set_up_commands():
  text = _README.read_text()
  first_block = _FENCE.search(text)
  assert first_block is not None
  # The set-up block comes first, right under the opening paragraphs.
  assert text[:first_block.start()].count('\n') < 25
  commands = [line.split('#')[0].strip()
              for line in first_block.group(1).splitlines() if line.strip()]
  assert tuple(commands) == _SETUP_COMMANDS


def test_docs_set_up_commands_are_what_the_scripts_and_ci_run():
  demo = (_ROOT / 'scripts' / 'demo.sh').read_text()
  assert 'bash scripts/setup.sh' in demo
  assert re.search(r'-m vqvae2_jax\.main --config=configs/fashion_mnist\.py'
                   r'[^\n]*\n[^\n]*--mode=all', demo), demo
  test = (_ROOT / 'scripts' / 'test.sh').read_text()
  assert 'bash scripts/setup.sh' in test and '-m pytest' in test
  assert 'bash scripts/test.sh' in (_ROOT / '.ci' / 'run').read_text()


@pytest.mark.parametrize('path', _markdown_files(),
                         ids=lambda p: str(p.relative_to(_ROOT)))
def test_docs_relative_links_resolve(path):
  missing = []
  for target in _LINK.findall(path.read_text()):
    if re.match(r'[a-z]+:', target):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition('#')
    linked = (path.parent / file_part).resolve() if file_part else path
    if not linked.exists():
      missing.append(target)
    elif anchor and linked.suffix == '.md' and anchor not in _anchors(linked):
      missing.append(target)
  assert not missing, f'{path.name}: links that resolve to nothing: {missing}'


@pytest.mark.parametrize('path', _markdown_files(),
                         ids=lambda p: str(p.relative_to(_ROOT)))
def test_docs_repository_paths_exist(path):
  named = set(_REPO_PATH.findall(path.read_text()))
  missing = sorted(p for p in named if not (_ROOT / p).exists())
  assert not missing, f'{path.name} names files that do not exist: {missing}'


@pytest.mark.parametrize('path', _markdown_files(),
                         ids=lambda p: str(p.relative_to(_ROOT)))
def test_docs_python_modules_exist(path):
  modules = set(re.findall(r'python3? -m ([\w.]+)', path.read_text()))
  missing = sorted(
      m for m in modules if m not in _EXTERNAL_MODULES
      and not (_ROOT / (m.replace('.', '/') + '.py')).exists())
  assert not missing, f'{path.name} runs modules that do not exist: {missing}'


def test_docs_code_map_names_every_mode():
  text = _README.read_text()
  rows = set(re.findall(r'^\| `--mode=(\w+)` \|', text, re.M))
  assert rows == set(stages.MODES)


def test_docs_no_machine_specific_paths():
  files = [_README] + [
      p for folder in _NO_MACHINE_PATHS for p in (_ROOT / folder).rglob('*')
      if p.is_file() and p.suffix in ('.md', '.py', '.sh', '.ipynb', '.txt')]
  found = [f'{p.relative_to(_ROOT)}: {s}' for p in files
           for s in _MACHINE_PATHS if s in p.read_text()]
  assert not found, ('Paths a user does not have (say how to set the thing '
                     'up instead):\n' + '\n'.join(found))

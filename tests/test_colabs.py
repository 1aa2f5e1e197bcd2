"""Every notebook in colabs/ runs top to bottom (its quick, tiny-config path).

The kernel starts in the repository root, inherits this session's
environment (CPU, 8 fake devices, the session's tfds data_dir) and writes its
work directory under the test's tmp_path.

The quick path trains each stage 300 steps on 4,096 images, for figures a
reader can look at; a run of the cells needs none of that. So a cell put
right after the one that builds `config` shortens the training (the same
stages, code and checks, a few steps each on fewer images), and the cells
are otherwise run as they are.
"""

import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOTEBOOKS = sorted((_ROOT / 'colabs').glob('*.ipynb'))
_CONFIG_CELL = 'QUICK = True'  # Marks the cell that builds `config`.
_SHORTEN = '''\
config.data.train_split = 'train[:512]'
config.data.eval_split = 'test[:128]'
for section in (config.vqvae_train, config.prior, config.classifier):
  section.update(num_train_steps=20, warmup_steps=4, log_every=10,
                 eval_every=20, checkpoint_every=10)
'''


def _shortened(notebook):
  """`notebook` with the `_SHORTEN` cell after the config cell."""
  (index,) = [i for i, cell in enumerate(notebook.cells)
              if cell.cell_type == 'code' and _CONFIG_CELL in cell.source]
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(_SHORTEN))
  return notebook


def test_there_are_notebooks():
  assert _NOTEBOOKS, 'colabs/ has no notebooks'


@pytest.mark.parametrize('path', _NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv('VQVAE2_WORKDIR', str(tmp_path / 'workdir'))
  notebook = _shortened(nbformat.read(path, as_version=4))
  NotebookClient(notebook, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': str(_ROOT)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 4, 'expected the preview, recon and sample grids'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'identical codes from both samplers' in text
  assert '40 samples from the shipped model' in text
  assert 'candidates (acceptance 25%)' in text  # Rejection sampling ran.
  # The shortened run: the stages stopped at 20 steps, not the notebook's.
  assert f'{"step":28s} 20\n' in text
  # From Python each stage shows its console (`console.python_console`),
  # the progress line redrawn in place in the cell.
  shown = ''.join(o.get('text', '') for o in outputs
                  if o.get('name') == 'stderr')
  assert 'VQ-VAE: 20 steps of batch 32' in shown
  assert '\rVQ-VAE: step 20/20 (100%)' in shown

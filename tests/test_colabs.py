"""Every notebook in colabs/ runs top to bottom (its quick, tiny-config path).

The kernel starts in the repository root, inherits this session's
environment (CPU, 8 fake devices, the session's tfds data_dir) and writes its
work directory under the test's tmp_path.
"""

import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOTEBOOKS = sorted((_ROOT / 'colabs').glob('*.ipynb'))


def test_there_are_notebooks():
  assert _NOTEBOOKS, 'colabs/ has no notebooks'


@pytest.mark.parametrize('path', _NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv('VQVAE2_WORKDIR', str(tmp_path / 'workdir'))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': str(_ROOT)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 4, 'expected the preview, recon and sample grids'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'identical codes from both samplers' in text
  assert 'candidates (acceptance 25%)' in text  # Rejection sampling ran.

"""What imports without TensorFlow, tfds and clu (accelerator images).

A GPU or TPU image often has JAX and not TensorFlow: the models, the sampler,
the Pipeline, the train steps and the experiments that run there must import
without it. Each case imports one module in a fresh interpreter whose import
system refuses TensorFlow, tfds, clu and TensorBoard, as if they were absent.
"""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard')

# Runs in the child: refuse the blocked packages (any submodule too), import
# the module (and the attribute, for lazy package attributes), then check
# that nothing blocked was loaded all the same (e.g. behind a try/except).
_CHILD = """
import importlib, sys
BLOCKED = {blocked!r}
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{{name}} is blocked by tests/test_imports.py')
    return None
sys.meta_path.insert(0, Refuse())
module = importlib.import_module({module!r})
if {attribute!r}:
  getattr(module, {attribute!r})
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
assert not loaded, f'loaded: {{loaded}}'
"""

# (module, attribute read after the import or None).
_MODULES = [
    ('vqvae2_jax', 'Pipeline'),  # The package's lazy attribute.
    ('vqvae2_jax.api', None),
    ('vqvae2_jax.sampling', None),
    ('vqvae2_jax.models.vqvae', None),
    ('vqvae2_jax.models.quantizer', None),
    ('vqvae2_jax.models.pixelcnn', None),
    ('vqvae2_jax.models.classifier', None),
    ('vqvae2_jax.models.inception', None),
    ('vqvae2_jax.models.judge', None),
    ('vqvae2_jax.evaluation.judges', None),
    ('vqvae2_jax.data.idx_files', None),
    ('vqvae2_jax.builders', None),
    ('vqvae2_jax.loading', None),
    ('vqvae2_jax.generate', None),
    ('vqvae2_jax.workdir', None),
    ('vqvae2_jax.images', None),
    ('vqvae2_jax.parallel', None),
    ('vqvae2_jax.console', None),
    ('vqvae2_jax.files', None),
    ('vqvae2_jax.train.vqvae_trainer', None),
    ('vqvae2_jax.train.prior_trainer', None),
    ('vqvae2_jax.train.classifier_trainer', None),
    ('vqvae2_jax.train.extract', None),
    ('experiments.accelerator_check', None),
    ('experiments.train_judge', None),
    ('experiments.compiled_steps', None),
    ('experiments.bench_sampling', None),
    ('experiments.bench_memory', None),
    ('experiments.sampler_variants', None),
]


@pytest.mark.parametrize('module,attribute', _MODULES,
                         ids=[m for m, _ in _MODULES])
def test_imports_without_tensorflow(module, attribute):
  code = _CHILD.format(blocked=_BLOCKED, module=module, attribute=attribute)
  # cwd = the repository root: the child imports this checkout's package.
  done = subprocess.run([sys.executable, '-c', code], cwd=_ROOT,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, (
      f'{module} needs one of {_BLOCKED} at import time; import it inside '
      f'the function that reads data or writes metrics.\n{done.stderr}')

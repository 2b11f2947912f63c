"""Training and evaluation on a machine without TensorFlow (e.g. a JAX-only GPU or TPU image).

The commands run in subprocesses in which `tensorflow` and `tensorflow_datasets` cannot be
imported: `python -m unetpp_jax.main` trains a few real steps from the numpy source, then
`python -m unetpp_jax.evaluate --split=validation` evaluates its checkpoint on a Kaggle-layout
folder, selecting the validation images from the ids training recorded (no dataset preparation).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from unetpp_jax.data import contract

REPO = pathlib.Path(__file__).resolve().parents[1]
S = 32
OVERRIDES = ('--config.data.image_size=32', '--config.model.filters=(4,8,16,32)',
             '--config.batch_size=4', '--config.eval_batch_size=4',
             '--config.num_train_steps=3', '--config.log_every_steps=1',
             '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3')
# Runs a module as `python -m` does, with tensorflow and TFDS unimportable (any import of them or
# of their submodules raises ImportError, as on a machine without them).
BLOCKED = """
import runpy, sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def _examples(n: int, prefix: str, rng: np.random.Generator) -> contract.Examples:
  """Bright squares (nuclei) on noise."""
  images = (rng.random((n, S, S, 3)) * 80).astype(np.uint8)
  labels = np.zeros((n, S, S), np.uint16)
  for i in range(n):
    y, x = rng.integers(0, 20, 2)
    labels[i, y:y + 10, x:x + 10] = 1
    images[i, y:y + 10, x:x + 10] += 150
  return contract.Examples(np.array([f'{prefix}{i}' for i in range(n)]), images, labels)


def _write_release(examples: contract.Examples, root: pathlib.Path) -> None:
  """The examples as a Kaggle-layout folder: <id>/images/<id>.png, <id>/masks/0.png."""
  for image_id, image, label in zip(examples.ids, examples.images, examples.labels):
    (root / image_id / 'images').mkdir(parents=True)
    (root / image_id / 'masks').mkdir()
    Image.fromarray(image).save(root / image_id / 'images' / f'{image_id}.png')
    Image.fromarray(((label > 0) * 255).astype(np.uint8)).save(root / image_id / 'masks' / '0.png')


def _run_blocked(*args: str) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, '-c', BLOCKED, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_train_then_evaluate_without_tensorflow(tmp_path):
  rng = np.random.default_rng(0)
  train, val = _examples(8, 'train', rng), _examples(4, 'val', rng)
  npz = tmp_path / 'tiny.npz'
  contract.save_npz(str(npz), contract.NpzData(train, val, S, 'synthetic_nuclei', 0.2,
                                                     'grouped'))
  release = tmp_path / 'release'
  _write_release(train.slice(0, 2), release)  # Two training images, which the split leaves out.
  _write_release(val, release)
  workdir = tmp_path / 'work'

  _run_blocked('unetpp_jax.main', '--config=configs/synthetic.py', f'--workdir={workdir}',
               f'--config.data.source=npz:{npz}', *OVERRIDES)
  assert (workdir / 'checkpoints' / '3').is_dir()
  assert list(workdir.glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'eval_metrics.json').read_text())['step'] == 3
  assert json.loads((workdir / 'validation_ids.json').read_text()) == list(val.ids)

  output = tmp_path / 'eval'
  result = _run_blocked('unetpp_jax.evaluate', f'--workdir={workdir}', f'--data={release}',
                        f'--output={output}', '--split=validation', '--num_overlays=1')
  report = json.loads((output / 'metrics.json').read_text())
  assert report['checkpoint_step'] == 3 and report['num_images'] == len(val)
  assert 0 <= report['score'] <= 1 and 0 <= report['iou'] <= 1
  assert list(output.glob('events.out.tfevents.*'))
  assert json.loads(result.stdout[result.stdout.index('{'):result.stdout.rindex('}') + 1])[
      'num_images'] == len(val)

"""Multi-host training with real processes: 2 processes x 2 CPU devices, gloo collectives.

One reference process with 4 devices trains on the same global batches (tests/emulate_processes.py)
and writes a checkpoint at step 2; two real processes resume from it (a single-process checkpoint
restoring in a multi-process job), train to step 4, and must agree with each other and with the
reference; their step-4 checkpoint then restores in this single process.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import summaries
from configs import synthetic
from unetpp_jax import checkpointing, models, steps, train
from unetpp_jax.evaluation import evaluate
from unetpp_jax.workdir import Workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 420
OVERRIDES = [
    '--config.data.image_size=32', '--config.model.filters=(4,8,16,32)', '--config.batch_size=8',
    '--config.eval_batch_size=8', '--config.log_every_steps=1', '--config.eval_every_steps=4',
    '--config.checkpoint_every_steps=2', '--config.num_train_steps=4',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')


def _run_all(commands: list[list[str]], devices: int, logs: pathlib.Path) -> list[str]:
  """Runs the commands concurrently; kills all of them on a timeout or failure of any."""
  procs = []
  try:
    for i, command in enumerate(commands):
      out = open(logs / f'process{i}.log', 'w')  # pylint: disable=consider-using-with
      procs.append((subprocess.Popen(command, cwd=REPO, env=_env(devices), stdout=out,
                                     stderr=subprocess.STDOUT), out))
    for proc, _ in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc, out in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      out.close()
  texts = [(logs / f'process{i}.log').read_text() for i in range(len(commands))]
  for (proc, _), text in zip(procs, texts):
    assert proc.returncode == 0, text[-4000:]
  return texts


def _digests(logs: list[str]) -> list[str]:
  return [re.search(r'parameter digest (\w+)', log).group(1) for log in logs]


def test_two_processes_match_one_process_and_share_checkpoints(tmp_path):
  data_dir = tmp_path / 'tfds'
  common = [f'--config.data.tfds_data_dir={data_dir}', *OVERRIDES]

  # Reference: one process, 4 devices, the 2-process job's global batches; steps 1..4.
  reference = tmp_path / 'reference'
  (log,) = _run_all([[sys.executable, '-m', 'tests.emulate_processes', str(reference), '2',
                      '--config=configs/synthetic.py', *common]], devices=4, logs=tmp_path)
  reference_losses = summaries.scalars(reference, 'train/loss')
  assert sorted(reference_losses) == [1, 2, 3, 4]

  # The job resumes from the reference's step-2 checkpoint (written by a single process).
  job = tmp_path / 'job'
  (job / 'checkpoints').mkdir(parents=True)
  shutil.copytree(reference / 'checkpoints' / '2', job / 'checkpoints' / '2')
  shutil.copy(reference / 'config.json', job / 'config.json')
  port = _free_port()
  logs = _run_all(
      [[sys.executable, '-m', 'unetpp_jax.main', '--config=configs/synthetic.py',
        f'--workdir={job}', f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={i}', *common] for i in range(2)],
      devices=2, logs=tmp_path)
  assert all('Restoring checkpoint of step 2' in l for l in logs)
  assert 'JAX process 1 of 2' in logs[1]

  # Both processes hold identical parameters, equal to the reference's up to float rounding.
  digests = _digests(logs)
  assert digests[0] == digests[1]
  # Only process 0 writes summaries, config.json and eval metrics.
  assert len(list(job.glob('events.out.tfevents.*'))) == 1
  job_losses = summaries.scalars(job, 'train/loss')
  assert sorted(job_losses) == [3, 4]
  for step in (3, 4):
    assert job_losses[step] == pytest.approx(reference_losses[step], rel=1e-4)

  # The job's step-4 checkpoint (written by 2 processes) restores in this single process.
  config = synthetic.get_config()
  config.data.image_size = 32
  config.model.filters = (4, 8, 16, 32)
  # Process 0 recorded both processes' validation ids, in the split's (the TFDS builder's) order.
  config.data.tfds_data_dir = str(data_dir)
  assert json.loads((job / 'validation_ids.json').read_text()) == evaluate.split_ids(
      config, 'validation')
  template = steps.create_train_state(config, jax.random.key(0), models.create_model(config.model))
  mngr = Workdir(job).checkpoint_manager()
  assert mngr.latest_step() == 4
  restored = checkpointing.restore_or_initialize(mngr, template)
  assert int(restored.step) == 4
  assert train.parameter_digest(restored.params) == digests[0]
  reference_state = checkpointing.restore_or_initialize(Workdir(reference).checkpoint_manager(),
                                                        template)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

"""The command line, as a user runs it: a subprocess on the synthetic config."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, cwd=REPO, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [sys.executable, '-m', 'unetpp_jax.main', *args], cwd=cwd, env=env, capture_output=True,
      text=True, timeout=timeout, check=False,
  )


def test_cli_trains_writes_checkpoints_and_summaries_then_resumes(tmp_path):
  workdir = tmp_path / 'work'
  common = [  # A relative workdir, like the default one (workdirs/<config name>).
      '--config=configs/synthetic.py', f'--workdir={os.path.relpath(workdir, REPO)}',
      f'--config.data.tfds_data_dir={tmp_path / "tfds"}', '--config.data.image_size=32',
      '--config.model.filters=(4,8,16,32)', '--config.log_every_steps=2',
      '--config.eval_every_steps=4', '--config.checkpoint_every_steps=2',
  ]
  result = run_main(*common, '--config.num_train_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [
      '2', '4']
  assert list(workdir.glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'config.json').read_text())['model']['filters'] == [4, 8, 16, 32]
  assert json.loads((workdir / 'eval_metrics.json').read_text())['step'] == 4

  # The same command with more steps continues from the last checkpoint.
  result = run_main(*common, '--config.num_train_steps=6')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Restoring checkpoint of step 4' in result.stderr
  assert 'Training from step 4 to 6' in result.stderr
  assert json.loads((workdir / 'eval_metrics.json').read_text())['step'] == 6


def test_cli_rejects_unknown_and_invalid_config_fields(tmp_path):
  result = run_main('--config=configs/synthetic.py', f'--workdir={tmp_path}',
                    '--config.model.filtres=(4,8)', timeout=120)
  assert result.returncode != 0 and 'filtres' in result.stderr
  result = run_main('--config=configs/synthetic.py', f'--workdir={tmp_path}',
                    '--config.data.image_size=60', timeout=120)
  assert result.returncode != 0
  assert 'config.data.image_size=60 must be a positive multiple of 2**L = 8' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()

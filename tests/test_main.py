"""The command line, as a user runs it: a subprocess on the synthetic config."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

from unetpp_jax.data import release

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, cwd=REPO, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [sys.executable, '-m', 'unetpp_jax.main', *args], cwd=cwd, env=env, capture_output=True,
      text=True, timeout=timeout, check=False,
  )


# Library lines that must not appear among the progress lines: TensorFlow's and XLA's start-up
# notices, JAX's platform probing, Orbax's INFO lines.
_NOISE = ('oneDNN custom operations', 'absl::InitializeLog', "Unable to initialize backend 'tpu'",
          'CheckpointManager', 'orbax', 'GeneratorDataset')


def error_line(result) -> str:
  """The one-line user error of a failed run; asserts there is exactly one and no traceback."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert errors[0].endswith('(--verbose shows the traceback)')
  return errors[0]


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
  for noise in _NOISE:  # Progress and warnings only; libraries' start-up and INFO chatter is off.
    assert noise not in result.stderr, noise
  assert 'Training from step 0 to 4' in result.stderr
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
  assert error_line(result) == (
      'error: Invalid config: config.data.image_size=60 must be a positive multiple of 2**L = 8 '
      '(L = 3 levels for filters (8, 16, 32, 64)).  (--verbose shows the traceback)')
  assert not (tmp_path / 'checkpoints').exists()


def test_cli_mistyped_config_key_is_one_line_with_the_nearest_keys(tmp_path):
  workdir = tmp_path / 'work'
  line = error_line(run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                             '--config.model.filtres=3', timeout=120))
  assert line == ('error: --config.model.filtres: config has no key model.filtres; did you mean '
                  '--config.model.filters?  (--verbose shows the traceback)')
  # No key is close: the keys of that level are listed instead.
  line = error_line(run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                             '--config.nonsense=1', timeout=120))
  assert line.startswith('error: --config.nonsense: config has no key nonsense; the keys of config '
                         'are batch_size, '), line
  assert 'model, ' in line and 'optimizer, ' in line
  result = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                    '--config.model.filtres=3', '--verbose', timeout=120)
  assert result.returncode == 1 and 'Traceback' in result.stderr
  assert not workdir.exists()


def test_cli_user_errors_are_one_line(tmp_path):
  workdir = tmp_path / 'work'
  line = error_line(run_main('--config=configs/synthetc.py', f'--workdir={workdir}', timeout=120))
  assert line.startswith(f'error: --config=configs/synthetc.py: no such file {REPO}/configs/'
                         'synthetc.py. Configs here: configs/dsb.py,')
  assert 'configs/synthetic.py' in line

  # A tuple that cannot be parsed: said once, without knock-on errors about heads or sizes.
  result = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                    '--config.model.filters=(4,x)', timeout=120)
  assert error_line(result) == (
      'error: Invalid config: config.model.filters=(4,x) cannot be parsed: write a tuple of '
      'numbers, e.g. --config.model.filters="(32,64,128,256,512)".  (--verbose shows the '
      'traceback)')
  assert 'heads' not in result.stderr

  # --verbose shows the traceback instead.
  result = run_main('--config=configs/synthetic.py', f'--workdir={workdir}',
                    '--config.model.filters=(4,x)', '--verbose', timeout=120)
  assert result.returncode == 1 and 'Traceback' in result.stderr
  assert not workdir.exists()


def test_cli_explicit_data_folder_without_release_fails_at_once(tmp_path):
  workdir, tfds_dir = tmp_path / 'work', tmp_path / 'tfds'
  start = time.monotonic()
  result = run_main('--config=configs/dsb.py', f'--workdir={workdir}',
                    f'--config.data.tfds_data_dir={tfds_dir}',
                    f'--config.data.manual_dir={tmp_path / "nope"}', timeout=120)
  # Offline, a download would retry for minutes; start-up alone takes seconds.
  assert time.monotonic() - start < 60
  line = error_line(result)
  assert line.startswith(f'error: The DSB2018 data folder {tmp_path / "nope"} does not exist')
  assert '--config.data.manual_dir' in line and release.DOWNLOAD_URL in line
  assert not workdir.exists()  # A run that fails before it starts leaves no debris.


def test_cli_truncated_zip_says_download_again_and_leaves_no_debris(tmp_path):
  real_zip = REPO.parent / 'shared' / 'data' / 'dsb2018' / 'stage1_train.zip'
  manual, workdir, tfds_dir = tmp_path / 'manual', tmp_path / 'work', tmp_path / 'tfds'
  manual.mkdir()
  if real_zip.is_file():  # The first megabyte of the real release, as an interrupted download.
    with open(real_zip, 'rb') as f:
      (manual / 'stage1_train.zip').write_bytes(f.read(1 << 20))
  else:
    with zipfile.ZipFile(manual / 'stage1_train.zip', 'w') as zf:
      zf.writestr('stage1_train/a/images/a.png', b'x' * 4096)
    data = (manual / 'stage1_train.zip').read_bytes()
    (manual / 'stage1_train.zip').write_bytes(data[:len(data) // 2])
  size = (manual / 'stage1_train.zip').stat().st_size
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')  # An existing workdir is left as it was found.
  line = error_line(run_main('--config=configs/dsb.py', f'--workdir={workdir}',
                             f'--config.data.tfds_data_dir={tfds_dir}',
                             f'--config.data.manual_dir={manual}', timeout=180))
  assert line.startswith(f'error: {manual}/stage1_train.zip is neither a folder nor a valid zip '
                         f'file ({size:,} bytes)')
  assert f'Download it again from {release.DOWNLOAD_URL}' in line
  assert f'{release.RELEASE_SIZE:,} bytes and sha256 {release.RELEASE_SHA256}' in line
  assert release.RELEASE_SIZE == 83_483_172
  assert sorted(p.name for p in workdir.iterdir()) == ['notes.txt']
  assert not list(tfds_dir.rglob('*.tmp.*'))


def test_cli_sigterm_exit_is_quiet(tmp_path):
  """After SIGTERM the run saves, says how to continue and exits 143, without TensorFlow's
  "Error occurred when finalizing GeneratorDataset iterator" at interpreter shutdown."""
  log = tmp_path / 'log.txt'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # As a user runs it (conftest.py's level 2 hides it).
  with open(log, 'w') as f:
    process = subprocess.Popen(
        [sys.executable, '-m', 'unetpp_jax.main', '--config=configs/synthetic.py',
         f'--workdir={tmp_path / "work"}', f'--config.data.tfds_data_dir={tmp_path / "tfds"}',
         '--config.data.image_size=32', '--config.model.filters=(4,8,16,32)',
         '--config.num_train_steps=2000'],
        cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while 'Training from step 0' not in log.read_text():
      assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.05)
    time.sleep(3)  # The first steps run, and the tf.data iterator with them.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143, log.read_text()[-3000:]
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  output = log.read_text()
  assert 'SIGTERM received: stopped at step' in output
  for noise in _NOISE:
    assert noise not in output, noise

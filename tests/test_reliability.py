"""Failures a run must survive: signals and SIGKILL (real processes), non-finite steps, bad configs.

The process tests run `python -m unetpp_jax.main` on a tiny config over a small .npz dataset (the
numpy pipeline, so each process starts quickly) and compare with an uninterrupted in-process run.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import synthetic
from unetpp_jax import checkpointing, config_validation, steps, train
from unetpp_jax.data import contract, numpy_source
from unetpp_jax.workdir import Workdir
import summaries
import test_train

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 16
# Each CLI flag is also applied to the in-process reference config.
OVERRIDES = {
    'data.image_size': 32,
    'model.filters': (4, 8, 16, 32),
    'model.dropout_rate': 0.1,  # Exercises the per-step dropout RNG across restarts.
    'batch_size': 4,
    'eval_batch_size': 4,
    'num_train_steps': NUM_STEPS,
    'log_every_steps': 1,  # Every step's loss goes to TensorBoard, to compare runs step by step.
    'eval_every_steps': NUM_STEPS,
    'checkpoint_every_steps': 2,
}


def _make_npz(path: pathlib.Path, num_train: int = 16, split: str | None = None) -> None:
  """Squares on noise at 32x32: `num_train` training and 4 validation examples, recorded as
  made by `split` (default: configs/synthetic.py's)."""
  rng = np.random.default_rng(0)

  def examples(n, prefix):
    images = (rng.random((n, 32, 32, 3)) * 80).astype(np.uint8)
    labels = np.zeros((n, 32, 32), np.uint16)
    for i in range(n):
      y, x = rng.integers(0, 20, 2)
      labels[i, y:y + 12, x:x + 12] = 1
      images[i, y:y + 12, x:x + 12] += 150
    return contract.Examples(np.array([f'{prefix}{i}' for i in range(n)]), images, labels)

  config = synthetic.get_config()
  contract.save_npz(str(path), contract.NpzData(
      examples(num_train, 'train'), examples(4, 'val'), 32, config.data.dataset,
      config.data.val_fraction, split or config.data.split))


@pytest.fixture(scope='module')
def npz(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp('data') / 'tiny.npz'
  _make_npz(path)
  return path


def _config(npz_path: pathlib.Path) -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.data.source = f'npz:{npz_path}'
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _cli_flags(npz_path: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  flags = ['--config=configs/synthetic.py', f'--workdir={workdir}',
           f'--config.data.source=npz:{npz_path}']
  for field, value in OVERRIDES.items():
    if isinstance(value, tuple):
      value = f"({','.join(map(str, value))})"
    flags.append(f'--config.{field}={value}')
  return flags


@pytest.fixture(scope='module')
def reference(npz, tmp_path_factory):
  """An uninterrupted run: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp('reference')
  return workdir, train.train_and_evaluate(_config(npz), workdir)


class Process:
  """`python -m unetpp_jax.main` (or `python -c code`) with its log in a file; always reaped."""

  def __init__(self, args: list[str], log: pathlib.Path, code: str | None = None):
    env = dict(
        os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='2')
    command = ['-c', code] if code else ['-m', 'unetpp_jax.main']
    self.log = log
    with open(log, 'w') as f:
      self.popen = subprocess.Popen([sys.executable, *command, *args], cwd=REPO, env=env,
                                    stdout=f, stderr=subprocess.STDOUT)

  def output(self) -> str:
    return self.log.read_text()

  def wait_for(self, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in self.output():
      if self.popen.poll() is not None:
        raise AssertionError(f'Exited ({self.popen.returncode}) before {text!r}:\n'
                             f'{self.output()[-3000:]}')
      if time.monotonic() > deadline:
        raise AssertionError(f'No {text!r} after {timeout}s:\n{self.output()[-3000:]}')
      time.sleep(0.02)

  def wait(self, timeout: float = 240) -> int:
    try:
      return self.popen.wait(timeout)
    except subprocess.TimeoutExpired:
      raise AssertionError(f'Still running after {timeout}s:\n{self.output()[-3000:]}') from None

  def kill(self) -> None:
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()


@pytest.fixture
def processes():
  """Starts `Process`es and kills any still running at the end of the test."""
  started = []

  def start(*args, **kwargs):
    started.append(Process(*args, **kwargs))
    return started[-1]

  yield start
  for process in started:
    process.kill()


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _restore(workdir: pathlib.Path, step: int, like: steps.TrainState) -> steps.TrainState:
  mngr = Workdir(workdir).checkpoint_manager()
  try:
    return checkpointing.restore_checkpoint(mngr, step, like)
  finally:
    mngr.close()


def _assert_same_state(a: steps.TrainState, b: steps.TrainState) -> None:
  assert int(a.step) == int(b.step)
  test_train._assert_trees_equal((a.params, a.batch_stats, a.opt_state),
                                 (b.params, b.batch_stats, b.opt_state))


# `python -c` code running the real CLI, except that the process SIGKILLs itself during the
# asynchronous save of step $KILL_AT_SAVE: once save() has returned and the temporary folder exists
# (Orbax creates it in a thread), while a background thread writes the data.
_KILL_DURING_SAVE = """
import os, signal, time
import orbax.checkpoint as ocp
save = ocp.CheckpointManager.save
def save_then_die(self, step, *args, **kwargs):
  result = save(self, step, *args, **kwargs)
  if step == int(os.environ['KILL_AT_SAVE']):
    tmp = self.directory / f'{step}.orbax-checkpoint-tmp'
    deadline = time.monotonic() + 10
    while not tmp.exists() and time.monotonic() < deadline:
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
  return result
ocp.CheckpointManager.save = save_then_die
from absl import app
from unetpp_jax import main
app.run(main.main)
"""


def test_interrupted_every_way_then_resumed_equals_an_uninterrupted_run(
    npz, reference, tmp_path, processes, monkeypatch):
  """SIGINT, SIGTERM, then SIGKILL during a save; each restart is the same command.

  Each signal ends a step with a written checkpoint and exit code 128 + signal; the SIGKILL leaves
  a half-written checkpoint that the restart ignores. The pieced-together run has the losses of
  every step and the final state of an uninterrupted one.
  """
  ref_dir, ref_state = reference
  workdir = tmp_path / 'work'
  checkpoints = workdir / 'checkpoints'
  flags = _cli_flags(npz, workdir)
  stops = []
  for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    run = processes(flags, tmp_path / f'{signum.name}.log')
    run.wait_for('Training from step')  # Handlers are in place; the first step is compiling.
    run.popen.send_signal(signum)
    assert run.wait() == code, run.output()[-3000:]
    stop = _steps(workdir)[-1]
    assert (f'{signum.name} received: stopped at step {stop} with its checkpoint in '
            f'{checkpoints}. Run the same command again' in run.output())
    stops.append(stop)
  assert 1 <= stops[0] < stops[1], f'stopped at {stops}'
  kill_at = stops[1] + 4 - stops[1] % 2  # The second checkpoint step after the SIGTERM.
  assert kill_at < NUM_STEPS, f'stopped at {stops}: the signals came too late'

  monkeypatch.setenv('KILL_AT_SAVE', str(kill_at))
  run = processes(flags, tmp_path / 'SIGKILL.log', code=_KILL_DURING_SAVE)
  assert run.wait() == -signal.SIGKILL, run.output()[-3000:]
  assert _steps(workdir)[-1] == kill_at - 2
  assert (checkpoints / f'{kill_at}.orbax-checkpoint-tmp').is_dir()  # Killed mid-save.

  run = processes(flags, tmp_path / 'final.log')
  assert run.wait() == 0, run.output()[-3000:]
  assert f'Restoring checkpoint of step {kill_at - 2}' in run.output()
  assert not list(checkpoints.glob('*tmp*'))
  losses = summaries.scalars(workdir, 'train/loss')
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  assert losses == summaries.scalars(ref_dir, 'train/loss')
  _assert_same_state(_restore(workdir, NUM_STEPS, ref_state), ref_state)

  # A model/data/optimiser change is refused before compiling; the flag allows it deliberately.
  run = processes([*flags, '--config.optimizer.learning_rate=0.5'], tmp_path / 'changed.log')
  assert run.wait() == 1
  assert 'optimizer.learning_rate: 0.001 -> 0.5' in run.output()
  assert '--allow_config_change' in run.output()
  run = processes([*flags, '--config.optimizer.learning_rate=0.5', '--allow_config_change'],
                  tmp_path / 'allowed.log')
  assert run.wait() == 0, run.output()[-3000:]
  assert '"learning_rate": 0.5' in (workdir / 'config.json').read_text()


def test_second_signal_stops_at_once_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # The handler runs in the main thread at the next bytecode boundary.
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt, match='Second signal'):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradients.


def _nan_input_fn(bad_step: int):
  """test_train's input, with NaN pixels on the first device at global step `bad_step`."""

  def input_fn(config, start_step):
    data = test_train.array_input_fn(config, start_step)

    def train_iter():
      for step, batch in enumerate(data.train_iter, start=start_step + 1):
        if step == bad_step:
          batch['image'][0, 0, 0, 0, 0] = np.nan
        yield batch

    return dataclasses.replace(data, train_iter=train_iter())

  return input_fn


def _tiny(num_steps: int, **fields) -> ml_collections.ConfigDict:
  config = test_train.tiny_config()
  config.num_train_steps = num_steps
  config.eval_every_steps = num_steps
  config.update(fields)
  return config


def test_nonfinite_halt_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _tiny(6, log_every_steps=2, checkpoint_every_steps=2)
  assert config.nonfinite_policy == 'halt'  # The default.
  with pytest.raises(FloatingPointError, match=(
      r'Non-finite loss or gradients at step 3 \(config.nonfinite_policy=halt\); stopped at step '
      r'4 without saving. Last good checkpoint: step 2 in ')):
    train.train_and_evaluate(config, tmp_path, _nan_input_fn(bad_step=3))
  assert _steps(tmp_path) == [2]
  assert not (tmp_path / 'eval_metrics.json').exists()


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path):
  config = _tiny(4, log_every_steps=2, checkpoint_every_steps=1, nonfinite_policy='skip')
  config.optimizer.warmup_steps = 8  # A learning rate that grows with every update applied.
  final = train.train_and_evaluate(config, tmp_path, _nan_input_fn(bad_step=3))
  assert _steps(tmp_path) == [2, 3, 4]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((final.params, final.batch_stats)))
  before, skipped = _restore(tmp_path, 2, final), _restore(tmp_path, 3, final)
  assert int(skipped.step) == 3
  test_train._assert_trees_equal((before.params, before.batch_stats, before.opt_state),
                                 (skipped.params, skipped.batch_stats, skipped.opt_state))
  assert not np.array_equal(final.params['X0_0']['Conv_0']['kernel'],
                            before.params['X0_0']['Conv_0']['kernel'])  # Step 4 trained again.
  assert summaries.scalars(tmp_path, 'train/skipped_updates') == {2: 0, 4: 1}
  # Steps 1, 2 and 4 applied: step 4's update was the schedule's third, as the state says.
  schedule = steps.learning_rate_schedule(config)
  assert steps.updates_applied(final.opt_state) == 3
  np.testing.assert_allclose(list(summaries.scalars(tmp_path, 'train/learning_rate').values()),
                             [schedule(1), schedule(2)])
  assert all(np.isfinite(v) for v in summaries.scalars(tmp_path, 'train/loss').values())


# ---------------------------------------------------------------------------------------------
# Bad configuration.


def test_changed_config_is_refused_before_compiling(tmp_path, monkeypatch):
  config = _tiny(2, log_every_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp_path, test_train.array_input_fn)

  changed = config.copy_and_resolve_references()
  changed.model.filters = (4, 8, 16, 64)
  changed.data.augment = False
  def no_compiling(*args):
    raise AssertionError('compiled before refusing the config')
  with monkeypatch.context() as patch:
    patch.setattr(train, 'create_train_state', no_compiling)
    with pytest.raises(ValueError) as error:
      train.train_and_evaluate(changed, tmp_path, test_train.array_input_fn)
  message = str(error.value)
  assert f'{tmp_path} holds checkpoints of a run whose config' in message
  assert 'data.augment: True -> False' in message
  assert 'model.filters: [4, 8, 16, 32] -> [4, 8, 16, 64]' in message
  assert '--allow_config_change' in message

  # Run length, cadence, inference and failure handling may change; so may anything, if allowed.
  longer = config.copy_and_resolve_references()
  longer.update(num_train_steps=3, log_every_steps=1, eval_every_steps=3, keep_checkpoints=5,
                nonfinite_policy='skip')
  longer.predict.mode = 'fast'
  assert int(train.train_and_evaluate(longer, tmp_path, test_train.array_input_fn).step) == 3
  longer.optimizer.learning_rate = 0.1
  with pytest.raises(ValueError, match=r'optimizer.learning_rate: 0.001 -> 0.1'):
    train.train_and_evaluate(longer, tmp_path, test_train.array_input_fn)
  train.train_and_evaluate(longer, tmp_path, test_train.array_input_fn, allow_config_change=True)
  assert '"learning_rate": 0.1' in (tmp_path / 'config.json').read_text()
  # An unreadable config.json is no reason to stop when changes are allowed.
  (tmp_path / 'config.json').write_text('{not json')
  longer.num_train_steps = 4
  assert int(train.train_and_evaluate(longer, tmp_path, test_train.array_input_fn,
                                      allow_config_change=True).step) == 4


def test_resuming_with_another_validation_split_is_refused(tmp_path):
  data = tmp_path / 'tiny.npz'
  _make_npz(data, num_train=8)
  config = _config(data)
  config.num_train_steps = config.checkpoint_every_steps = 2
  train.train_and_evaluate(config, tmp_path / 'work')
  recorded = json.loads((tmp_path / 'work' / 'validation_ids.json').read_text())
  assert len(recorded) == 4
  # The same examples, but two validation ones named differently: as if the split had changed.
  moved = contract.load_npz(str(data))
  renamed = moved.val.ids.copy()
  renamed[:2] = ['train0', 'train1']
  contract.save_npz(str(data), dataclasses.replace(
      moved, val=contract.Examples(renamed, moved.val.images, moved.val.labels)))
  config.num_train_steps = 4
  with pytest.raises(ValueError, match='The validation split has 4 images, 2 of them among the 4 '
                     'this run started with'):
    train.train_and_evaluate(config, tmp_path / 'work')
  assert json.loads((tmp_path / 'work' / 'validation_ids.json').read_text()) == recorded


def test_a_changed_run_length_logs_how_it_reshapes_a_cosine_decay(caplog):
  config = test_train.tiny_config()
  config.optimizer.schedule, config.optimizer.warmup_steps, config.num_train_steps = 'cosine', 0, 4
  stored = json.loads(config.to_json_best_effort())
  with caplog.at_level('WARNING'):
    train._log_schedule_change(stored, config, 4)  # Unchanged: nothing to say.
    config.num_train_steps = 8
    train._log_schedule_change(stored, config, 4)  # Finished at 4, now halfway down the decay.
  assert caplog.text.count('reshapes') == 1
  assert ('num_train_steps 4 -> 8 reshapes the cosine learning-rate decay: at step 4 the learning '
          f'rate is {config.optimizer.learning_rate / 2:.3g} instead of 0.') in caplog.text
  caplog.clear()
  config.optimizer.schedule = 'constant'
  with caplog.at_level('WARNING'):
    train._log_schedule_change(stored, config, 4)
  assert 'reshapes' not in caplog.text


def test_config_changes_lists_added_and_removed_fields():
  config = test_train.tiny_config()
  stored = json.loads(config.to_json_best_effort())  # As train_and_evaluate writes config.json.
  stored.update(old_field=1, nonfinite_policy='skip')
  del stored['data']['on_bad_example']  # Resumable fields may be absent from older runs.
  del stored['model']['dtype']
  assert config_validation.config_changes(stored, config) == [
      "model.dtype: (absent) -> 'float32'", 'old_field: 1 -> (absent)']


@pytest.mark.parametrize('override,error,message', [
    ('--config.model.filtres=(4,8)', AttributeError, 'Did you mean "filters"'),  # Unknown key.
    ('--config.batch_size=abc', 'parse', "--config.batch_size=abc: invalid literal for int"),
    ('--config.batch_size=2.5', 'parse', "--config.batch_size=2.5: invalid literal for int"),
    ('--config.data.augment=maybe', 'parse', 'Non-boolean argument to boolean flag'),
    # A tuple Python cannot parse reaches the config as a string; validation says so, once.
    ('--config.model.filters=(4,x)', ValueError,
     'Invalid config: config.model.filters=(4,x) cannot be parsed'),
    ('--config.loss.deep_supervision_heads=(1,x)', ValueError,
     'Invalid config: config.loss.deep_supervision_heads=(1,x) cannot be parsed'),
    ('--config.optimizer.learning_rate=inf', ValueError, 'learning_rate=inf must be finite'),
    ('--config.data.val_fraction=nan', ValueError, 'val_fraction=nan must be finite'),
])
def test_cli_overrides_with_unknown_keys_or_wrong_types_are_rejected(
    override, error, message, monkeypatch):
  """main.py's config flag, parsed in-process, then validated (test_main.py runs the real CLI)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True)
  argv = ['prog', f'--config={REPO / "configs" / "synthetic.py"}', override]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv.
  with pytest.raises(flags.IllegalFlagValueError if error == 'parse' else error) as raised:
    values(argv)
    config_validation.validate(values.config)
  assert message in str(raised.value)


@pytest.mark.parametrize('field,value', [('nonfinite_policy', 'ignore'),
                                         ('data.on_bad_example', 'warn')])
def test_invalid_failure_policies_are_rejected(field, value):
  config = test_train.tiny_config()
  *parents, key = field.split('.')
  (config[parents[0]] if parents else config)[key] = value
  with pytest.raises(ValueError, match=f'config.{field}={value!r} must be one of'):
    config_validation.validate(config)

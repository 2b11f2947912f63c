"""Workdirs made before the restructuring still resume and evaluate.

tests/data/workdir_ccaebd1 was written by the code of commit ccaebd1 (before unetpp_jax/data,
evaluation and study existed):
  python -m unetpp_jax.main --config=configs/synthetic.py --workdir=W \
    --config.data.source=npz:/tmp/old_tiny.npz --config.data.image_size=32 \
    '--config.model.filters=(4,8,16,32)' --config.batch_size=4 --config.eval_batch_size=4 \
    --config.num_train_steps=2 --config.log_every_steps=1 --config.eval_every_steps=2 \
    --config.checkpoint_every_steps=2
over the .npz `test_reliability._make_npz(path, num_train=8)` writes (events files left out). It
holds the checkpoint of step 2 and config.json, but no validation_ids.json.
"""

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unetpp_jax import models, steps, train
from unetpp_jax.evaluation import evaluate

import test_reliability

OLD = pathlib.Path(__file__).resolve().parent / 'data' / 'workdir_ccaebd1'


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / 'old'
  shutil.copytree(OLD, workdir)
  return workdir


def _full_state(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> steps.TrainState:
  """The whole saved train state, restored into today's TrainState structure."""
  template = steps.create_train_state(config, jax.random.key(0), models.create_model(config.model))
  mngr = ocp.CheckpointManager(workdir / 'checkpoints',
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    return mngr.restore(2, args=ocp.args.StandardRestore(jax.device_get(template)))
  finally:
    mngr.close()


def test_old_checkpoint_restores_into_todays_state_and_prediction_variables(tmp_path):
  workdir = _copy(tmp_path)
  config = evaluate.load_config(workdir)
  state = _full_state(workdir, config)
  assert int(state.step) == 2
  variables, step = evaluate.load_variables(workdir, config)
  assert step == 2
  assert jax.tree.structure(variables['params']) == jax.tree.structure(state.params)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(
      {'params': state.params, 'batch_stats': state.batch_stats})):
    np.testing.assert_array_equal(got, want)
  # Trained: the parameters are not those of a fresh initialisation.
  fresh = steps.create_train_state(config, jax.random.key(0), models.create_model(config.model))
  assert train.parameter_digest(state.params) != train.parameter_digest(fresh.params)


def test_old_workdir_resumes(tmp_path):
  workdir = _copy(tmp_path)
  npz = tmp_path / 'old_tiny.npz'
  test_reliability._make_npz(npz, num_train=8, split='tail')  # pylint: disable=protected-access
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  before = _full_state(workdir, config)
  config.data.source = f'npz:{npz}'  # The old run's .npz was in /tmp.
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 3
  state = train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert int(state.step) == 3
  assert (workdir / 'checkpoints' / '3').is_dir()
  assert json.loads((workdir / 'eval_metrics.json').read_text())['step'] == 3
  # One more update from the restored parameters and optimizer state (Adam's count was 2).
  assert int(jax.device_get(state.opt_state[0].count)) == 3
  assert int(jax.device_get(before.opt_state[0].count)) == 2
  assert train.parameter_digest(state.params) != train.parameter_digest(before.params)


def test_old_config_gets_the_values_it_ran_with_for_fields_added_since(tmp_path):
  from configs import dsb  # pylint: disable=g-import-not-at-top
  config = evaluate.load_config(_copy(tmp_path), dsb.get_config().to_dict())
  # Not the defaults of today's recipe: the old run split by the tail, on standardised RGB, once
  # per example.
  assert config.data.split == 'tail' and dsb.get_config().data.split == 'grouped'
  assert config.model.input_norm == 'standardize'
  assert dict(config.data.repeats) == {kind: 1 for kind in dict(dsb.get_config().data.repeats)}
  assert tuple(config.data.scale_range) == (1.0, 1.0) and config.loss.contact_width == 0

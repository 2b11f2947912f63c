"""Workdirs written by older code still resume and evaluate.

Both were written by the same command, at two commits:
  python -m unetpp_jax.main --config=configs/synthetic.py --workdir=W \
    --config.data.source=npz:/tmp/old_tiny.npz --config.data.image_size=32 \
    '--config.model.filters=(4,8,16,32)' --config.batch_size=4 --config.eval_batch_size=4 \
    --config.num_train_steps=2 --config.log_every_steps=1 --config.eval_every_steps=2 \
    --config.checkpoint_every_steps=2
over the .npz `test_reliability._make_npz(path, num_train=8, split='tail')` writes (events files
left out), and hold the checkpoint of step 2 and config.json:
  workdir_ccaebd1  commit ccaebd1, before unetpp_jax/data, evaluation and study existed; no
                   validation_ids.json.
  workdir_81bdb9e  commit 81bdb9e, before the grouped split, input normalisation, oversampling,
                   the workdir module and the split of train.py; with validation_ids.json.
"""

import json
import pathlib
import shutil
import zipfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unetpp_jax import checkpointing, config_validation, models, steps, train
from unetpp_jax.data import contract
from unetpp_jax.evaluation import evaluate

import synthetic_release
import test_reliability

DATA = pathlib.Path(__file__).resolve().parent / 'data'
OLD = ('workdir_ccaebd1', 'workdir_81bdb9e')


@pytest.fixture(params=OLD)
def old(request) -> pathlib.Path:
  return DATA / request.param


def _copy(tmp_path: pathlib.Path, old: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / 'old'
  shutil.copytree(old, workdir)
  return workdir


def _full_state(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> steps.TrainState:
  """The whole saved train state, restored into today's TrainState structure."""
  template = steps.create_train_state(config, jax.random.key(0), models.create_model(config.model))
  mngr = ocp.CheckpointManager(workdir / 'checkpoints',
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    return checkpointing.restore_or_initialize(mngr, template)
  finally:
    mngr.close()


def test_old_checkpoint_restores_into_todays_state_and_prediction_variables(tmp_path, old):
  workdir = _copy(tmp_path, old)
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


def test_old_workdir_resumes(tmp_path, old):
  workdir = _copy(tmp_path, old)
  npz = tmp_path / 'old_tiny.npz'
  test_reliability._make_npz(npz, num_train=8, split='tail')  # pylint: disable=protected-access
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  before = _full_state(workdir, evaluate.load_config(workdir))
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


def test_old_config_gets_the_values_it_ran_with_for_fields_added_since(tmp_path, old):
  from configs import dsb  # pylint: disable=g-import-not-at-top
  config = evaluate.load_config(_copy(tmp_path, old), dsb.get_config().to_dict())
  # Not the defaults of today's recipe: the old run split by the tail, on standardised RGB, once
  # per example, without the Lovasz loss.
  assert config.data.split == 'tail' and dsb.get_config().data.split == 'grouped'
  assert config.model.input_norm == 'standardize'
  assert dict(config.data.repeats) == {kind: 1 for kind in dict(dsb.get_config().data.repeats)}
  assert tuple(config.data.scale_range) == (1.0, 1.0) and config.loss.contact_width == 0
  assert config.data.stain_jitter == 0 and dsb.get_config().data.stain_jitter > 0
  assert config.loss.lovasz_weight == 0 and dsb.get_config().loss.lovasz_weight > 0
  assert config.model.norm_groups == 8


def test_resuming_an_old_run_sees_no_field_as_new(old):
  """Fields added since the run have the value it ran with (config_validation.ADDED_FIELDS), so
  resuming it with today's config is not refused over a field it never stored."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  stored = json.loads((old / 'config.json').read_text())
  changes = config_validation.config_changes(stored, synthetic.get_config())
  assert not [change for change in changes if '(absent)' in change]


def test_old_workdir_evaluates(tmp_path, old):
  """evaluate at native size on a Kaggle-layout zip of the run's .npz examples."""
  npz = tmp_path / 'old_tiny.npz'
  test_reliability._make_npz(npz, num_train=8, split='tail')  # pylint: disable=protected-access
  data = contract.load_npz(str(npz))
  release = tmp_path / 'stage1_train.zip'
  with zipfile.ZipFile(release, 'w') as zf:
    for split in (data.train, data.val):
      for image_id, image, label in zip(split.ids, split.images, split.labels):
        zf.writestr(f'{image_id}/images/{image_id}.png', synthetic_release.png(image))
        zf.writestr(f'{image_id}/masks/1.png', synthetic_release.png((label > 0) * np.uint8(255)))
  workdir = _copy(tmp_path, old)
  # Runs that recorded their validation ids are scored on them; the oldest recorded none.
  split = 'validation' if (workdir / 'validation_ids.json').is_file() else 'all'
  report = evaluate.evaluate(workdir, release, tmp_path / 'eval', split=split,
                             inference=evaluate.InferenceOptions(flips=False),
                             config_defaults=evaluate.config_defaults())
  assert report['checkpoint_step'] == 2
  assert report['num_images'] == (4 if split == 'validation' else 12)
  assert 0 <= report['score'] <= 1 and report['per_kind']

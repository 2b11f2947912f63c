"""A training run on disk: the one module that knows what a workdir holds and how it is named.

  config.json          the run's config; older runs' configs are upgraded when read
                       (config_validation.upgrade).
  checkpoints/<step>/  Orbax checkpoints of the train state.
  eval_metrics.json    the scalars and step of the latest evaluation during training.
  validation_ids.json  the ids of the validation split, in order.

Training writes all of these (see `train`); evaluation only reads them, and may do so while
training still writes.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from unetpp_jax import atomic, config_validation

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
EVAL_METRICS = 'eval_metrics.json'
VALIDATION_IDS = 'validation_ids.json'
# Orbax's name for the single item a CheckpointManager saves (StandardSave of the train state).
_STATE_ITEM = 'default'


def saved_entries(checkpoints: epath.PathLike, step: int) -> set[str]:
  """The entries of the train state saved at `step` in `checkpoints` ('params', 'ema', ...)."""
  path = epath.Path(checkpoints) / str(step) / _STATE_ITEM
  try:
    return set(ocp.StandardCheckpointHandler().metadata(path).keys())
  except FileNotFoundError as e:
    raise FileNotFoundError(f'Checkpoint {step} of {checkpoints} is gone (removed by training, '
                            'which keeps only the newest?).') from e


class Workdir:
  """The files of one training run under `path` (local or gs://; made absolute for Orbax)."""

  def __init__(self, path: str | os.PathLike[str]):
    path = epath.Path(path)
    self.path = path if path.is_absolute() else path.absolute()

  @property
  def config_path(self) -> epath.Path:
    return self.path / CONFIG

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / CHECKPOINTS

  # --------------------------------------------------------------------------------------------
  # The config.

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    self.path.mkdir(parents=True, exist_ok=True)
    atomic.write_atomically(self.config_path, config.to_json_best_effort(indent=2))

  def stored_config(self) -> dict[str, Any] | None:
    """The run's config as a dict, fields added since it was recorded filled in with the values
    it ran with; None when there is no config.json.

    Raises:
      ValueError: config.json is not a JSON object.
    """
    path = self.config_path
    if not path.exists():
      return None
    try:
      stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e
    if not isinstance(stored, dict):
      raise ValueError(f'{path} is not a JSON object.')
    return config_validation.upgrade(stored)

  def read_config(self, defaults: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The run's config (see `stored_config`).

    Args:
      defaults: a full config (e.g. configs/dsb_paper.py's): fields that neither the run nor
        config_validation.ADDED_FIELDS know take these values.

    Raises:
      FileNotFoundError: this is not a training workdir.
      ValueError: config.json cannot be read.
    """
    stored = self.stored_config()
    if stored is None:
      raise FileNotFoundError(f'{self.config_path} not found: --workdir must be a training '
                              f'workdir (python -m unetpp_jax.main writes {CONFIG} there).')
    return ml_collections.ConfigDict(_with_defaults(stored, dict(defaults or {})))

  def check_resumable(self, config: ml_collections.ConfigDict, allow_change: bool) -> None:
    """Refuses to resume a run whose config differs in fields that change the model, data or
    optimisation (outside config_validation.RESUMABLE_CHANGES), unless `allow_change`."""
    try:
      stored = self.stored_config()
    except ValueError as e:
      changes = [f'{self.config_path} cannot be read as a config ({e})']
    else:
      if stored is None:
        return
      changes = config_validation.config_changes(stored, config)
    if not changes:
      return
    listing = '\n  '.join(changes)
    if allow_change:
      logging.warning('Resuming %s with a changed config (allow_config_change):\n  %s',
                      self.path, listing)
      return
    raise ValueError(
        f'{self.path} holds checkpoints of a run whose config ({self.config_path}) differs in '
        f'fields that change the model, data or optimisation:\n  {listing}\nUse a new --workdir '
        'for a new experiment, or pass --allow_config_change to resume with the new values '
        'deliberately.'
    )

  # --------------------------------------------------------------------------------------------
  # Checkpoints.

  def checkpoint_manager(self, keep: int = 3) -> ocp.CheckpointManager:
    """The manager training saves and restores the train state with."""
    # create=False: the first save makes the folder, so a run that fails before it leaves no
    # empty checkpoints/ behind.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
    return ocp.CheckpointManager(self.checkpoints, options=options)

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, in order. On a local disk Orbax names a step's
    folder by its number once the save is finished; on GCS it writes into that folder and marks
    it complete at the end (commit_success.txt), which `is_checkpoint_finalized` checks."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir()
                  if p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step."""
    return max(self.steps(), default=None)

  def checkpoint_step(self, step: int | None = None) -> int:
    """`step` (default: the newest) if it has a complete checkpoint.

    Raises:
      FileNotFoundError: there is no checkpoint, or none of `step`.
    """
    available = self.steps()
    if not available:
      raise FileNotFoundError(f'No checkpoint in {self.checkpoints}: train first (python -m '
                              'unetpp_jax.main) or pass the workdir of a trained model.')
    step = available[-1] if step is None else step
    if step not in available:
      raise FileNotFoundError(
          f'No checkpoint of step {step} in {self.checkpoints} (found {available}).')
    return step

  def saved_at(self, step: int) -> int | None:
    """When checkpoint `step` was saved (ns since the epoch; Orbax's step metadata): tells a
    retrained run's checkpoint from an earlier run's of the same step. None if not recorded."""
    return ocp.metadata.get_step_metadata(self.checkpoints / str(step)).init_timestamp_nsecs

  def restore_variables(self, like: Mapping[str, Any],
                        step: int | None = None) -> tuple[dict[str, Any], int]:
    """(entries of `like` read from checkpoint `step` (default: the newest), step), as numpy.

    Only those entries of the saved train state are read (e.g. 'params' and 'batch_stats', not
    the optimizer state), into `like`'s structure (arrays or jax.ShapeDtypeStruct). Read-only: a
    training run may still be writing to (and pruning) the checkpoints.
    """
    step = self.checkpoint_step(step)
    item = dict(like)
    # Read directly, not through a CheckpointManager: that would warn that it is read-only.
    restored = ocp.PyTreeCheckpointer().restore(
        self.checkpoints / str(step) / _STATE_ITEM,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item),
            partial_restore=True))
    return {key: restored[key] for key in item}, int(step)

  # --------------------------------------------------------------------------------------------
  # Evaluation during training, and the validation split.

  def write_eval_metrics(self, step: int, scalars: Mapping[str, Any]) -> None:
    atomic.write_atomically(self.path / EVAL_METRICS,
                            json.dumps({'step': step, **scalars}, indent=2))

  def eval_metrics(self) -> dict[str, Any]:
    """The latest evaluation's scalars, with its 'step'."""
    return json.loads((self.path / EVAL_METRICS).read_text())

  @property
  def validation_ids_path(self) -> epath.Path:
    return self.path / VALIDATION_IDS

  def write_validation_ids(self, ids: Sequence[str]) -> None:
    atomic.write_atomically(self.validation_ids_path,
                            json.dumps([str(i) for i in ids if i], indent=0))

  def validation_ids(self) -> list[str] | None:
    """The validation split's ids as training recorded them; None for runs older than that."""
    path = self.validation_ids_path
    return list(json.loads(path.read_text())) if path.is_file() else None


def _with_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  merged = dict(values)
  for key, default in defaults.items():
    if key not in merged:
      merged[key] = default
    elif isinstance(default, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], default)
  return merged

"""The train loop: the pmapped steps of `steps` with logging, evaluation and checkpoints.

The loop's parts have modules of their own: `workdir` (the run's files), `checkpointing` (saving,
restoring, stopping on a signal, multi-process agreement) and `data.background` (the input thread).

Exact resume: a checkpoint holds the step, parameters, optimizer state and BatchNorm statistics
(and their moving average, with config.optimizer.ema_decay); the dropout RNG of a step is
fold_in(seed, step) and the input stream is a pure function of (config, step), so a restarted run
continues with exactly the batches and randomness an uninterrupted run would have used.

Failures (see docs/operations.md, "Resuming and failures"):
- SIGTERM / SIGINT: the current step finishes (with several processes: the next log step, where
  they agree), its checkpoint is saved and written, and `Interrupted` is raised (main exits with
  128 + the signal number). A second signal stops at once.
- SIGKILL: Orbax marks each checkpoint complete only at the end of its save (a temporary folder
  renamed, or on GCS a commit file), so a restart resumes from the last complete checkpoint.
- Non-finite loss or gradients (checked on the devices, agreed by all of them):
  config.nonfinite_policy 'halt' raises FloatingPointError naming the first bad step, without saving
  the bad state; 'skip' keeps the previous parameters, optimizer state, BatchNorm statistics and
  moving average, leaves the step out of the train metrics and counts it in
  train/skipped_updates.
- A workdir whose checkpoints come from a config differing in fields that change the model, data
  or optimisation (see config_validation.RESUMABLE_CHANGES) is refused before anything compiles,
  unless allow_config_change.
"""

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from unetpp_jax import checkpointing, config_validation, models, writers
from unetpp_jax import data as data_sources
from unetpp_jax.checkpointing import Interrupted  # Raised by train_and_evaluate.
from unetpp_jax.data.background import BackgroundInput
from unetpp_jax.heads import Heads
from unetpp_jax.steps import (AXIS, TrainState, accumulating_train_step, create_train_state,
                              eval_step, evaluate_batches, learning_rate_schedule,
                              updates_applied)
from unetpp_jax.workdir import Workdir


def create_input(config: ml_collections.ConfigDict, start_step: int) -> Any:
  """The input source named by config.data.source (see `unetpp_jax.data`)."""
  return data_sources.create_input(config, start_step)


_STEPS_IN_FLIGHT = 2  # Train steps dispatched but not finished, at most.

# A replicated tree (or host arrays with a leading device axis) as a pmap output.
_p_copy = jax.pmap(lambda tree: tree, axis_name=AXIS)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    input_fn: Callable[[ml_collections.ConfigDict, int], Any] = create_input,
    *,
    allow_config_change: bool = False,
) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates and checkpoints.

  Args:
    config: Hyperparameters (see configs/dsb.py).
    workdir: The run's files (see `unetpp_jax.workdir`) and TensorBoard events go here.
    input_fn: (config, start_step) -> object with `train_iter` (iterator of numpy batches, see
      unetpp_jax.data.contract.Input) and `eval_batches`; any source of numpy batches works.
    allow_config_change: resume even if `workdir`'s checkpoints were made with a config that
      differs in fields outside config_validation.RESUMABLE_CHANGES.

  Returns:
    The final train state (on the host's first device).

  Raises:
    ValueError: invalid config, or a changed one (see `allow_config_change`); before compiling.
    Interrupted: SIGTERM or SIGINT arrived; the checkpoint of the step reached has been written.
    FloatingPointError: non-finite loss or gradients with config.nonfinite_policy = 'halt'.
  """
  # A config written before some fields existed runs as it did then.
  config = ml_collections.ConfigDict(config_validation.upgrade(config.to_dict()))
  config_validation.validate(config)
  workdir = Workdir(workdir)
  # Nothing is written to the workdir before the data is ready: a run that fails before it
  # starts (a changed config, missing or bad data) leaves the workdir as it found it.
  mngr = workdir.checkpoint_manager(config.keep_checkpoints)
  writer = None
  try:
    start_step = mngr.latest_step() or 0
    # Each process lists the checkpoints itself: on storage that is not shared (or whose listing
    # is stale) they would resume from different steps and diverge, or hang in a collective.
    multihost_utils.assert_equal(
        start_step, f'The processes found different latest checkpoints in {mngr.directory}: '
        'the workdir must be on storage that every process shares')
    if mngr.latest_step() is not None:
      workdir.check_resumable(config, allow_config_change)
      try:
        _log_schedule_change(workdir.stored_config(), config, start_step)
      except ValueError:  # An unreadable config.json, which check_resumable has dealt with.
        pass
    with checkpointing.StopRequest() as stop:
      data = input_fn(config, start_step)
      signum = stop.agreed()
      if signum is not None:  # Interrupted while preparing the data: nothing to save.
        raise Interrupted(signum, start_step, mngr.directory)
      is_chief = jax.process_index() == 0
      if is_chief:
        workdir.write_config(config)
      writer = writers.create_default_writer(workdir.path, just_logging=not is_chief)
      # _train asks for the data of the step it restores, which is `start_step`.
      prepared = lambda c, step: data if step == start_step else input_fn(c, step)
      state = _train(_Run(config, workdir, mngr, writer, stop, is_chief), prepared)
      # While a signal still only asks to stop: the last checkpoint's save may be in flight.
      mngr.wait_until_finished()
      return state
  finally:
    # Also on errors: let an in-flight save finish, so the last checkpoint is a complete one.
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.flush()


def _log_schedule_change(stored: dict[str, Any] | None, config: ml_collections.ConfigDict,
                         step: int) -> None:
  """A changed num_train_steps resumes freely, but it reshapes a cosine decay: logs by how much
  the learning rate of `step` changes."""
  before = (stored or {}).get('num_train_steps')
  if config.optimizer.schedule != 'cosine' or before in (None, config.num_train_steps):
    return
  previous = ml_collections.ConfigDict(config.to_dict())
  previous.num_train_steps = before
  logging.warning(
      'num_train_steps %d -> %d reshapes the cosine learning-rate decay: at step %d the learning '
      'rate is %.3g instead of %.3g.', before, config.num_train_steps, step,
      learning_rate_schedule(config)(step), learning_rate_schedule(previous)(step))


@dataclasses.dataclass(frozen=True)
class _Run:
  """Where a run writes and what stops it: fixed for the whole of `train_and_evaluate`."""
  config: ml_collections.ConfigDict
  workdir: Workdir
  mngr: ocp.CheckpointManager
  writer: writers.Writer
  stop: checkpointing.StopRequest
  is_chief: bool  # Process 0, which alone writes files other than checkpoints.


@dataclasses.dataclass(frozen=True)
class _Start:
  """What the loop starts from: the restored state and its step, and the run's input."""
  state: TrainState
  step: int
  data: Any  # unetpp_jax.data.contract.Input; its eval_batches are read at every evaluation.
  train_iter: BackgroundInput
  dropout_rng: jax.Array
  report_progress: writers.ReportProgress


def _train(run: _Run, input_fn: Callable[[ml_collections.ConfigDict, int], Any]) -> TrainState:
  """The body of `train_and_evaluate`, with signal handlers installed."""
  config = run.config
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  model = models.create_model(config.model, bn_axis_name=AXIS)
  state = create_train_state(config, init_rng, model)
  state = checkpointing.restore_or_initialize(run.mngr, state)
  start_step = int(state.step)
  if start_step == 0:
    run.writer.write_hparams(_flat_hparams(config))
    logging.info('Parameters: %d', sum(x.size for x in jax.tree.leaves(state.params)))

  data = input_fn(config, start_step)
  _record_validation_ids(run, data.eval_batches, resumed=start_step > 0)
  # Batches are prepared and copied to the devices on a background thread, ahead of the step.
  train_iter = BackgroundInput(data.train_iter, size=2)
  report_progress = writers.ReportProgress(
      num_train_steps=config.num_train_steps, batch_size=config.batch_size, writer=run.writer
  )
  try:
    return _train_loop(run, _Start(state, start_step, data, train_iter, dropout_rng,
                                   report_progress))
  finally:
    # Helper threads end here rather than at interpreter exit, which would wait for them.
    train_iter.close()


def _record_validation_ids(run: _Run, eval_batches: Any, resumed: bool) -> None:
  """Records the validation split's ids (all processes') so that evaluation needs no data
  preparation to select them; a resumed run must have the split it started with. Skipped for
  inputs that do not report ids.

  Raises:
    ValueError: resumed with other validation ids than recorded (the data or the split changed:
      training would go on with some validation images).
  """
  ids = getattr(eval_batches, 'ids', None)
  if ids is None:
    return
  # Each process holds a contiguous shard of the split, in order: process order is split order.
  ids = [i for i in checkpointing.gather_strings(np.asarray(ids).reshape(-1)) if i]
  recorded = run.workdir.validation_ids() if resumed else None
  if recorded is not None and set(recorded) != set(ids):
    raise ValueError(
        f'The validation split has {len(ids)} images, {len(set(ids) & set(recorded))} of them '
        f'among the {len(recorded)} this run started with ({run.workdir.validation_ids_path}): '
        'the data or the split changed, and resuming would train on validation images. Use a '
        'new --workdir, or delete that file to resume anyway.')
  if run.is_chief:
    run.workdir.write_validation_ids(ids)


def _train_loop(run: _Run, start: _Start) -> TrainState:
  """Steps from `start.step` to config.num_train_steps with logging, evaluation and checkpoints.

  Between log/eval/checkpoint steps nothing is read back from the devices: metrics are summed
  inside the pmapped step and non-finite flags are kept as device arrays, so the host only
  dispatches steps and the devices never wait for it.
  """
  config, mngr, writer = run.config, run.mngr, run.writer
  heads = Heads.from_config(config)
  skip_nonfinite = config.nonfinite_policy == 'skip'
  p_train_step = jax.pmap(
      functools.partial(accumulating_train_step, dropout_rng=start.dropout_rng,
                        heads=heads, skip_nonfinite=skip_nonfinite),
      axis_name=AXIS,
      donate_argnums=(0, 1),
  )
  p_eval_step = jax.pmap(functools.partial(eval_step, heads=heads), axis_name=AXIS)
  schedule = learning_rate_schedule(config)
  # State and metric sums enter the step in the layout it returns them in (a pmap output), so the
  # step compiles once rather than again for its own outputs.
  state = _p_copy(flax.jax_utils.replicate(start.state))
  zero_metrics = heads.zero_metrics()
  train_metrics = None  # Replicated sums since the last log step, on the devices.
  # Per-step non-finite flags, still on the devices: reading them at every step would stall the
  # pipelining of steps, so they are read at log/eval/checkpoint steps (before anything is
  # written or saved) and at a stop.
  nonfinite_flags = []
  skipped_updates = 0
  last_save = time.monotonic()  # Of the last checkpoint, or the start (checkpoint_every_minutes).
  evaluated = False  # Whether this run has evaluated yet.
  logging.info('Training from step %d to %d.', start.step, config.num_train_steps)
  signum = run.stop.agreed()
  if signum is not None:  # Interrupted while preparing: there is nothing new to save.
    raise Interrupted(signum, start.step, mngr.directory)
  for step in range(start.step + 1, config.num_train_steps + 1):
    batch = next(start.train_iter)
    if train_metrics is None:
      train_metrics = _p_copy(flax.jax_utils.replicate(zero_metrics))
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, train_metrics, nonfinite = p_train_step(state, train_metrics, batch)
    nonfinite_flags.append((step, nonfinite))
    if len(nonfinite_flags) > _STEPS_IN_FLIGHT:
      # Waits for an earlier step, not this one: the devices keep a queue of work, but a bounded
      # one. XLA:CPU aborts when dozens of pmapped steps with collectives are queued (a stuck
      # all-gather rendezvous).
      nonfinite_flags[-1 - _STEPS_IN_FLIGHT][1].block_until_ready()
    start.report_progress(step)
    is_last = step == config.num_train_steps
    is_log = step % config.log_every_steps == 0 or is_last
    is_eval = step % config.eval_every_steps == 0 or is_last
    # Several processes must agree on the stopping step and on time-based checkpoints, which are
    # considered at log steps only.
    time_due = is_log and not is_last and checkpointing.minutes_passed(
        config.checkpoint_every_minutes, last_save)
    signum, time_due = run.stop.poll(is_log=is_log, is_last=is_last, time_due=time_due)
    if time_due and not evaluated:  # A first validation number within the time interval.
      is_eval = True
    is_checkpoint = (step % config.checkpoint_every_steps == 0 or is_last or signum is not None
                     or time_due)

    if is_log or is_eval or is_checkpoint:
      values = jax.device_get([flag for _, flag in nonfinite_flags])
      bad = [s for (s, _), value in zip(nonfinite_flags, values) if value[0]]
      nonfinite_flags = []
      if bad and not skip_nonfinite:
        mngr.wait_until_finished()
        raise FloatingPointError(
            f'Non-finite loss or gradients at step {bad[0]} (config.nonfinite_policy=halt); '
            f'stopped at step {step} without saving. Last good checkpoint: step '
            f'{mngr.latest_step()} in {mngr.directory}. Lower the learning rate or check the '
            'data, or pass --config.nonfinite_policy=skip to drop such updates.'
        )
      for s in bad:
        logging.warning('Non-finite loss or gradients at step %d: update skipped.', s)
      skipped_updates += len(bad)

    if is_log:
      scalars = heads.summarize(flax.jax_utils.unreplicate(train_metrics), prefix='train/')
      # The rate of the last update applied: skipped steps do not advance the schedule.
      scalars['train/learning_rate'] = float(schedule(updates_applied(state.opt_state) - 1))
      scalars['train/skipped_updates'] = skipped_updates
      writer.write_scalars(step, scalars)
      train_metrics = None
      skipped_updates = 0

    if is_eval:
      evaluated = True
      with start.report_progress.timed('eval'):
        eval_scalars = evaluate_batches(p_eval_step, state, start.data.eval_batches, heads.output)
      writer.write_scalars(step, eval_scalars)
      if run.is_chief:
        run.workdir.write_eval_metrics(step, eval_scalars)

    if is_checkpoint:
      writer.flush()  # Summaries are kept as durably as checkpoints: a kill loses neither before.
      if time_due:
        logging.info('Checkpoint at step %d: %.3g minutes since the last one '
                     '(checkpoint_every_minutes=%g).', step, (time.monotonic() - last_save) / 60,
                     config.checkpoint_every_minutes)
      with start.report_progress.timed('checkpoint'):
        checkpointing.save_checkpoint(mngr, step, state)
      last_save = time.monotonic()

    if signum is not None:
      mngr.wait_until_finished()
      error = Interrupted(signum, step, mngr.directory)
      logging.warning('%s', error)
      raise error

  state = flax.jax_utils.unreplicate(state)
  logging.info('Process %d finished at step %d; parameter digest %s.', jax.process_index(),
               int(state.step), parameter_digest(state.params))
  return state


def parameter_digest(params: Any) -> str:
  """SHA-256 of all parameter bytes: equal digests on all processes mean identical replicas."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]

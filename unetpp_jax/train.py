"""Training and evaluation: pure pmapped steps, clu metrics, TensorBoard writers, Orbax checkpoints.

Exact resume: a checkpoint holds the step, parameters, optimizer state and BatchNorm statistics; the
dropout RNG of a step is fold_in(seed, step) and the input stream is a pure function of
(config, step), so a restarted run continues with exactly the batches and randomness an
uninterrupted run would have used.

Failures (see docs/operations.md, "Resuming and failures"):
- SIGTERM / SIGINT: the current step finishes, its checkpoint is saved and written, and
  `Interrupted` is raised (main exits with 128 + the signal number). A second signal stops at once.
- SIGKILL: Orbax writes each checkpoint to a temporary folder renamed when complete, so a restart
  resumes from the last complete checkpoint.
- Non-finite loss or gradients (checked on the devices, agreed by all of them):
  config.nonfinite_policy 'halt' raises FloatingPointError naming the first bad step, without saving
  the bad state; 'skip' keeps the previous parameters, optimizer state and BatchNorm statistics,
  leaves the step out of the train metrics and counts it in train/skipped_updates.
- A workdir whose checkpoints come from a config differing in fields that change the model, data
  or optimisation (see config_validation.RESUMABLE_CHANGES) is refused before anything compiles,
  unless allow_config_change.
"""

import functools
import hashlib
import json
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils

from unetpp_jax import config_validation, metrics, models, writers
from unetpp_jax.heads import Heads
from unetpp_jax import data as data_sources

AXIS = 'batch'  # pmap axis: gradients and BatchNorm statistics are averaged over it.
Batch = dict[str, np.ndarray]


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_input(config: ml_collections.ConfigDict, start_step: int) -> Any:
  """The input source named by config.data.source (see `unetpp_jax.data`)."""
  return data_sources.create_input(config, start_step)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  if opt.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, opt.warmup_steps, max(config.num_train_steps, opt.warmup_steps + 1)
    )
  if opt.warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps),
         optax.constant_schedule(opt.learning_rate)],
        [opt.warmup_steps],
    )
  return optax.constant_schedule(opt.learning_rate)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  lr = learning_rate_schedule(config)
  if opt.name == 'adam':
    tx = optax.adam(lr)
  elif opt.name == 'adamw':
    tx = optax.adamw(lr, weight_decay=opt.weight_decay)
  else:
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay), optax.sgd(lr, opt.momentum))
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, model: models.UNetPlusPlus
) -> TrainState:
  size = config.data.image_size
  variables = jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=create_optimizer(config),
  )


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    dropout_rng: jax.Array,
    heads: Heads,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, metrics.SegmentationMetrics, jax.Array]:
  """One synchronous update on a per-device batch (runs under pmap with axis `AXIS`).

  Returns:
    The new state, the step's metrics and an int32 flag, 1 if the loss (on any device) or the
    gradients were non-finite. With `skip_nonfinite` such a step keeps the previous parameters,
    optimizer state and BatchNorm statistics (only the step counter advances) and its metrics are
    zeroed so that it drops out of the averages.
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))
  weight = jnp.ones(batch['label'].shape[:1], jnp.float32)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'],
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': rng},
    )
    loss, head_losses = heads.loss(logits, batch['label'], weight)
    return loss, (logits, head_losses, updates)

  (loss, (logits, head_losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  # Each device's loss is the mean over its shard, so the mean of gradients is the gradient of the
  # global batch mean. BatchNorm statistics are already synchronised (BatchNorm axis_name).
  grads = jax.lax.pmean(grads, AXIS)
  # Losses differ per device, so the verdict is reduced over devices: all of them must agree.
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  finite = jax.lax.pmin(finite.astype(jnp.int32), AXIS) == 1
  new_state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
  step_metrics = heads.metrics(
      logits=logits, label=batch['label'], loss=loss, head_losses=head_losses, axis_name=AXIS)
  if skip_nonfinite:
    select = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = new_state.replace(
        params=select(new_state.params, state.params),
        opt_state=select(new_state.opt_state, state.opt_state),
        batch_stats=select(new_state.batch_stats, state.batch_stats),
    )
    step_metrics = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), step_metrics)
  return new_state, step_metrics, 1 - finite.astype(jnp.int32)


def eval_step(state: TrainState, batch: Batch, *, heads: Heads) -> metrics.SegmentationMetrics:
  """Metrics of every head (full network) on a per-device batch with padding weights."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  loss, head_losses = heads.loss(logits, batch['label'], batch['weight'])
  return heads.metrics(logits=logits, label=batch['label'], loss=loss, head_losses=head_losses,
                       weight=batch['weight'], axis_name=AXIS)


def evaluate(p_eval_step: Callable[..., Any], state: TrainState, batches: Iterable[Batch],
             output_heads: Sequence[int] | None = None) -> dict:
  """Metrics over one full pass of `batches`, summed globally before any ratio is taken.

  The sums stay on the devices (each device holds the global sums, gathered inside the step) and
  are read once at the end, so batches are dispatched without waiting for each other.
  """
  total = None
  for batch in batches:
    update = p_eval_step(state, batch)
    total = update if total is None else _p_merge(total, update)
  if total is None:
    raise ValueError('The validation split is empty.')
  return metrics.summarize(flax.jax_utils.unreplicate(total), prefix='eval/',
                           output_heads=output_heads)


_STEPS_IN_FLIGHT = 2  # Train steps dispatched but not finished, at most.

# Sums two replicated metric collections on their devices (no host transfer).
_p_merge = jax.pmap(lambda a, b: a.merge(b), axis_name=AXIS)
# A replicated tree (or host arrays with a leading device axis) as a pmap output.
_p_copy = jax.pmap(lambda tree: tree, axis_name=AXIS)


def _accumulating_train_step(state, totals, batch, **kwargs):
  """`train_step` whose metrics are added to `totals` on the devices (runs under pmap).

  The train loop then reads metrics only at log steps: no per-step host transfer or merge.
  """
  state, step_metrics, nonfinite = train_step(state, batch, **kwargs)
  return state, totals.merge(step_metrics), nonfinite


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def checkpoint_manager(workdir: epath.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  # create=False: the first save makes the folder, so a run that fails before it leaves no empty
  # checkpoints/ behind.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options)


def restore_or_initialize(
    mngr: ocp.CheckpointManager, state: TrainState
) -> TrainState:
  """The latest checkpoint in `mngr` restored into `state`'s structure, or `state` itself."""
  step = mngr.latest_step()
  if step is None:
    return state
  logging.info('Restoring checkpoint of step %d from %s.', step, mngr.directory)
  return mngr.restore(step, args=ocp.args.StandardRestore(jax.device_get(state)))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: TrainState) -> None:
  """Saves the replicated `state` as host arrays.

  Every process calls this; Orbax writes host (numpy) arrays from process 0 only, so a checkpoint
  of N processes is one copy of the state and restores in any number of processes.
  """
  mngr.save(step, args=ocp.args.StandardSave(jax.device_get(flax.jax_utils.unreplicate(state))))


class Interrupted(Exception):
  """Training stopped on a signal after saving the checkpoint of `step`; rerun to continue."""

  def __init__(self, signum: int, step: int, directory: epath.PathLike):
    self.signum = signum
    self.step = step
    super().__init__(
        f'{signal.Signals(signum).name} received: stopped at step {step} with its checkpoint in '
        f'{directory}. Run the same command again to continue from there.'
    )

  @property
  def exit_code(self) -> int:
    """The shell's code for a process ended by this signal (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + self.signum


class _StopRequest:
  """While active, SIGTERM/SIGINT only record the signal; the train loop polls `signum`.

  The handler does no other work: the loop stops at a step boundary. A second signal raises
  KeyboardInterrupt at once (e.g. a second Ctrl-C during a long compile). Signal handlers can only
  be installed from the main thread; elsewhere the default behaviour stays.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt(f'Second signal ({signal.Signals(signum).name}): stopping now.')
    self.signum = signum

  def __enter__(self) -> '_StopRequest':
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    else:
      logging.warning('Not in the main thread: SIGTERM/SIGINT will not stop training gracefully.')
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def _check_stored_config(
    workdir: epath.Path, config: ml_collections.ConfigDict, allow_config_change: bool
) -> None:
  """Refuses to resume checkpoints made with a config differing in model/data/optimiser fields."""
  path = workdir / 'config.json'
  if not path.exists():
    return
  try:
    changes = config_validation.config_changes(json.loads(path.read_text()), config)
  except (json.JSONDecodeError, AttributeError) as e:  # Not JSON, or not a JSON object.
    changes = [f'{path} cannot be read as a config ({e})']
  if not changes:
    return
  listing = '\n  '.join(changes)
  if allow_config_change:
    logging.warning('Resuming %s with a changed config (allow_config_change):\n  %s', workdir,
                    listing)
    return
  raise ValueError(
      f'{workdir} holds checkpoints of a run whose config ({path}) differs in fields that change '
      f'the model, data or optimisation:\n  {listing}\nUse a new --workdir for a new experiment, '
      'or pass --allow_config_change to resume with the new values deliberately.'
  )


def write_atomically(path: epath.Path, text: str) -> None:
  """A kill mid-write must not leave a truncated file: write a temporary file, then rename it."""
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(text)
  tmp.replace(path)


def _agreed_stop(signum: int | None, time_due: bool = False) -> tuple[int | None, bool]:
  """(the signal any process received, whether any process found a checkpoint due), agreed by
  all processes (they must stop and checkpoint at the same step)."""
  if jax.process_count() == 1:
    return signum, time_due
  received = multihost_utils.process_allgather(np.array([signum or 0, int(time_due)], np.int32))
  received = np.max(np.asarray(received).reshape(-1, 2), axis=0)
  return int(received[0]) or None, bool(received[1])


def _time_due(every_minutes: float, last_save: float) -> bool:
  """Whether `every_minutes` (0 = never) have passed since `last_save` (time.monotonic())."""
  return every_minutes > 0 and time.monotonic() - last_save >= 60 * every_minutes


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
    workdir: Checkpoints, config.json, TensorBoard events and eval_metrics.json go here.
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
  config_validation.validate(config)
  workdir = epath.Path(workdir)
  if not workdir.is_absolute():  # Orbax needs absolute paths (gs:// paths already are).
    workdir = workdir.absolute()
  # Nothing is written to the workdir before the data is ready: a run that fails before it
  # starts (a changed config, missing or bad data) leaves the workdir as it found it.
  mngr = checkpoint_manager(workdir, config.keep_checkpoints)
  writer = None
  try:
    start_step = mngr.latest_step() or 0
    if mngr.latest_step() is not None:
      _check_stored_config(workdir, config, allow_config_change)
    with _StopRequest() as stop:
      data = input_fn(config, start_step)
      signum, _ = _agreed_stop(stop.signum)
      if signum is not None:  # Interrupted while preparing the data: nothing to save.
        raise Interrupted(signum, start_step, mngr.directory)
      is_chief = jax.process_index() == 0
      if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / 'config.json', config.to_json_best_effort(indent=2))
      writer = writers.create_default_writer(workdir, just_logging=not is_chief)
      # _train asks for the data of the step it restores, which is `start_step`.
      prepared = lambda c, step: data if step == start_step else input_fn(c, step)
      return _train(config, workdir, prepared, mngr, writer, stop)
  finally:
    # Also on errors: let an in-flight save finish, so the last checkpoint is a complete one.
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.flush()


def _train(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    input_fn: Callable[[ml_collections.ConfigDict, int], Any],
    mngr: ocp.CheckpointManager,
    writer: writers.Writer,
    stop: _StopRequest,
) -> TrainState:
  """The body of `train_and_evaluate`, with signal handlers installed."""
  is_chief = jax.process_index() == 0
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  model = models.create_model(config.model, bn_axis_name=AXIS)
  state = create_train_state(config, init_rng, model)
  state = restore_or_initialize(mngr, state)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
    logging.info('Parameters: %d', sum(x.size for x in jax.tree.leaves(state.params)))

  data = input_fn(config, start_step)
  _write_validation_ids(workdir, data.eval_batches)
  # Batches are prepared and copied to the devices on a background thread, ahead of the step.
  train_iter = BackgroundInput(data.train_iter, size=2)
  report_progress = writers.ReportProgress(
      num_train_steps=config.num_train_steps, batch_size=config.batch_size, writer=writer
  )
  try:
    return _train_loop(config, workdir, mngr, writer, stop, state, data, train_iter,
                       report_progress, dropout_rng, start_step, is_chief)
  finally:
    # Helper threads end here rather than at interpreter exit, which would wait for them.
    train_iter.close()


def _train_loop(config, workdir, mngr, writer, stop, state, data, train_iter, report_progress,
                dropout_rng, start_step, is_chief) -> TrainState:
  """Steps from `start_step` to config.num_train_steps with logging, evaluation and checkpoints.

  Between log/eval/checkpoint steps nothing is read back from the devices: metrics are summed
  inside the pmapped step and non-finite flags are kept as device arrays, so the host only
  dispatches steps and the devices never wait for it.
  """
  heads = Heads.from_config(config)
  skip_nonfinite = config.nonfinite_policy == 'skip'
  p_train_step = jax.pmap(
      functools.partial(_accumulating_train_step, dropout_rng=dropout_rng,
                        heads=heads, skip_nonfinite=skip_nonfinite),
      axis_name=AXIS,
      donate_argnums=(0, 1),
  )
  p_eval_step = jax.pmap(functools.partial(eval_step, heads=heads), axis_name=AXIS)
  schedule = learning_rate_schedule(config)
  # State and metric sums enter the step in the layout it returns them in (a pmap output), so the
  # step compiles once rather than again for its own outputs.
  state = _p_copy(flax.jax_utils.replicate(state))
  zero_metrics = None  # Replicated zero sums (host numpy), shaped at the first step.
  train_metrics = None  # Replicated sums since the last log step, on the devices.
  # Per-step non-finite flags, still on the devices: reading them at every step would stall the
  # pipelining of steps, so they are read at log/eval/checkpoint steps (before anything is
  # written or saved) and at a stop.
  nonfinite_flags = []
  skipped_updates = 0
  last_save = time.monotonic()  # Of the last checkpoint, or the start (checkpoint_every_minutes).
  evaluated = False  # Whether this run has evaluated yet.
  logging.info('Training from step %d to %d.', start_step, config.num_train_steps)
  signum, _ = _agreed_stop(stop.signum)
  if signum is not None:  # Interrupted while preparing: there is nothing new to save.
    raise Interrupted(signum, start_step, mngr.directory)
  for step in range(start_step + 1, config.num_train_steps + 1):
    batch = next(train_iter)
    if zero_metrics is None:  # Traced, not compiled.
      shapes = jax.eval_shape(
          jax.pmap(functools.partial(train_step, dropout_rng=dropout_rng, heads=heads),
                   axis_name=AXIS), state, batch)[1]
      zero_metrics = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    if train_metrics is None:
      train_metrics = _p_copy(zero_metrics)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, train_metrics, nonfinite = p_train_step(state, train_metrics, batch)
    nonfinite_flags.append((step, nonfinite))
    if len(nonfinite_flags) > _STEPS_IN_FLIGHT:
      # Waits for an earlier step, not this one: the devices keep a queue of work, but a bounded
      # one. XLA:CPU aborts when dozens of pmapped steps with collectives are queued (a stuck
      # all-gather rendezvous).
      nonfinite_flags[-1 - _STEPS_IN_FLIGHT][1].block_until_ready()
    report_progress(step)
    is_last = step == config.num_train_steps
    is_log = step % config.log_every_steps == 0 or is_last
    is_eval = step % config.eval_every_steps == 0 or is_last
    # Several processes must agree on the stopping step and on time-based checkpoints: they do so
    # at log steps only, on process 0's clock.
    signum = None if is_last else stop.signum
    time_due = False
    if is_log and not is_last:
      time_due = is_chief and _time_due(config.checkpoint_every_minutes, last_save)
      if jax.process_count() > 1:
        signum, time_due = _agreed_stop(signum, time_due)
    elif jax.process_count() > 1:
      signum = None
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
      scalars['train/learning_rate'] = float(schedule(step - 1))
      scalars['train/skipped_updates'] = skipped_updates
      writer.write_scalars(step, scalars)
      train_metrics = None
      skipped_updates = 0

    if is_eval:
      evaluated = True
      with report_progress.timed('eval'):
        eval_scalars = evaluate(p_eval_step, state, data.eval_batches, heads.output)
      writer.write_scalars(step, eval_scalars)
      if is_chief:
        write_atomically(
            workdir / 'eval_metrics.json', json.dumps({'step': step, **eval_scalars}, indent=2)
        )

    if is_checkpoint:
      writer.flush()  # Summaries are kept as durably as checkpoints: a kill loses neither before.
      if time_due:
        logging.info('Checkpoint at step %d: %.3g minutes since the last one '
                     '(checkpoint_every_minutes=%g).', step, (time.monotonic() - last_save) / 60,
                     config.checkpoint_every_minutes)
      with report_progress.timed('checkpoint'):
        save_checkpoint(mngr, step, state)
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


def _write_validation_ids(workdir: epath.Path, eval_batches: Any) -> None:
  """Records the validation split's ids (all processes') so that evaluation needs no data
  preparation to select them. Skipped for inputs that do not report ids."""
  ids = getattr(eval_batches, 'ids', None)
  if ids is None:
    return
  local = np.asarray(ids).reshape(-1)  # Slot order: this process's contiguous shard, in order.
  if jax.process_count() > 1:  # Shards are contiguous: process order is the split's order.
    encoded = np.zeros((len(local), 256), np.uint8)
    for n, image_id in enumerate(local):
      raw = image_id.encode()[:256]
      encoded[n, :len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = multihost_utils.process_allgather(encoded).reshape(-1, 256)
    local = np.array([bytes(row).rstrip(b'\0').decode() for row in gathered])
  if jax.process_index() == 0:
    write_atomically(workdir / 'validation_ids.json',
                     json.dumps([str(i) for i in local if i], indent=0))


class BackgroundInput:
  """An iterator of batches prepared and put on the local devices by a daemon thread.

  The thread runs at most `size` batches ahead of the consumer (a bounded queue), so preparing a
  batch in Python (the numpy source) or waiting for tf.data overlaps with the running step, and
  the host-to-device copy is off the main thread too. Batches come out in the source's order, laid
  out for pmap (leading axis over `jax.local_devices()`); an exception in the source is raised by
  `next`. `close()` stops the thread without waiting for the source (a daemon thread never delays
  the process's exit, e.g. after SIGTERM).
  """

  _DONE = object()

  def __init__(self, source: Iterable[Batch], size: int = 2):
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
    self._sharding = jax.NamedSharding(mesh, jax.P('devices'))
    self._source = iter(source)
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, name='BackgroundInput', daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def _produce(self) -> None:
    try:
      for batch in self._source:
        if not self._put(jax.device_put(batch, self._sharding)):
          return
      self._put(self._DONE)
    except BaseException as e:  # pylint: disable=broad-except  # Re-raised in the consumer.
      self._put(e)

  def __iter__(self) -> 'BackgroundInput':
    return self

  def __next__(self) -> Batch:
    item = self._queue.get()
    if item is self._DONE:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    return item

  def close(self, timeout: float = 1.0) -> None:
    """Stops the thread; waits at most `timeout` seconds for a batch being prepared."""
    self._stop.set()
    while True:  # Unblocks a pending put and frees the queued device buffers.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)


def parameter_digest(params: Any) -> str:
  """SHA-256 of all parameter bytes: equal digests on all processes mean identical replicas."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]

"""Training and evaluation: pure pmapped steps, clu metrics and writers, Orbax checkpoints.

Exact resume: a checkpoint holds the step, parameters, optimizer state and BatchNorm statistics; the
dropout RNG of a step is fold_in(seed, step) and the input stream is a pure function of
(config, step), so a restarted run continues with exactly the batches and randomness an
uninterrupted run would have used.
"""

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax.training import train_state

from unetpp_jax import config_validation, losses, metrics, models

AXIS = 'batch'  # pmap axis: gradients and BatchNorm statistics are averaged over it.
Batch = dict[str, np.ndarray]


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_input(config: ml_collections.ConfigDict, start_step: int) -> Any:
  """The input pipeline named by config.data.source; 'npz:PATH' needs no tensorflow."""
  if config.data.source.startswith('npz:'):
    from unetpp_jax import numpy_pipeline as pipeline  # pylint: disable=g-import-not-at-top
  else:
    from unetpp_jax import input_pipeline as pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.create_input(config, start_step=start_step)


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


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(
      heads=tuple(config.loss.deep_supervision_heads),
      head_weights=tuple(config.loss.head_weights),
      bce_weight=config.loss.bce_weight,
      dice_weight=config.loss.dice_weight,
  )


def train_step(
    state: TrainState, batch: Batch, *, dropout_rng: jax.Array, loss_kwargs: dict[str, Any]
) -> tuple[TrainState, metrics.SegmentationMetrics]:
  """One synchronous update on a per-device batch (runs under pmap with axis `AXIS`)."""
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
    loss, head_losses = losses.deep_supervision_loss(logits, batch['label'], weight, **loss_kwargs)
    return loss, (logits, head_losses, updates)

  (loss, (logits, head_losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  # Each device's loss is the mean over its shard, so the mean of gradients is the gradient of the
  # global batch mean. BatchNorm statistics are already synchronised (BatchNorm axis_name).
  grads = jax.lax.pmean(grads, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
  step_metrics = metrics.from_outputs(
      logits=logits, label=batch['label'], loss=loss, head_losses=head_losses,
      heads=loss_kwargs['heads'], axis_name=AXIS,
  )
  return state, step_metrics


def eval_step(
    state: TrainState, batch: Batch, *, loss_kwargs: dict[str, Any]
) -> metrics.SegmentationMetrics:
  """Metrics of every head (full network) on a per-device batch with padding weights."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  loss, head_losses = losses.deep_supervision_loss(
      logits, batch['label'], batch['weight'], **loss_kwargs
  )
  return metrics.from_outputs(
      logits=logits, label=batch['label'], loss=loss, head_losses=head_losses,
      heads=loss_kwargs['heads'], weight=batch['weight'], axis_name=AXIS,
  )


def evaluate(p_eval_step: Callable[..., Any], state: TrainState, batches: Iterable[Batch]) -> dict:
  """Metrics over one full pass of `batches`, summed globally before any ratio is taken."""
  total = None
  for batch in batches:
    update = p_eval_step(state, batch).unreplicate()
    total = update if total is None else total.merge(update)
  if total is None:
    raise ValueError('The validation split is empty.')
  return metrics.summarize(total, prefix='eval/')


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def checkpoint_manager(workdir: epath.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options)


def restore_or_initialize(
    mngr: ocp.CheckpointManager, state: TrainState
) -> TrainState:
  """The latest checkpoint in `mngr` restored into `state`'s structure, or `state` itself."""
  step = mngr.latest_step()
  if step is None:
    return state
  logging.info('Restoring checkpoint of step %d from %s.', step, mngr.directory)
  return mngr.restore(step, args=ocp.args.StandardRestore(state))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    input_fn: Callable[[ml_collections.ConfigDict, int], Any] = create_input,
) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates and checkpoints.

  Args:
    config: Hyperparameters (see configs/dsb.py).
    workdir: Checkpoints, config.json, TensorBoard events and eval_metrics.json go here.
    input_fn: (config, start_step) -> object with `train_iter` (iterator of numpy batches, see
      input_pipeline) and `eval_batches`; any source of numpy batches works.

  Returns:
    The final train state (on the host's first device).
  """
  config_validation.validate(config)
  workdir = epath.Path(workdir)
  if not workdir.is_absolute():  # Orbax needs absolute paths (gs:// paths already are).
    workdir = workdir.absolute()
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  model = models.create_model(config.model, bn_axis_name=AXIS)
  state = create_train_state(config, init_rng, model)
  mngr = checkpoint_manager(workdir, config.keep_checkpoints)
  state = restore_or_initialize(mngr, state)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
    logging.info('Parameters: %d', sum(x.size for x in jax.tree.leaves(state.params)))

  data = input_fn(config, start_step)
  # Copies the next batches to the devices while the current step runs.
  train_iter = flax.jax_utils.prefetch_to_device(data.train_iter, 2)
  loss_kwargs = _loss_kwargs(config)
  p_train_step = jax.pmap(
      functools.partial(train_step, dropout_rng=dropout_rng, loss_kwargs=loss_kwargs),
      axis_name=AXIS,
      donate_argnums=(0,),
  )
  p_eval_step = jax.pmap(functools.partial(eval_step, loss_kwargs=loss_kwargs), axis_name=AXIS)
  schedule = learning_rate_schedule(config)
  state = flax.jax_utils.replicate(state)

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=writer
  )
  train_metrics = None
  logging.info('Training from step %d to %d.', start_step, config.num_train_steps)
  for step in range(start_step + 1, config.num_train_steps + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, update = p_train_step(state, next(train_iter))
    update = update.unreplicate()  # Gathered inside pmap: every device holds the global sums.
    train_metrics = update if train_metrics is None else train_metrics.merge(update)
    report_progress(step)
    is_last = step == config.num_train_steps

    if step % config.log_every_steps == 0 or is_last:
      scalars = metrics.summarize(train_metrics, prefix='train/')
      scalars['train/learning_rate'] = float(schedule(step - 1))
      writer.write_scalars(step, scalars)
      train_metrics = None

    if step % config.eval_every_steps == 0 or is_last:
      with report_progress.timed('eval'):
        eval_scalars = evaluate(p_eval_step, state, data.eval_batches)
      writer.write_scalars(step, eval_scalars)
      if is_chief:
        (workdir / 'eval_metrics.json').write_text(
            json.dumps({'step': step, **eval_scalars}, indent=2)
        )

    if step % config.checkpoint_every_steps == 0 or is_last:
      with report_progress.timed('checkpoint'):
        mngr.save(step, args=ocp.args.StandardSave(flax.jax_utils.unreplicate(state)))

  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  return flax.jax_utils.unreplicate(state)

"""The pure steps of training, under pmap: the train state, its optimizer, and train and eval steps.

`train` runs them in its loop; benchmarks and tests run them directly. Every function here runs on
the devices (or builds what does) and touches no file.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from unetpp_jax import metrics, models
from unetpp_jax.heads import Heads

AXIS = 'batch'  # pmap axis: gradients and BatchNorm statistics are averaged over it.
Batch = dict[str, np.ndarray]


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Exponential moving average of {'params', 'batch_stats'} (config.optimizer.ema_decay), the
  # variables validation and inference use; {} when off, so that the checkpoints of runs without
  # it keep their structure.
  ema: Any = flax.struct.field(default_factory=dict)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  def inference_variables(self) -> dict[str, Any]:
    """The variables that validation and inference use: the moving average where there is one."""
    return self.ema or {'params': self.params, 'batch_stats': self.batch_stats}


def update_ema(state: TrainState) -> TrainState:
  """`state` with its moving average moved towards its variables (a no-op when off).

  Bias-corrected as Adam's moments are: after t steps the weights of step k weigh
  (1 - decay) * decay**(t-k) / (1 - decay**t) (the weights sum to 1), so the average holds the
  first step's weights after one step, never the random initialisation, and spans about
  1 / (1 - decay) steps once t is larger. (A step skipped for non-finite gradients is not
  averaged, but counts in t.)
  """
  if not state.ema:
    return state
  decay = jnp.float32(state.ema_decay)  # Both sides in float32: the first step size is exactly 1.
  step_size = (1 - decay) / (1 - decay ** state.step)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return state.replace(ema=optax.incremental_update(variables, state.ema, step_size))


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


def updates_applied(opt_state: optax.OptState) -> int:
  """How many updates the learning-rate schedule of `opt_state` (`create_optimizer`'s; replicated
  or not) has counted: the step, less any skipped for non-finite gradients, which hold the whole
  optimizer state."""
  def is_schedule(s):
    return isinstance(s, optax.ScaleByScheduleState)
  count = next(s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)).count
  return int(jax.device_get(count[0] if count.ndim else count))  # The first device's replica.


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
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  ema_decay = config.optimizer.ema_decay
  return TrainState.create(
      apply_fn=model.apply,
      tx=create_optimizer(config),
      **variables,
      ema=jax.tree.map(jnp.copy, variables) if ema_decay else {},
      ema_decay=ema_decay,
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
    optimizer state, BatchNorm statistics and moving average (only the step counter advances) and
    its metrics are zeroed so that it drops out of the averages.
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
  new_state = update_ema(
      state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {})))
  step_metrics = heads.metrics(
      logits=logits, label=batch['label'], loss=loss, head_losses=head_losses, axis_name=AXIS)
  if skip_nonfinite:
    select = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = new_state.replace(
        params=select(new_state.params, state.params),
        opt_state=select(new_state.opt_state, state.opt_state),
        batch_stats=select(new_state.batch_stats, state.batch_stats),
        ema=select(new_state.ema, state.ema),
    )
    step_metrics = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), step_metrics)
  return new_state, step_metrics, 1 - finite.astype(jnp.int32)


def eval_step(state: TrainState, batch: Batch, *, heads: Heads) -> metrics.SegmentationMetrics:
  """Metrics of every head (full network, its inference variables) on a per-device batch with
  padding weights."""
  logits = state.apply_fn(state.inference_variables(), batch['image'], train=False)
  loss, head_losses = heads.loss(logits, batch['label'], batch['weight'])
  return heads.metrics(logits=logits, label=batch['label'], loss=loss, head_losses=head_losses,
                       weight=batch['weight'], axis_name=AXIS)


# Sums two replicated metric collections on their devices (no host transfer).
_p_merge = jax.pmap(lambda a, b: a.merge(b), axis_name=AXIS)


def evaluate_batches(p_eval_step: Callable[..., Any], state: TrainState, batches: Iterable[Batch],
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


def accumulating_train_step(state, totals, batch, **kwargs):
  """`train_step` whose metrics are added to `totals` on the devices (runs under pmap).

  The train loop then reads metrics only at log steps: no per-step host transfer or merge.
  """
  state, step_metrics, nonfinite = train_step(state, batch, **kwargs)
  return state, totals.merge(step_metrics), nonfinite

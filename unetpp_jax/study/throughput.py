"""Throughput of the train step, pruned inference and the input pipeline
(python -m unetpp_jax.benchmark).

Timed on in-memory arrays already on the devices, so this needs no tensorflow (except for
`benchmark_input`) and times the step itself, not host-to-device copies.
"""

import collections
import dataclasses
import functools
import itertools
import pathlib
import re
import resource
import time
import types

import flax
import jax
import numpy as np

from unetpp_jax import models, train
from unetpp_jax.heads import Heads
from unetpp_jax.steps import AXIS, create_train_state, train_step
from unetpp_jax.study import flops


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def _peak_memory() -> tuple[int, str]:
  """Peak device memory where the backend reports it; on CPU, the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device_peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host_peak_rss'


def _time_steps(run, steps: int, warmup: int) -> np.ndarray:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return np.asarray(times)


def benchmark_model(config, *, batch, mode, prune_level, steps, warmup, profile_dir=None) -> dict:
  devices = jax.local_device_count()
  if batch % devices:
    raise ValueError(f'--batch={batch} must be a multiple of the device count ({devices}).')
  size = config.data.image_size
  rng = np.random.default_rng(0)
  images = rng.random((devices, batch // devices, size, size, 3), np.float32)
  labels = (rng.random((devices, batch // devices, size, size)) > 0.7).astype(np.int32)
  model = models.create_model(config.model, bn_axis_name=AXIS)
  state = create_train_state(config, jax.random.key(0), model)
  replicated = flax.jax_utils.replicate(state)
  # The batch stays on the devices: this times the step, not host-to-device copies.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
  batch_arrays = jax.device_put({'image': images, 'label': labels},
                                jax.NamedSharding(mesh, jax.P('devices')))

  if mode == 'train':
    step = jax.pmap(
        functools.partial(train_step, dropout_rng=jax.random.key(1),
                          heads=Heads.from_config(config)),
        axis_name=AXIS, donate_argnums=(0,))
  else:
    def infer(state, batch):
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      return models.foreground_probability(
          model.apply(variables, batch['image'], prune_level=prune_level)[-1])
    step = jax.pmap(infer, axis_name=AXIS)

  # One device's program (its batch // devices images): counted on the traced program, the same on
  # every backend; XLA's cost analysis of the lowered program for comparison (0 where the backend
  # has none).
  flops_per_device = flops.count_flops(step, replicated, batch_arrays)
  xla_flops_per_device = _flops(step.lower(replicated, batch_arrays))

  def run(wait=True):
    nonlocal replicated
    if mode == 'train':
      replicated, out, _ = step(replicated, batch_arrays)  # The old state was donated.
    else:
      out = step(replicated, batch_arrays)
    if wait:
      jax.block_until_ready(out)
    return out

  first_call = _time_steps(run, 1, 0)[0]  # Compilation plus one step.
  times = _time_steps(run, steps, warmup)
  # The same steps dispatched back to back, waited for once: what a loop without host work reaches.
  # At most two steps in flight, as in the train loop (deep queues of collectives abort XLA:CPU).
  start = time.perf_counter()
  in_flight = collections.deque()
  for _ in range(steps):
    in_flight.append(run(wait=False))  # Outputs other than the state are not donated.
    if len(in_flight) > 2:
      jax.block_until_ready(in_flight.popleft())
  jax.block_until_ready(replicated)
  pipelined = (time.perf_counter() - start) / steps
  median = float(np.median(times))
  peak_memory, memory_source = _peak_memory()
  flops_per_image = flops_per_device / (batch // devices)
  images_per_sec = batch / median
  result = dict(
      mode=mode, images_per_sec=images_per_sec, step_ms_median=1e3 * median,
      step_ms_mean=1e3 * float(np.mean(times)), step_ms_pipelined=1e3 * pipelined,
      step_ms_p90=1e3 * float(np.percentile(times, 90)), compile_s=first_call - median,
      flops_per_image=flops_per_image, achieved_gflops=flops_per_image * images_per_sec / 1e9,
      xla_flops_per_image=xla_flops_per_device / (batch // devices),
      peak_memory_bytes=peak_memory, peak_memory_source=memory_source,
      params=models.count_parameters(model, prune_level),
      prune_level=prune_level or model.levels,
  )
  if profile_dir:
    result['top_ops'] = profile(run, 2, profile_dir)
  return result


def profile(run, steps: int, directory: str, top: int = 12) -> list[dict]:
  """Traces `steps` calls of `run` into `directory` (TensorBoard's profile plugin reads it).

  Returns the kinds of XLA operation that took the most time, summed over threads and divided by
  `steps`: [{'op', 'ms_per_step', 'calls_per_step'}]. A kind is an HLO name without its numeric
  suffix (e.g. all `ynn_fusion.N` together), which is what tells where a step's time goes.
  """
  jax.profiler.start_trace(directory)
  for _ in range(steps):
    run()
  jax.profiler.stop_trace()
  path = max(pathlib.Path(directory).rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  totals, calls = collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
    for line in plane.lines:
      # XLA:CPU's thunk threads, or an accelerator's 'XLA Ops' line (not whole modules).
      if 'XLA' not in line.name or 'Modules' in line.name:
        continue
      for event in line.events:
        if event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):  # containers, not ops
          continue
        kind = re.sub(r'\.\d+$', '', event.name)
        totals[kind] += event.duration_ns
        calls[kind] += 1
  return [dict(op=kind, ms_per_step=ns / 1e6 / steps, calls_per_step=calls[kind] / steps)
          for kind, ns in totals.most_common(top)]


def benchmark_matmul(*, size: int, steps: int, warmup: int) -> dict:
  """GFLOP/s of one large float32 matmul on the first device: the practical peak the step's
  convolutions can be compared with (achieved_gflops of train/infer over this)."""
  a = jax.device_put(np.ones((size, size), np.float32))
  matmul = jax.jit(lambda a: a @ a)
  times = _time_steps(lambda: matmul(a).block_until_ready(), steps, warmup)
  median = float(np.median(times))
  return dict(mode='matmul', size=size, step_ms_median=1e3 * median,
              achieved_gflops=2 * size**3 / median / 1e9)


def add_mfu(result: dict, dtype: str) -> dict:
  """Adds the peak FLOP/s of the devices used and the MFU (achieved / peak) to a benchmark result.

  Accelerators: the datasheet peak of the device kind (flops.PEAK_FLOPS) times the device count.
  CPU: there is no datasheet figure, so the peak is measured: a 2048x2048 float32 matmul, which
  XLA:CPU runs on all cores (the practical peak of the whole CPU, whatever the device count).
  Device kinds missing from the table get peak_flops / mfu None.
  """
  devices = jax.local_devices()
  if devices[0].platform == 'cpu':
    peak = benchmark_matmul(size=2048, steps=5, warmup=1)['achieved_gflops'] * 1e9
    source = 'measured: 2048x2048 float32 matmul on this CPU (all cores)'
  else:
    per_device = flops.peak_flops_per_device(devices[0].device_kind, dtype)
    peak = per_device * len(devices) if per_device else None
    source = (f'datasheet: {devices[0].device_kind}, {dtype}, dense, x{len(devices)} devices'
              if peak else f'unknown device kind {devices[0].device_kind!r}: add it to '
                           'flops.PEAK_FLOPS')
  if 'achieved_gflops' in result:
    result['mfu'] = flops.mfu(result['achieved_gflops'] * 1e9, peak)
  result.update(peak_flops=peak, peak_flops_source=source)
  return result


def benchmark_input(config, *, batch, steps, warmup) -> dict:
  """Images/s of the tf.data training stream alone (decode, augment, batch)."""
  from unetpp_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  config.batch_size = batch
  start = time.perf_counter()
  data = tfds_source.create_input(config)
  setup_s = time.perf_counter() - start
  times = _time_steps(lambda: next(data.train_iter), steps, warmup)
  median = float(np.median(times))
  return dict(mode='input', images_per_sec=batch / median, step_ms_median=1e3 * median,
              step_ms_p90=1e3 * float(np.percentile(times, 90)), setup_s=setup_s,
              dataset=config.data.dataset, train_preprocess=config.data.train_preprocess)


def benchmark_loop(config, *, batch, steps, warmup, source='arrays') -> dict:
  """Speed of the real train loop (`train.train_and_evaluate`) against its bare step.

  The loop runs warmup + steps + a margin of steps in a temporary workdir, with the config's
  log_every_steps (metrics read back, progress) and no evaluation or checkpoint before its last
  step; its time per step is taken between the input requests of batch `warmup` and batch
  `warmup + steps`. The main thread syncs with the devices at every log step and the input runs
  at most a few batches ahead, so over many log intervals this is the loop's sustained rate.
  The bare step is `benchmark_model`'s: the same step on a batch already on the devices, `steps`
  calls dispatched back to back and waited for once (step_ms_pipelined; step_ms_mean waits for
  each step). loop_vs_step = bare step time / loop step time (1.0: no host overhead).

  Args:
    source: 'arrays' (random in-memory numpy batches: the loop's own overhead, host-to-device
      copies included) or 'config' (config.data's input pipeline, i.e. data preparation too).
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  step = benchmark_model(config, batch=batch, mode='train', prune_level=None, steps=steps,
                         warmup=warmup)
  config = config.copy_and_resolve_references()
  config.batch_size = batch
  config.eval_batch_size = batch
  # The input requests batches a few steps ahead of the loop (a bounded queue), so the timed window
  # starts `margin` requests after the warm-up (the first step, with its compilation, is done) and
  # ends `margin` steps before the last (evaluation and checkpoint).
  margin = 8
  config.num_train_steps = warmup + steps + 2 * margin
  config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
  if 'checkpoint_every_minutes' in config:
    config.checkpoint_every_minutes = 0
  requests = []

  def timed(iterator):
    for item in iterator:
      requests.append(time.perf_counter())
      yield item

  def input_fn(config, start_step):
    if source == 'config':
      data = train.create_input(config, start_step)
      return dataclasses.replace(data, train_iter=timed(data.train_iter))
    devices, size = jax.local_device_count(), config.data.image_size
    rng = np.random.default_rng(0)
    image = rng.random((devices, batch // devices, size, size, 3), np.float32)
    label = (rng.random((devices, batch // devices, size, size)) > 0.7).astype(np.int32)
    weight = np.ones((devices, batch // devices), np.float32)
    stream = ({'image': image.copy(), 'label': label.copy()} for _ in itertools.count())
    return types.SimpleNamespace(train_iter=timed(stream),
                                 eval_batches=[dict(image=image, label=label, weight=weight)])

  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir, input_fn)
    total_s = time.perf_counter() - start
  first = warmup + margin
  loop_s = (requests[first + steps] - requests[first]) / steps
  step_s = step['step_ms_pipelined'] / 1e3
  return dict(
      mode='loop', source=source, steps=steps, log_every_steps=config.log_every_steps,
      loop_images_per_sec=batch / loop_s, loop_step_ms=1e3 * loop_s,
      step_images_per_sec=batch / step_s, step_ms_pipelined=step['step_ms_pipelined'],
      step_ms_mean=step['step_ms_mean'], loop_vs_step=step_s / loop_s,
      loop_total_s=total_s, flops_per_image=step['flops_per_image'])

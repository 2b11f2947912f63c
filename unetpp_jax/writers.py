"""TensorBoard summaries and progress reports without TensorFlow.

clu 0.0.12's `metric_writers` package imports its TensorFlow summary writer when it is imported (and
`clu.periodic_actions` imports that package), so neither can be used where TensorFlow is absent.
`Writer` keeps the methods of clu's `MetricWriter` interface that this project calls
(write_scalars, write_images, write_texts, write_hparams, flush, close) and writes TensorBoard event
files through tensorboardX, in the format of `tf.summary` (a scalar is a float32 tensor of the
'scalars' plugin), so TensorBoard and `tf.compat.v1.train.summary_iterator` read them as before.
Events are written synchronously (tensorboardX's `EventsWriter`, not its queued writer), so
`flush()` means they are on disk: a run flushes before each checkpoint so that its summaries are
never behind it. `ReportProgress` logs progress (seconds per step, images/s, ETA, time in named
parts).
"""

import collections
import contextlib
import itertools
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tensorboardX import event_file_writer
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

# Distinguishes event files opened by one process within the same second (tensorboardX names
# them by the second and the host only).
_FILE_COUNTER = itertools.count()


def _scalar_summary(tag: str, value: float) -> summary_pb2.Summary:
  """What tf.summary.scalar writes: a float32 scalar tensor tagged for the scalars plugin."""
  tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)],
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto())
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
  return summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)])


class Writer:
  """Logs every value (absl INFO) and, given a logdir, writes TensorBoard event files there."""

  def __init__(self, logdir: epath.PathLike | None = None):
    self._events = None
    if logdir is not None:
      epath.Path(logdir).mkdir(parents=True, exist_ok=True)
      self._events = event_file_writer.EventsWriter(
          os.path.join(os.fspath(logdir), 'events'),
          filename_suffix=f'.{os.getpid()}.{next(_FILE_COUNTER)}.v2')

  def _write(self, summary: summary_pb2.Summary, step: int | None = None) -> None:
    event = event_pb2.Event(wall_time=time.time(), summary=summary)
    if step is not None:
      event.step = int(step)
    self._events.write_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}'
              for k, v in sorted(scalars.items())]
    logging.info('[%d] %s', step, ', '.join(values))
    if self._events is not None:
      for tag, value in scalars.items():
        self._write(_scalar_summary(tag, value), step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: uint8 [N, H, W, C] (or float in [0, 1]) per tag; the first of each is written."""
    logging.info('[%d] Got images: %s.', step, {k: np.shape(v) for k, v in images.items()})
    if self._events is not None:
      for tag, value in images.items():
        image = np.asarray(value)[0]
        if image.dtype == np.uint8:
          image = image.astype(np.float32) / 255  # tensorboardX scales floats in [0, 1].
        self._write(tbx_summary.image(tag, image, dataformats='HWC'), step)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    logging.info('[%d] Got texts: %s.', step, texts)
    if self._events is not None:
      for tag, text in texts.items():
        self._write(tbx_summary.text(tag, text), step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('[Hyperparameters] %s', hparams)
    if self._events is not None:
      for proto in tbx_summary.hparams(dict(hparams), {}):
        self._write(proto)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def create_default_writer(logdir: epath.PathLike | None, *, just_logging: bool = False) -> Writer:
  """As clu's create_default_writer: logging, plus event files in `logdir` unless just_logging."""
  return Writer(None if just_logging else logdir)


def format_duration(seconds: float) -> str:
  """'2d03h', '1h05m', '4m07s', '12s': two units, so an ETA reads at a glance."""
  seconds = max(int(round(seconds)), 0)
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f'{days}d{hours:02d}h'
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


class ReportProgress:
  """Logs progress every `every_secs` and at the last step, as seconds per step and images/s with
  three significant digits plus the ETA (a CPU step takes seconds, which '0.2 steps/s' would round
  away). Rates are over the interval since the previous report, evaluation and checkpoint time
  included (`timed(name)` breaks them down at the end of the line), so the ETA accounts for them.
  Writes 'steps_per_sec', 'train/seconds_per_step' and 'train/images_per_sec' to `writer`.
  Synchronous: no thread, so nothing delays the process's exit."""

  def __init__(self, *, num_train_steps: int, batch_size: int, writer: Writer | None = None,
               every_secs: float = 60.0):
    self._num_train_steps = num_train_steps
    self._batch_size = batch_size
    self._writer = writer
    self._every_secs = every_secs
    self._time_per_part = collections.defaultdict(float)
    self._t0 = time.monotonic()
    self._previous: tuple[int, float] | None = None
    self.last_message = ''

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Call after every step (`t`: time.monotonic() unless given); returns whether it reported
    (never at the first call)."""
    t = time.monotonic() if t is None else t
    if self._previous is None:
      self._previous = (step, t)
      return False
    previous_step, previous_time = self._previous
    if step == previous_step or not (t - previous_time > self._every_secs
                                     or step == self._num_train_steps):
      return False
    self.report(step, (t - previous_time) / (step - previous_step), t - self._t0)
    self._previous = (step, t)
    return True

  def report(self, step: int, seconds_per_step: float, elapsed: float) -> None:
    images_per_sec = self._batch_size / max(seconds_per_step, 1e-12)
    total = self._num_train_steps
    message = (f'step {step}/{total} ({100 * step / total:.1f}%): {seconds_per_step:.3g} s/step, '
               f'{images_per_sec:.3g} images/s, '
               f'ETA {format_duration((total - step) * seconds_per_step)}')
    if self._time_per_part:
      message += ' (' + ', '.join(f'{100 * dt / elapsed:.1f}% {name}'
                                  for name, dt in sorted(self._time_per_part.items())) + ')'
    self.last_message = message
    logging.info('%s', message)
    if self._writer is not None:
      self._writer.write_scalars(step, {
          'steps_per_sec': 1 / max(seconds_per_step, 1e-12),
          'train/seconds_per_step': seconds_per_step,
          'train/images_per_sec': images_per_sec,
      })

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Counts the wall time of the block as time spent in `name`."""
    start = time.monotonic()
    try:
      yield
    finally:
      self._time_per_part[name] += time.monotonic() - start

"""Batches prepared and copied to the devices on a thread of their own, ahead of the train step."""

import queue
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]


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

"""Checkpoints of the train state and stopping on a signal, agreed by all processes.

A checkpoint holds the step, parameters, optimizer state, BatchNorm statistics and the moving
average of the last two (where the run keeps one), saved through the manager of
`Workdir.checkpoint_manager`. SIGTERM / SIGINT only record the signal (`StopRequest`); the train
loop then stops at a step boundary after saving that step, and raises `Interrupted`. With several
processes, every one must stop and save at the same step: they agree at log steps
(`StopRequest.poll`); `gather_strings` collects what each process holds (its share of the
validation ids) for process 0 to record.
"""

import dataclasses
import signal
import threading
import time
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from unetpp_jax.workdir import saved_entries


def restore_or_initialize(mngr: ocp.CheckpointManager, state: Any) -> Any:
  """The latest checkpoint in `mngr` restored into `state`'s structure, or `state` itself."""
  step = mngr.latest_step()
  if step is None:
    return state
  logging.info('Restoring checkpoint of step %d from %s.', step, mngr.directory)
  return restore_checkpoint(mngr, step, state)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any) -> Any:
  """Checkpoint `step` of `mngr` restored into `state`'s structure (host arrays).

  A run that starts keeping a moving average on a checkpoint without one (optimizer.ema_decay
  switched on) starts it at the restored variables; one that stops keeping it drops the saved one.
  """
  like = _saved(jax.device_get(state))
  like.pop('ema', None)
  if 'ema' in saved_entries(mngr.directory, step):
    like['ema'] = {'params': like['params'], 'batch_stats': like['batch_stats']}
  restored = mngr.restore(step, args=ocp.args.StandardRestore(like))
  ema = restored.pop('ema', None)
  if state.ema:
    restored['ema'] = ema or {'params': restored['params'], 'batch_stats': restored['batch_stats']}
  return state.replace(**restored)


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves the replicated `state` as host arrays.

  Every process calls this; Orbax writes host (numpy) arrays from process 0 only, so a checkpoint
  of N processes is one copy of the state and restores in any number of processes.
  """
  mngr.save(step, args=ocp.args.StandardSave(
      _saved(jax.device_get(flax.jax_utils.unreplicate(state)))))


def _saved(state: Any) -> dict[str, Any]:
  """What a checkpoint holds of a train state: its array fields, less a moving average that is
  off (an empty one), so that runs without one keep the structure older checkpoints have."""
  fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if field.metadata.get('pytree_node', True)}
  if not fields.get('ema', True):
    del fields['ema']
  return fields


class Interrupted(Exception):
  """Training stopped on a signal after saving the checkpoint of `step`; rerun to continue."""

  def __init__(self, signum: int, step: int, directory: epath.PathLike):
    self.signum = signum
    self.step = step
    name = signal.Signals(signum).name
    super().__init__(
        f'{name} received: stopped at step {step} with its checkpoint in {directory}. Run the same '
        'command again to continue from there.' if step else
        f'{name} received: stopped before the first step; nothing was saved. Run the same command '
        'again to start.'
    )

  @property
  def exit_code(self) -> int:
    """The shell's code for a process ended by this signal (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + self.signum


class StopRequest:
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

  def __enter__(self) -> 'StopRequest':
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

  def agreed(self) -> int | None:
    """The signal any process received, agreed by all of them (a collective: all must call)."""
    return agreed_stop(self.signum)[0]

  def poll(self, *, is_log: bool, is_last: bool, time_due: bool) -> tuple[int | None, bool]:
    """(the signal to stop at this step on, whether a time-based checkpoint is due), the same on
    all processes.

    Several processes agree at log steps only, on process 0's clock (`time_due` is process 0's
    verdict); between log steps a signal waits for the next one. The last step never stops.
    """
    signum = None if is_last else self.signum
    if not is_log or is_last:
      return (None if jax.process_count() > 1 else signum), False
    if jax.process_count() > 1:
      return agreed_stop(signum, time_due and jax.process_index() == 0)
    return signum, time_due


def agreed_stop(signum: int | None, time_due: bool = False) -> tuple[int | None, bool]:
  """(the signal any process received, whether any process found a checkpoint due), agreed by
  all processes (they must stop and checkpoint at the same step)."""
  if jax.process_count() == 1:
    return signum, time_due
  received = multihost_utils.process_allgather(np.array([signum or 0, int(time_due)], np.int32))
  received = np.max(np.asarray(received).reshape(-1, 2), axis=0)
  return int(received[0]) or None, bool(received[1])


def minutes_passed(every_minutes: float, since: float) -> bool:
  """Whether `every_minutes` (0 = never) have passed since `since` (time.monotonic())."""
  return every_minutes > 0 and time.monotonic() - since >= 60 * every_minutes


def gather_strings(local: np.ndarray, width: int = 256) -> np.ndarray:
  """The strings of all processes in process order (each truncated to `width` UTF-8 bytes)."""
  if jax.process_count() == 1:
    return local
  encoded = np.zeros((len(local), width), np.uint8)
  for n, text in enumerate(local):
    raw = str(text).encode()[:width]
    encoded[n, :len(raw)] = np.frombuffer(raw, np.uint8)
  gathered = multihost_utils.process_allgather(encoded).reshape(-1, width)
  return np.array([bytes(row).rstrip(b'\0').decode() for row in gathered])

"""SIGTERM ends a run within a bound: the step in progress, its checkpoint, then exit.

One process (the test's cost is one start and one compile) trains on the numpy pipeline and
sends itself SIGTERM while steps are running, ten times in a row, each time resuming the same
workdir as a restarted job would. Every signal must be followed by the checkpoint of the step
reached and the return of `train_and_evaluate` within BOUND_S seconds, with no thread left
behind; after the tenth, the process itself must exit (code 143) within BOUND_S.
"""

import json
import pathlib
import signal
import time

import test_reliability
from test_reliability import npz, processes  # pylint: disable=unused-import  # fixtures

SIGNALS = 10
# The grace period docs/operations.md asks schedulers to allow is larger; this bound leaves room
# for a busy 2-core CI machine (a step of this tiny model plus its save take well under a second
# there).
BOUND_S = 10.0

_CODE = """
import dataclasses, json, os, signal, sys, threading, time
import ml_collections
from unetpp_jax import train
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
workdir, signals = sys.argv[2], int(sys.argv[3])
sent = {}

def input_fn(config, start_step):
  data = train.create_input(config, start_step)
  def signalling(batches):
    for k, batch in enumerate(batches):
      if k == 4:  # Requested once the first steps ran: the step is compiled, training is on.
        sent['t'] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  return dataclasses.replace(data, train_iter=signalling(data.train_iter))

for i in range(signals):
  try:
    train.train_and_evaluate(config, workdir, input_fn)
    raise SystemExit('finished without a signal')
  except train.Interrupted as e:
    returned = time.monotonic()
    leftover = [t.name for t in threading.enumerate()
                if t is not threading.main_thread() and not t.daemon]
    inputs = sum(t.name == 'BackgroundInput' for t in threading.enumerate())
    print(json.dumps(dict(signal=sent['t'], returned=returned, step=e.step, leftover=leftover,
                          inputs=inputs)), flush=True)
    if i == signals - 1:
      sys.exit(e.exit_code)
"""


def test_sigterm_checkpoints_and_exits_within_the_bound_every_time(npz, processes, tmp_path):
  config = test_reliability._config(npz)  # pylint: disable=protected-access
  config.update(num_train_steps=10_000, log_every_steps=5, checkpoint_every_steps=10_000,
                eval_every_steps=10_000, keep_checkpoints=SIGNALS + 1)
  workdir = tmp_path / 'work'
  run = processes([json.dumps(config.to_dict()), str(workdir), str(SIGNALS)],
                  tmp_path / 'log.txt', code=_CODE)
  code = run.wait(timeout=600)
  exited = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes.
  assert code == 128 + signal.SIGTERM, run.output()[-3000:]
  reports = [json.loads(line) for line in run.output().splitlines() if line.startswith('{"signal"')]
  assert len(reports) == SIGNALS, run.output()[-3000:]
  steps = [r['step'] for r in reports]
  assert steps == sorted(set(steps)) and steps[0] >= 1, steps  # Each run went further.
  checkpoints = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert checkpoints == steps  # Every signal left the checkpoint of the step it stopped at.
  for r in reports:
    assert 0 < r['returned'] - r['signal'] < BOUND_S, reports
    assert not r['leftover'], r  # No checkpoint or other non-daemon thread keeps it alive.
    # The input thread is a daemon, stopped by close() without waiting for it: at most the run
    # just interrupted may still be winding one down, none of the earlier runs.
    assert r['inputs'] <= 1, reports
  assert exited - reports[-1]['signal'] < BOUND_S, (exited - reports[-1]['signal'], reports[-1])

"""A run that fails or stops before its first step leaves the workdir as it found it."""

import os
import signal
import types

import numpy as np
import pytest

from configs import synthetic
from unetpp_jax import train


def _config():
  config = synthetic.get_config()
  config.data.image_size = 32
  config.model.filters = (4, 8, 16, 32)
  return config


def _broken_input(config, start_step):
  del config, start_step
  raise FileNotFoundError('no data here')


def test_failed_data_preparation_leaves_no_debris(tmp_path):
  workdir = tmp_path / 'work'
  with pytest.raises(FileNotFoundError, match='no data here'):
    train.train_and_evaluate(_config(), workdir, input_fn=_broken_input)
  assert not workdir.exists()  # No config.json, events file or empty checkpoints/.

  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  with pytest.raises(FileNotFoundError, match='no data here'):
    train.train_and_evaluate(_config(), workdir, input_fn=_broken_input)
  assert sorted(p.name for p in workdir.iterdir()) == ['notes.txt']


def test_signal_while_preparing_data_stops_without_debris(tmp_path):
  def input_fn(config, start_step):
    del config, start_step
    os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the data is being prepared.
    batch = {'image': np.zeros((2, 4, 32, 32, 3), np.float32),
             'label': np.zeros((2, 4, 32, 32), np.int32)}
    return types.SimpleNamespace(train_iter=iter([batch]), eval_batches=[])

  workdir = tmp_path / 'work'
  with pytest.raises(train.Interrupted) as stopped:
    train.train_and_evaluate(_config(), workdir, input_fn=input_fn)
  assert stopped.value.step == 0 and stopped.value.exit_code == 143
  assert str(stopped.value) == ('SIGTERM received: stopped before the first step; nothing was '
                                'saved. Run the same command again to start.')
  assert not workdir.exists()

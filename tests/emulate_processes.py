"""One process that trains on exactly the global batches of an N-process job
(for test_multiprocess).

  python -m tests.emulate_processes WORKDIR NUM_PROCESSES --config.x=y ...

Each process of a real job reads its own shard; here the N per-process streams of
tfds_source.create_input (simulated with process_index/process_count) are stitched together
along the device axis, so device d of process p in the real job and device p * D + d here see the
same examples. Run it with N * D local devices.
"""

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unetpp_jax import train
from unetpp_jax.data import tfds_source
from unetpp_jax.data import contract, numpy_source

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')


def stitched_input_fn(num_processes):
  def input_fn(config, start_step):
    parts = [tfds_source.create_input(config, start_step=start_step, process_index=p,
                                         process_count=num_processes)
             for p in range(num_processes)]
    devices = jax.local_device_count()

    def stitch(batches):
      # Each part is [devices, b, ...] holding this process's examples in order: flatten, join
      # the processes in order, and spread the global batch over all local devices.
      flat = [{k: v.reshape((-1,) + v.shape[2:]) for k, v in b.items()} for b in batches]
      return {k: np.concatenate([f[k] for f in flat]).reshape((devices, -1) + flat[0][k].shape[1:])
              for k in flat[0]}

    def train_iter():
      while True:
        yield stitch([next(p.train_iter) for p in parts])

    eval_batches = [stitch(b) for b in zip(*(p.eval_batches for p in parts))]
    return contract.Input(train_iter(), eval_batches, parts[0].num_train, parts[0].num_eval)
  return input_fn


def main(argv):
  workdir, num_processes = argv[1], int(argv[2])
  train.train_and_evaluate(flags.FLAGS.config, workdir, stitched_input_fn(num_processes))


if __name__ == '__main__':
  app.run(main)

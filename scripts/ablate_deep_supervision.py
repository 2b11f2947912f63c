r"""Deep-supervision ablation and pruning study: U-Net, wide U-Net, U-Net++ with and without deep
supervision, and pruned U-Net++ L1..L, in one resumable command
(details: unetpp_jax/study/deep_supervision.py).

  .venv/bin/python scripts/ablate_deep_supervision.py --config=configs/dsb.py --workdir=workdirs/ablation \
      --data=../shared/data/dsb2018/stage1_train.zip [--arms=unet,unetpp_ds4] [--seeds=0,1,2] \
      [--config.num_train_steps=N ...]

Run the same command again after an interruption: finished arms are skipped and unfinished ones
continue from their checkpoints. SIGTERM/SIGINT save the running arm's checkpoint first.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Run as a file from a clone that is not pip-installed: the root holds unetpp_jax and configs.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unetpp_jax import runtime, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from unetpp_jax.study import deep_supervision  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Base config of every arm (e.g. configs/dsb.py).')
flags.DEFINE_string('workdir', None, 'Study folder: one workdir per arm and seed, and the results.')
flags.DEFINE_list('arms', None, 'Arms to run: unet, wide_unet, unetpp (no deep supervision), '
                  'unetpp_dsK (deep supervision of the last K heads); default all, K = 2..L.')
flags.DEFINE_list('seeds', None, 'Seeds; each arm runs once per seed (default: config.seed).')
flags.DEFINE_string('data', None, 'Kaggle-layout release (folder or zip) of the training data, for '
                    'the official DSB2018 score of the validation split; omit to skip it.')
flags.DEFINE_integer('bench_batch', 16, 'Batch at which inference images/s are measured.')
flags.DEFINE_integer('bench_steps', 10, 'Timed inference batches per pruning level.')
flags.DEFINE_integer('cpu_devices', None, 'XLA devices on the CPU backend (as in unetpp_jax.main).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  runtime.enable_compilation_cache()
  runtime.use_cpu_cores_as_devices(config.batch_size, config.eval_batch_size, FLAGS.bench_batch,
                                   devices=FLAGS.cpu_devices)
  try:
    deep_supervision.run_study(config, FLAGS.workdir, arms=FLAGS.arms,
                       seeds=[int(s) for s in FLAGS.seeds] if FLAGS.seeds else None,
                       data=FLAGS.data, bench_batch=FLAGS.bench_batch,
                       bench_steps=FLAGS.bench_steps)
  except train.Interrupted as e:
    logging.warning('Study interrupted; run the same command again to continue.')
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main)

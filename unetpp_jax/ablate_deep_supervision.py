r"""Deep-supervision ablation and pruning study: U-Net, wide U-Net, U-Net++ with and without deep
supervision, and pruned U-Net++ L1..L, in one resumable command
(details: unetpp_jax/study/deep_supervision.py).

  python -m unetpp_jax.ablate_deep_supervision --config=configs/dsb.py --workdir=workdirs/ablation \
      --data=../shared/data/dsb2018/stage1_train.zip [--arms=unet,unetpp_ds4] [--seeds=0,1,2] \
      [--config.num_train_steps=N ...]

Run the same command again after an interruption: finished arms are skipped and unfinished ones
continue from their checkpoints. SIGTERM/SIGINT save the running arm's checkpoint first.
"""

import sys

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from unetpp_jax import runtime, train
from unetpp_jax.study import deep_supervision
# pylint: enable=g-import-not-at-top,wrong-import-position

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
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = cli.loaded_config('config')
  runtime.prepare_training(config, FLAGS.bench_batch)
  try:
    deep_supervision.run_study(config, FLAGS.workdir, arms=FLAGS.arms,
                               seeds=[int(s) for s in FLAGS.seeds] if FLAGS.seeds else None,
                               data=FLAGS.data, bench_batch=FLAGS.bench_batch,
                               bench_steps=FLAGS.bench_steps)
  except train.Interrupted as e:
    logging.warning('Study interrupted; run the same command again to continue.')
    sys.exit(e.exit_code)


if __name__ == '__main__':
  cli.run(main)

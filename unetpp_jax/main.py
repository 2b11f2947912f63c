r"""Trains U-Net++: python -m unetpp_jax.main --config=configs/dsb.py [--workdir=DIR] [--config.x=y].

The workdir defaults to workdirs/<config file name>; running the same command again resumes from the
newest checkpoint there. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint at the end of the current
step and exits with code 128 + signal number (143 or 130). Resuming refuses a config that changes
the model, data or optimisation unless --allow_config_change.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unetpp_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Checkpoints and summaries; default workdirs/<config name>.')
config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/dsb.py).', lock_config=True)
flags.DEFINE_bool('allow_config_change', False,
                  'Resume even if the workdir\'s checkpoints were made with a config that differs '
                  'in fields that change the model, data or optimisation.')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('workdirs', name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']))
  logging.info('JAX process %d of %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Workdir: %s', workdir)
  try:
    train.train_and_evaluate(FLAGS.config, workdir, allow_config_change=FLAGS.allow_config_change)
  except train.Interrupted as e:  # Already logged, with how to continue.
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main)

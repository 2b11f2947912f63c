r"""Trains U-Net++: python -m unetpp_jax.main --config=FILE [--workdir=DIR] [--config.x=y].

The workdir defaults to workdirs/<config file name>; running the same command again resumes from the
newest checkpoint there. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint at the end of the current
step (the next log step, with several processes) and exits with code 128 + signal number (143 or
130). Resuming refuses a config that changes the model, data or optimisation unless
--allow_config_change. A user error (config file, flag value, invalid config, missing data) is one
line on stderr and exit code 1; --verbose shows the traceback.
"""

import gc
import os
import sys

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unetpp_jax import runtime
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Checkpoints and summaries; default workdirs/<config name>.')
config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/dsb.py).',
                                lock_config=True)
flags.DEFINE_bool('allow_config_change', False,
                  'Resume even if the workdir\'s checkpoints were made with a config that differs '
                  'in fields that change the model, data or optimisation.')
flags.DEFINE_string('compilation_cache', None,
                    'Persistent compilation cache directory; default $UNETPP_JAX_CACHE, else '
                    '~/.cache/unetpp_jax/jax. "none" disables it.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for a multi-process job (GPU clusters, local tests); '
                    'not needed on Cloud TPU VMs, SLURM or with $JAX_COORDINATOR_ADDRESS set.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config'])


def initialize_distributed() -> None:
  """Joins a multi-process job when there is one; a single process needs nothing."""
  if FLAGS.coordinator_address:
    # Cross-process collectives on the CPU backend (ignored by GPU and TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif runtime.cluster_environment():
    jax.distributed.initialize()


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('workdirs', name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = cli.loaded_config('config')
  runtime.prepare_training(config, compilation_cache=FLAGS.compilation_cache)
  from unetpp_jax import train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  initialize_distributed()
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']))
  logging.info('JAX process %d of %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Workdir: %s', workdir)
  try:
    train.train_and_evaluate(config, workdir, allow_config_change=FLAGS.allow_config_change)
  except train.Interrupted as e:  # Already logged, with how to continue.
    exit_code = e.exit_code
  else:
    return
  # The exception held the train loop's frames: free them (and the tf.data iterators they hold)
  # now, while Python can still run their finalizers; at interpreter shutdown TensorFlow logs a
  # spurious "Error occurred when finalizing GeneratorDataset iterator".
  gc.collect()
  sys.exit(exit_code)


if __name__ == '__main__':
  cli.run(main)

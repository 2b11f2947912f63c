r"""Throughput of the U-Net++ train step or inference on in-memory arrays (no tensorflow needed).

  python -m unetpp_jax.benchmark --config=configs/dsb.py [--batch=16] [--image_size=96] \
      [--dtype=float32|bfloat16] [--mode=train|infer|input|matmul|loop] [--prune_level=k] \
      [--steps=N] [--profile_dir=DIR] [--loop_source=arrays|config]

Prints one JSON line: images_per_sec, step_ms_median, step_ms_p90, compile_s, flops_per_image
(convolution and matmul FLOPs of the traced step, the same on every backend; xla_flops_per_image is
XLA's cost analysis of the lowered step, where the backend has one), achieved_gflops, peak_flops
(datasheet figure of the device kind; on CPU a measured matmul) and mfu, peak_memory_bytes, backend,
device_count, dtype, batch, ... `--mode=input` instead times the tf.data pipeline alone (decoded,
augmented, batched examples of config.data.dataset), to tell whether input keeps up with the step.
`--mode=loop` times the real train loop (train_and_evaluate) over --steps steps against the bare
step and prints loop_vs_step, the ratio of their rates.
"""

import json

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags
from ml_collections import config_flags

from unetpp_jax import runtime
from unetpp_jax.study import throughput
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/dsb.py).')
flags.DEFINE_integer('batch', 16, 'Global batch size.')
flags.DEFINE_integer('image_size', None, 'Square image size; default config.data.image_size.')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                  'Compute dtype; default config.model.dtype.')
flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'input', 'matmul', 'loop'],
                  'What to time; matmul: a 2048x2048 float32 matmul, the practical peak; loop: '
                  'the real train loop against the bare train step.')
flags.DEFINE_enum('loop_source', 'arrays', ['arrays', 'config'],
                  'Loop mode input: in-memory arrays, or the config\'s data pipeline.')
flags.DEFINE_integer('prune_level', None, 'Infer mode: run the network pruned to this level.')
flags.DEFINE_integer('steps', 20, 'Timed steps (after warm-up).')
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
flags.DEFINE_string('profile_dir', None,
                    'Also trace two steps into this folder (TensorBoard profile) and report the '
                    'XLA operations that took the most time as top_ops.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = cli.loaded_config('config')
  if FLAGS.mode == 'input' or (FLAGS.mode == 'loop' and FLAGS.loop_source == 'config'):
    cli.import_tensorflow_quietly()  # The config's data pipeline.
  runtime.use_cpu_cores_as_devices(FLAGS.batch, devices=runtime.CPU_DEVICES.value)
  if FLAGS.image_size:
    config.data.image_size = FLAGS.image_size
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  if FLAGS.mode == 'matmul':
    result = throughput.benchmark_matmul(size=2048, steps=FLAGS.steps, warmup=FLAGS.warmup)
  elif FLAGS.mode == 'loop':
    result = throughput.benchmark_loop(config, batch=FLAGS.batch, steps=FLAGS.steps,
                                       warmup=FLAGS.warmup, source=FLAGS.loop_source)
  elif FLAGS.mode == 'input':
    result = throughput.benchmark_input(config, batch=FLAGS.batch, steps=FLAGS.steps,
                                        warmup=FLAGS.warmup)
  else:
    result = throughput.benchmark_model(config, batch=FLAGS.batch, mode=FLAGS.mode,
                                        prune_level=FLAGS.prune_level, steps=FLAGS.steps,
                                        warmup=FLAGS.warmup, profile_dir=FLAGS.profile_dir)
  if FLAGS.mode in ('train', 'infer', 'loop'):
    if FLAGS.mode == 'loop':  # MFU of the loop, not of the bare step.
      result['achieved_gflops'] = result['flops_per_image'] * result['loop_images_per_sec'] / 1e9
    throughput.add_mfu(result, config.model.dtype)
  result.update(backend=jax.default_backend(), device_count=jax.device_count(),
                device_kind=jax.devices()[0].device_kind, dtype=config.model.dtype,
                batch=FLAGS.batch, image_size=config.data.image_size,
                filters=list(config.model.filters))
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)

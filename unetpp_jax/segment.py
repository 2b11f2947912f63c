r"""Segments your own microscopy images with a trained model: label images, overlays, measurements.

  python -m unetpp_jax.segment --workdir=W --input=FOLDER|GLOB|FILE[,...] --output=DIR \
      [--channel=C] [--label_format=tiff|png] [--overwrite] [--parquet]

The command line of `unetpp_jax.evaluation.segment` (which documents the image types, the mapping
of 16-bit images to 8 bits and the outputs; docs/segment.md). --input may be repeated or hold a
comma-separated list (a value that names an existing file or folder is taken whole). The
inference and instance flags (--strategy, --noflips, --threshold, ...) are
`unetpp_jax.inference_flags`, shared with `unetpp_jax.evaluate`, with the same defaults, so an
image gives the nuclei it gets in evaluation. Rerunning skips the images already segmented with the
same checkpoint and options. Files that cannot be read or used (e.g. a multi-channel image without
--channel) are skipped, the others segmented, and the command then lists them in a one-line
`error: ...` and exits with code 1; other user errors (a workdir without checkpoint, an input that
matches nothing) stop it with such a line; --verbose shows the traceback.
"""

import json

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from unetpp_jax import inference_flags
from unetpp_jax.evaluation import evaluate, segment
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('input', None, 'Images: a folder (its PNG, JPEG and TIFF files), a glob '
                          "pattern (quoted; '**' for subfolders) or files; repeat the flag or "
                          'separate them by commas.')
flags.DEFINE_string('output', None, 'Output folder (created; results already there are reused).')
flags.DEFINE_integer('channel', None, 'Channel (0-based) of multi-channel images to segment, as a '
                     'grey image; needed for images with 2 or more than 3 channels. Default: RGB '
                     'or grey.', lower_bound=0)
flags.DEFINE_enum('label_format', 'tiff', tuple(segment.LABEL_FORMATS), 'Label images as TIFF '
                  '(uint16; uint32 beyond 65,535 nuclei) or PNG (uint16).')
flags.DEFINE_bool('overwrite', False, 'Segment again images already segmented in --output with '
                  'the same checkpoint and options.')
flags.DEFINE_bool('parquet', False, 'Also write nuclei.parquet (needs pyarrow).')
flags.mark_flags_as_required(['input', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  inputs = segment.split_inputs(FLAGS.input)
  try:
    config = inference_flags.load_config()
    report = segment.segment(
        FLAGS.workdir, inputs, FLAGS.output, step=FLAGS.step, average=FLAGS.average,
        inference=inference_flags.inference_options(),
        instance_options=inference_flags.instance_options(config),
        channel=FLAGS.channel, label_format=FLAGS.label_format, overwrite=FLAGS.overwrite,
        parquet=FLAGS.parquet, config_defaults=evaluate.config_defaults())
  except OSError as e:  # Unreadable workdir files, an unwritable --output.
    raise cli.UserError(str(e)) from e
  print(json.dumps({k: report[k] for k in (
      'output', 'checkpoint_step', 'num_images', 'num_segmented', 'num_skipped', 'num_failed',
      'num_nuclei', 'seconds', 'images_per_second')}, indent=2))
  if report['failed']:
    raise cli.UserError(f'{report["num_failed"]} of {report["num_images"]} images could not be '
                        f'used and are not in the tables: {", ".join(report["failed"])} (reasons '
                        f'in the log and {FLAGS.output}/run.json); the others are segmented.')


if __name__ == '__main__':
  cli.run(main)

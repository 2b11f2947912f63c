r"""Evaluates a trained U-Net++ as the DSB2018 leaderboard does: full-size images, instances, score.

  python -m unetpp_jax.evaluate --workdir=W --data=PATH --output=DIR \
      [--solution=SOL.csv] [--split=all|train|validation] [--mode=accurate|fast] [--prune_level=k] \
      [--noflips] [--strategy=auto|resize|pad|tile] [--step=N]

The command line of `unetpp_jax.evaluation.evaluate` (which documents the strategies, predictions
and outputs); the inference and instance flags are `unetpp_jax.inference_flags`, shared with
`unetpp_jax.segment`. Fields missing from an older run's config take configs/dsb_paper.py's
values. A user error (a workdir without config or checkpoint, missing or damaged data, a bad
solution CSV) is one line on stderr, `error: ...`, and exit code 1; --verbose shows the traceback.
"""

import json

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from unetpp_jax import inference_flags
from unetpp_jax.evaluation import evaluate
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('data', None, 'Kaggle-layout folder or zip (<id>/images/<id>.png, '
                    'optional <id>/masks/*.png), e.g. stage1_train.zip.')
flags.DEFINE_string('output', None, 'Output folder (replaced once complete).')
flags.DEFINE_string('solution', None, 'Optional solution CSV (ImageId,EncodedPixels,Height,Width)'
                    ' with the labels; overrides the masks in --data.')
flags.DEFINE_enum('split', 'all', evaluate.SPLITS, "Images to use: all of --data, or only the "
                  "training run's train / validation split (validation: the ids the run recorded "
                  'in its workdir).')
flags.DEFINE_integer('num_overlays', 16, 'Images drawn with contours.')
flags.mark_flags_as_required(['data', 'output'])

SUMMARY_KEYS = ('iou', 'dice', 'iou_per_image', 'dice_per_image', 'score', 'ap50', 'f1_50')
PER_KIND_KEYS = ('num_images', 'score', 'ap50', 'iou_per_image')


def _rounded(value):
  """Floats of a (nested) report value to 4 decimals, for the printed summary."""
  if isinstance(value, float):
    return round(value, 4)
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    config = inference_flags.load_config()
    report = evaluate.evaluate(
        FLAGS.workdir, FLAGS.data, FLAGS.output, solution=FLAGS.solution, split=FLAGS.split,
        step=FLAGS.step, average=FLAGS.average, inference=inference_flags.inference_options(),
        instance_options=inference_flags.instance_options(config),
        num_overlays=FLAGS.num_overlays, config_defaults=evaluate.config_defaults())
  except OSError as e:  # Unreadable data or workdir files, an unwritable --output.
    raise cli.UserError(str(e)) from e
  summary = {name: {k: round(v[k], 4) for k in SUMMARY_KEYS}
             for name, v in report['predictions'].items()}
  if 'per_kind' in report:
    summary['per_kind'] = {kind: _rounded({k: v[k] for k in PER_KIND_KEYS})
                           for kind, v in report['per_kind'].items()}
  print(json.dumps({'output': FLAGS.output, 'checkpoint_step': report['checkpoint_step'],
                    'num_images': report['num_images'], 'seconds': report['seconds'],
                    **summary}, indent=2))


if __name__ == '__main__':
  cli.run(main)

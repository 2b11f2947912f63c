r"""Evaluates a trained U-Net++ as the DSB2018 leaderboard does: full-size images, instances, score.

  python -m unetpp_jax.evaluate --workdir=W --data=PATH --output=DIR \
      [--solution=SOL.csv] [--split=all|train|validation] [--mode=accurate|fast] [--prune_level=k] \
      [--noflips] [--strategy=auto|resize|pad|tile] [--step=N]

The command line of `unetpp_jax.evaluation.evaluate` (which documents the strategies, predictions
and outputs). Fields missing from an older run's config.json take configs/dsb_paper.py's values.
"""

import json
import sys

from absl import app, flags

from configs import dsb_paper as dsb
from unetpp_jax.evaluation import evaluate, instances, predict

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir: config.json and checkpoints/.')
flags.DEFINE_string('data', None, 'Kaggle-layout folder or zip (<id>/images/<id>.png, '
                    'optional <id>/masks/*.png), e.g. stage1_train.zip.')
flags.DEFINE_string('output', None, 'Output folder (replaced once complete).')
flags.DEFINE_string('solution', None, 'Optional solution CSV (ImageId,EncodedPixels,Height,Width)'
                    ' with the labels; overrides the masks in --data.')
flags.DEFINE_enum('split', 'all', evaluate.SPLITS, "Images to use: all of --data, or only the "
                  "training run's train / validation split (validation: the ids the run recorded "
                  'in its workdir).')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
flags.DEFINE_enum('strategy', 'auto', predict.STRATEGIES,
                  'Native-size inference (see unetpp_jax.evaluation.evaluate).')
flags.DEFINE_enum('mode', None, predict.MODES, 'Final prediction; default '
                  'config.predict.mode.')
flags.DEFINE_integer('prune_level', None, 'Network pruned to this level (heads 1..k); '
                     "default: config.predict.head for 'fast', the deepest supervised head "
                     "for 'accurate'.")
flags.DEFINE_bool('flips', True, 'Average the probabilities over 4 flips (test-time '
                  'augmentation; --noflips: off, 4x faster).')
flags.DEFINE_integer('tile_size', 256, "Tile size of --strategy=tile.")
flags.DEFINE_integer('tile_overlap', 64, 'Overlap of neighbouring tiles, in pixels.')
flags.DEFINE_integer('pad_multiple', 128, 'Images are padded to a multiple of this '
                     '(--strategy=pad).')
flags.DEFINE_integer('batch_size', 8, 'Inputs per network call (resize/tile strategies).')
flags.DEFINE_enum('instances', 'watershed', instances.METHODS, 'Split touching nuclei by '
                  'watershed, or plain connected components.')
flags.DEFINE_enum('seeds', 'auto', ('auto',) + instances.SEEDS, 'Watershed seeds; auto = '
                  "instances.default_options of the model's num_classes ('distance').")
flags.DEFINE_float('threshold', None, 'Foreground probability threshold; default: '
                   "instances.default_options of the model's num_classes (0.5; 0.6 for 3 classes).")
flags.DEFINE_float('seed_h', instances.InstanceOptions.seed_h, "Minimum dynamic (pixels) of a "
                   "'distance' seed.")
flags.DEFINE_integer('min_size', instances.InstanceOptions.min_size, 'Smallest nucleus kept, in '
                     'pixels.')
flags.DEFINE_float('marker_threshold', None, "'boundary' seeds: threshold of p(nucleus) for the "
                   'markers; default --threshold.')
flags.DEFINE_bool('fill_holes', instances.InstanceOptions.fill_holes, 'Fill holes of the '
                  'foreground mask before splitting it.')
flags.DEFINE_integer('num_overlays', 16, 'Images drawn with contours.')
flags.mark_flags_as_required(['workdir', 'data', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    defaults = dsb.get_config().to_dict()
    config = evaluate.load_config(FLAGS.workdir, defaults)
    default_options = instances.default_options(config.model.num_classes)
    seeds = default_options.seeds if FLAGS.seeds == 'auto' else FLAGS.seeds
    threshold = default_options.threshold if FLAGS.threshold is None else FLAGS.threshold
    report = evaluate.evaluate(
        FLAGS.workdir, FLAGS.data, FLAGS.output, solution=FLAGS.solution, split=FLAGS.split,
        step=FLAGS.step,
        inference=predict.InferenceOptions(
            strategy=FLAGS.strategy, mode=FLAGS.mode, prune_level=FLAGS.prune_level,
            flips=FLAGS.flips, tile_size=FLAGS.tile_size, tile_overlap=FLAGS.tile_overlap,
            pad_multiple=FLAGS.pad_multiple, batch_size=FLAGS.batch_size),
        instance_options=instances.InstanceOptions(
            threshold=threshold, method=FLAGS.instances, seeds=seeds, seed_h=FLAGS.seed_h,
            min_size=FLAGS.min_size, marker_threshold=FLAGS.marker_threshold,
            fill_holes=FLAGS.fill_holes),
        num_overlays=FLAGS.num_overlays, config_defaults=defaults)
  except (OSError, ValueError) as e:
    sys.exit(f'Error: {e}')
  summary = {name: {k: round(v[k], 4) for k in ('iou', 'dice', 'iou_per_image', 'dice_per_image',
                                                 'score', 'ap50', 'f1_50')}
             for name, v in report['predictions'].items()}
  print(json.dumps({'output': FLAGS.output, 'checkpoint_step': report['checkpoint_step'],
                    'num_images': report['num_images'], 'seconds': report['seconds'],
                    **summary}, indent=2))


if __name__ == '__main__':
  app.run(main)

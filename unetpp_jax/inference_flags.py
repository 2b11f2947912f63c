"""The flags that `python -m unetpp_jax.evaluate` and `python -m unetpp_jax.segment` share.

Which checkpoint (--workdir, --step), how the network runs on native-size images
(`InferenceOptions`) and how probabilities become nuclei (`InstanceOptions`) are defined here
once, so both commands predict the same way and take the same defaults: those of
`InferenceOptions` (test-time flips on) and `instances.default_options` of the model's label
scheme. Import after `cli.quiet_native_logs()` (this imports jax).
"""

import ml_collections
from absl import flags

from unetpp_jax.evaluation import evaluate, instances, predict
from unetpp_jax.label_scheme import LabelScheme

FLAGS = flags.FLAGS
_INFERENCE = predict.InferenceOptions()
_INSTANCES = instances.InstanceOptions

flags.DEFINE_string('workdir', None, 'Training workdir (--workdir of unetpp_jax.main): its '
                    'config and checkpoints.')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
flags.DEFINE_bool('average', True, 'Predict with the moving average of the weights where the '
                  'checkpoint holds one (optimizer.ema_decay); --noaverage: the trained weights.')
flags.DEFINE_enum('strategy', _INFERENCE.strategy, predict.STRATEGIES,
                  'Native-size inference (see unetpp_jax.evaluation.evaluate).')
flags.DEFINE_enum('mode', _INFERENCE.mode, predict.MODES, 'Final prediction; default '
                  'config.predict.mode.')
flags.DEFINE_integer('prune_level', _INFERENCE.prune_level, 'Network pruned to this level (heads '
                     "1..k); default: config.predict.head for 'fast', the deepest supervised head "
                     "for 'accurate'.")
flags.DEFINE_bool('flips', _INFERENCE.flips, 'Average the probabilities over 4 flips (test-time '
                  'augmentation; --noflips: off, 4x faster).')
flags.DEFINE_bool('transpose', _INFERENCE.transpose, 'Also average over the transposed image: '
                  'with --flips, the 8 symmetries of the square (flips x rot90; 2x the time).')
flags.DEFINE_list('scales', [str(s) for s in _INFERENCE.scales], 'Test-time scales: the '
                  'probabilities at each factor (e.g. 0.75,1,1.5), resized back and averaged; '
                  'each adds the time of one more pass at that size.')
flags.DEFINE_integer('tile_size', _INFERENCE.tile_size, 'Tile size of --strategy=tile.')
flags.DEFINE_integer('tile_overlap', _INFERENCE.tile_overlap, 'Overlap of neighbouring tiles, in '
                     'pixels.')
flags.DEFINE_integer('pad_multiple', _INFERENCE.pad_multiple, 'Images are padded to a multiple of '
                     'this (--strategy=pad).')
flags.DEFINE_integer('batch_size', _INFERENCE.batch_size, 'Inputs per network call (resize/tile '
                     'strategies).')
flags.DEFINE_enum('instances', _INSTANCES.method, instances.METHODS, 'Split touching nuclei by '
                  'watershed, or plain connected components.')
flags.DEFINE_enum('seeds', 'auto', ('auto',) + instances.SEEDS, 'Watershed seeds; auto = '
                  "instances.default_options of the model's label scheme ('distance').")
flags.DEFINE_float('threshold', None, 'Foreground probability threshold, for every image; '
                   "default: instances.default_options of the model's label scheme (0.5; for 3 "
                   'classes 0.7, and 0.6 on a bright background).')
flags.DEFINE_float('seed_h', None, "Minimum dynamic (pixels) of a 'distance' or 'interior' "
                   "seed, for every image; default: instances.default_options of the model's "
                   'label scheme (0.5; for 3 classes 1.5 on a bright background).')
flags.DEFINE_float('seed_h_per_radius', None, "'distance', 'interior' seeds: the dynamic is at "
                   "least this fraction of the image's median nucleus radius; default: "
                   "instances.default_options of the model's label scheme (0; 0.1 for 3 classes).")
flags.DEFINE_float('smooth', None, "'distance', 'interior' seeds: Gaussian sigma (pixels) of the "
                   'distance map before its seeds are found; default: '
                   "instances.default_options of the model's label scheme (1).")
flags.DEFINE_integer('min_size', None, 'Smallest nucleus kept, in pixels; default: '
                     "instances.default_options of the model's label scheme (15; 30 for 3 "
                     'classes).')
flags.DEFINE_float('min_confidence', None, 'Nuclei whose mean foreground probability is lower '
                   "are dropped; default: instances.default_options of the model's label scheme "
                   '(0; 0.8 for 3 classes).')
flags.DEFINE_float('marker_threshold', _INSTANCES.marker_threshold, "'boundary' seeds: threshold "
                   "of p(nucleus) for the markers, 'interior' seeds: for the interior; default "
                   '--threshold.')
flags.DEFINE_float('seed_threshold', _INSTANCES.seed_threshold, "'product' seeds: threshold of "
                   'p(foreground) * (1 - p(boundary)).')
flags.DEFINE_integer('min_seed_size', _INSTANCES.min_seed_size, "'product' seeds: smallest seed "
                     'kept, in pixels.')
flags.DEFINE_bool('fill_holes', _INSTANCES.fill_holes, 'Fill holes of the foreground mask before '
                  'splitting it.')
flags.mark_flag_as_required('workdir')


def load_config() -> ml_collections.ConfigDict:
  """The training config recorded in --workdir."""
  return evaluate.load_config(FLAGS.workdir, evaluate.config_defaults())


def inference_options() -> predict.InferenceOptions:
  return predict.InferenceOptions(
      strategy=FLAGS.strategy, mode=FLAGS.mode, prune_level=FLAGS.prune_level, flips=FLAGS.flips,
      transpose=FLAGS.transpose, scales=_factors('scales'), tile_size=FLAGS.tile_size,
      tile_overlap=FLAGS.tile_overlap, pad_multiple=FLAGS.pad_multiple, batch_size=FLAGS.batch_size)


def _factors(name: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in FLAGS[name].value)
  except ValueError as e:
    raise ValueError(f'--{name}={",".join(FLAGS[name].value)} must be numbers, e.g. '
                     '0.75,1,1.5.') from e


def instance_options(config: ml_collections.ConfigDict) -> instances.InstanceOptions:
  """The instance flags; 'auto' seeds and unset ones are `instances.default_options` of the
  config's label scheme."""
  return instances.default_options(
      LabelScheme.from_config(config), threshold=FLAGS.threshold, method=FLAGS.instances,
      seeds=FLAGS.seeds, seed_h=FLAGS.seed_h, seed_h_per_radius=FLAGS.seed_h_per_radius,
      smooth=FLAGS.smooth, min_size=FLAGS.min_size, min_confidence=FLAGS.min_confidence,
      marker_threshold=FLAGS.marker_threshold,
      seed_threshold=FLAGS.seed_threshold, min_seed_size=FLAGS.min_seed_size,
      fill_holes=FLAGS.fill_holes)

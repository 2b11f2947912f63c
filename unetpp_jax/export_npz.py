r"""Exports a dataset's training/validation splits, resized, to an .npz for numpy_pipeline.

  python -m unetpp_jax.export_npz --config=configs/dsb.py --output=/tmp/dsb96.npz
  python -m unetpp_jax.main --config=configs/dsb.py --config.data.source=npz:/tmp/dsb96.npz

The file holds un-augmented uint8 images [N, S, S, 3] and uint16 instance labels [N, S, S] at
config.data.image_size (image bilinear with antialiasing, label nearest), the ids, and the
image_size, dataset and val_fraction it was made with (numpy_pipeline checks them against its
config). Training then needs neither tensorflow nor TFDS.
"""

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from unetpp_jax import cli
from unetpp_jax import datasets
from unetpp_jax import input_pipeline
from unetpp_jax import numpy_pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Path of the .npz to write.', required=True)
flags.mark_flags_as_required(['config'])


def export(config: ml_collections.ConfigDict, output: str) -> numpy_pipeline.NpzData:
  """Reads both splits of config.data.dataset, resizes them and writes `output` atomically."""
  builder = datasets.load_builder(config)
  size = config.data.image_size
  train, val = (input_pipeline.preprocess(input_pipeline.read_encoded(builder, lo, hi),
                                          'resize', size)
                for lo, hi in input_pipeline.split_ranges(builder, config.data.val_fraction))
  data = numpy_pipeline.NpzData(train, val, size, config.data.dataset, config.data.val_fraction)
  numpy_pipeline.save_npz(output, data)
  return data


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  data = export(cli.loaded_config('config'), _OUTPUT.value)
  logging.info('Wrote %s: %d training and %d validation examples at %dx%d.', _OUTPUT.value,
               len(data.train), len(data.val), data.image_size, data.image_size)


if __name__ == '__main__':
  cli.run(main)  # User errors (missing data, bad config file) as one line.

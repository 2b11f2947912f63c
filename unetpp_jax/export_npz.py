r"""Exports a dataset's training/validation splits, resized, to an .npz for the numpy source.

  python -m unetpp_jax.export_npz --config=configs/dsb.py --output=/tmp/dsb96.npz
  python -m unetpp_jax.main --config=configs/dsb.py --config.data.source=npz:/tmp/dsb96.npz

The file holds un-augmented uint8 images [N, S, S, 3] and uint16 instance labels [N, S, S] at
config.data.image_size (image bilinear with antialiasing, label nearest), the ids, and the
image_size, dataset, val_fraction and split it was made with (the numpy source checks them against
its config). Training then needs neither tensorflow nor TFDS.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from unetpp_jax import cli
from unetpp_jax.data import tfds_source

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Path of the .npz to write.', required=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  data = tfds_source.export_npz(cli.loaded_config('config'), _OUTPUT.value)
  logging.info('Wrote %s: %d training and %d validation examples at %dx%d.', _OUTPUT.value,
               len(data.train), len(data.val), data.image_size, data.image_size)


if __name__ == '__main__':
  cli.run(main)  # User errors (missing data, bad config file) as one line.

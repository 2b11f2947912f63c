"""Nuclei datasets as TFDS builders: 'dsb2018' (real; configs 'dsb2018/original', the default,
and 'dsb2018/fixed', the corrected labels) and 'synthetic_nuclei' (offline).

Importing this package registers both builders with TFDS.
"""

import re

import jax
import ml_collections
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from unetpp_jax.data.builders import dsb2018
from unetpp_jax.data.builders import synthetic_nuclei
from unetpp_jax.data.builders.dsb2018 import Dsb2018
from unetpp_jax.data.builders.synthetic_nuclei import SyntheticNuclei

__all__ = ['Dsb2018', 'SyntheticNuclei', 'dsb2018', 'load_builder', 'synthetic_nuclei']


def load_builder(config: ml_collections.ConfigDict, *,
                 check_data_folder: bool = False) -> tfds.core.DatasetBuilder:
  """Returns the builder `config.data.dataset`, prepared (generated once per data_dir).

  Args:
    config: uses config.data.dataset (a TFDS name: 'dsb2018' = 'dsb2018/original',
      'dsb2018/fixed', 'synthetic_nuclei'), config.data.tfds_data_dir ('' = TFDS default) and
      config.data.manual_dir ('' = `dsb2018.default_manual_dir()`) and, for 'dsb2018',
      config.data.on_bad_example (applies when the data is prepared, see `dsb2018`).
    check_data_folder: a DSB2018 data folder named by data.manual_dir or $DSB2018_DIR that does
      not exist is an error even where the data is already prepared (training and export: the
      user names the folder now, and a mistyped one must not pass). Without it, prepared data
      needs no folder (a run's recorded config may name one moved away since).
  """
  kwargs = {'data_dir': config.data.tfds_data_dir or None}
  # 'dsb2018', 'dsb2018/fixed', 'dsb2018:1.0.0', ...: the builder's name, then config or version.
  is_dsb2018 = re.split('[/:]', config.data.dataset)[0] == dsb2018.Dsb2018.name
  if is_dsb2018:
    kwargs['on_bad_example'] = config.data.on_bad_example
  builder = tfds.builder(config.data.dataset, **kwargs)
  manual_dir = config.data.manual_dir or dsb2018.default_manual_dir()
  explicit = dsb2018.explicit_manual_dir(config.data.manual_dir)
  # (Prepared data needs no release. builder.is_prepared() would warn about a missing folder.)
  if (is_dsb2018 and explicit is not None
      and ((check_data_folder and not explicit.is_dir())
           or (dsb2018.find_release(explicit, builder.builder_config.name) is None
               and not (builder.data_path / 'dataset_info.json').exists()))):
    raise FileNotFoundError(dsb2018.release_not_found(explicit, builder.builder_config.name))
  # try_download_gcs=False: these datasets are not on TFDS's bucket, and asking it could hang
  # on a machine without internet.
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
  # Several hosts preparing one shared data_dir (e.g. on GCS) at once would race: process 0
  # prepares first; the others then find it prepared (or prepare their own local copy).
  if jax.process_index() == 0:
    builder.download_and_prepare(download_config=download_config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'prepared {config.data.dataset}')
    builder = tfds.builder(config.data.dataset, **kwargs)
    builder.download_and_prepare(download_config=download_config)
  return builder

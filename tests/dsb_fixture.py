"""Prepares the real DSB2018 builder once per test process, for any test that needs it.

Usage (in a test or fixture):  data_dir = dsb_fixture.prepared_dsb2018_data_dir()
It skips the calling test when the stage1_train release is absent. The release is looked up in
$DSB2018_DIR, else <repo>/../shared/data/dsb2018. The TFDS data_dir is $UNETPP_TEST_CACHE if set
(reused across sessions: TFDS only prepares once per data_dir), else a temporary folder removed
at exit.
"""

import atexit
import functools
import os
import pathlib
import shutil
import tempfile

import pytest
import tensorflow_datasets as tfds

from unetpp_jax.data.builders import dsb2018


def dsb2018_release() -> pathlib.Path | None:
  """The stage1_train release (zip or folder) the tests use, or None if absent."""
  return dsb2018.find_release(dsb2018.default_manual_dir())


@functools.cache
def _prepare() -> pathlib.Path:
  if os.environ.get('UNETPP_TEST_CACHE'):
    data_dir = pathlib.Path(os.environ['UNETPP_TEST_CACHE'])
  else:
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix='dsb2018_tfds_'))
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
  builder = tfds.builder('dsb2018', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(dsb2018.default_manual_dir()), try_download_gcs=False))
  return data_dir


def prepared_dsb2018_data_dir() -> pathlib.Path:
  """TFDS data_dir holding the prepared 'dsb2018' builder (prepared once per process)."""
  if dsb2018_release() is None:
    pytest.skip(f'DSB2018 stage1_train not found in {dsb2018.default_manual_dir()} '
                '(set $DSB2018_DIR to the folder holding stage1_train.zip).')
  return _prepare()

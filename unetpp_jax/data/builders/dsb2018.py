"""TFDS builder for the Data Science Bowl 2018 stage1_train release (BBBC038v1).

670 microscopy images (fluorescence and brightfield, 256x256 up to 1040x1388) with 29,461
hand-drawn nucleus masks, combined into one uint16 instance map per image (see `release`).

Bad examples (see `release`) raise or are skipped according to the builder's `on_bad_example`
('error' or 'skip'; config.data.on_bad_example through `builders.load_builder`). The policy applies
when the dataset is prepared: TFDS caches the prepared data in its data_dir and later runs reuse it
whatever their policy (a failed preparation leaves nothing behind, so rerunning with 'skip' works).
"""

import io
import os
import pathlib
import shutil
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from unetpp_jax.data.builders import features
from unetpp_jax.data import release

_LAYOUT = (
    'stage1_train.zip, or its unpacked stage1_train/ folder, or the <id>/ folders directly, where '
    'each <id>/ holds images/<id>.png and masks/*.png')

_CITATION = """
@article{caicedo2019nucleus,
  title={Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl},
  author={Caicedo, Juan C and Goodman, Allen and Karhohs, Kyle W and Cimini, Beth A and
          Ackerman, Jeanelle and Haghighi, Marzieh and Heng, CherKeng and Becker, Tim and
          Doan, Minh and McQuin, Claire and others},
  journal={Nature Methods},
  volume={16},
  pages={1247--1253},
  year={2019}
}
"""


def default_manual_dir() -> pathlib.Path:
  """$DSB2018_DIR if set, else <repo root>/../shared/data/dsb2018."""
  if os.environ.get('DSB2018_DIR'):
    return pathlib.Path(os.environ['DSB2018_DIR'])
  repo_root = pathlib.Path(__file__).resolve().parents[3]  # unetpp_jax/data/builders/ -> root
  return repo_root.parent / 'shared' / 'data' / 'dsb2018'


def explicit_manual_dir(manual_dir: str) -> pathlib.Path | None:
  """The folder the user named (`manual_dir`, else $DSB2018_DIR), or None for the default one.

  Only the default location falls back to a download: a folder the user named explicitly that
  holds no release is a mistake to report at once (offline, TFDS retries a download for minutes).
  """
  named = manual_dir or os.environ.get('DSB2018_DIR')
  return pathlib.Path(named) if named else None


def release_not_found(directory: str | os.PathLike[str]) -> str:
  """Why `directory` does not do as the manual dir, and what to put there."""
  directory = pathlib.Path(directory)
  problem = ('does not exist' if not directory.exists() else
             'is not a folder' if not directory.is_dir() else 'holds no DSB2018 release')
  return (f'The DSB2018 data folder {directory} {problem}: expected {_LAYOUT} (from '
          f'{release.DOWNLOAD_URL}, {release.RELEASE_SIZE:,} bytes). Fix --config.data.manual_dir '
          '(or $DSB2018_DIR), or leave both unset to read ../shared/data/dsb2018 beside the '
          'repository (the release is downloaded if it is not there).')


def find_release(directory: str | os.PathLike[str]) -> pathlib.Path | None:
  """The stage1_train release inside `directory` (zip or unpacked), or None if absent."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return None
  if (directory / 'stage1_train.zip').is_file():
    return directory / 'stage1_train.zip'
  if (directory / 'stage1_train').is_dir():
    return directory / 'stage1_train'
  if any((d / 'images').is_dir() for d in directory.iterdir() if d.is_dir()):
    return directory
  return None


class Dsb2018(tfds.core.GeneratorBasedBuilder):
  """DSB2018 stage1_train nuclei with instance labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stage1_train, instance maps (later mask wins).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the stage1_train release of the 2018 Data Science Bowl in the manual dir, as
  {_LAYOUT}. It is available from {release.DOWNLOAD_URL}
  (or from Kaggle's data-science-bowl-2018 competition). If the manual dir holds nothing, the
  builder downloads it from that URL.
  """

  def __init__(self, *, on_bad_example: str = 'error', **kwargs: Any):
    """See tfds.core.DatasetBuilder; on_bad_example is 'error' or 'skip' (see the module doc)."""
    super().__init__(**kwargs)
    if on_bad_example not in release.ON_BAD_EXAMPLE:
      raise ValueError(f'on_bad_example={on_bad_example!r} must be one of {release.ON_BAD_EXAMPLE}.')
    self._on_bad_example = on_bad_example
    self._original_state['on_bad_example'] = on_bad_example  # Restored when unpickled.

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.nuclei_features(),
        homepage='https://bbbc.broadinstitute.org/BBBC038',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # The public `dl_manager.manual_dir` raises when the folder is empty or missing, and we want
    # to fall back to downloading (and to name the folder if that fails too).
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    release_path = find_release(manual_dir) if manual_dir else None
    if release_path is None:
      logging.info('DSB2018 not found in the manual dir %s; downloading %s (TFDS retries for a '
                   'few minutes before giving up when offline).', manual_dir, release.DOWNLOAD_URL)
      try:
        release_path = dl_manager.download(release.DOWNLOAD_URL)
      except Exception as e:  # Any download failure: explain how to provide the data instead.
        _remove_partial_downloads(dl_manager.download_dir)
        raise FileNotFoundError(
            f'DSB2018 stage1_train not found in the manual dir {manual_dir} (expected {_LAYOUT}) '
            f'and downloading {release.DOWNLOAD_URL} failed ({type(e).__name__}: {e}). Download '
            'it elsewhere and put it in that folder, or point data.manual_dir / $DSB2018_DIR '
            'at a folder holding it.') from e
    return {'train': self._generate_examples(release_path)}

  def _generate_examples(self, release_path: pathlib.Path):
    # PNG-encoding in the reader's threads (TFDS would encode numpy arrays one at a time).
    for example in release.iter_examples(
        release_path, map_fn=_encode_pngs, on_bad_example=self._on_bad_example):
      yield example['id'], example


def _remove_partial_downloads(download_dir: os.PathLike[str]) -> None:
  """Removes what a failed download of the release left (TFDS keeps `<name>.tmp.<uuid>/`)."""
  for partial in pathlib.Path(download_dir).glob('*stage1_train*.tmp.*'):
    shutil.rmtree(partial, ignore_errors=True)


def _png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 RGB or uint16 single-channel array."""
  buffer = io.BytesIO()
  # Level 1 encodes ~3x faster than the default 6 for ~15% larger files.
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def _encode_pngs(example: dict[str, Any]) -> dict[str, Any]:
  return {'id': example['id'], 'image': _png(example['image']), 'label': _png(example['label'])}

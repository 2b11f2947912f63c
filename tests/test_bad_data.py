"""Odd and bad files in a Kaggle-layout release, each written as a real file (folder and zip).

Odd but valid files are read correctly; bad examples raise a ValueError naming the file with
on_bad_example='error' and are logged, counted and left out with 'skip'
(see unetpp_jax/data/release.py).
Also covered in test_datasets.py: RGBA, grayscale and 16-bit grayscale images, overlapping masks,
an image without a masks folder, stray files (.DS_Store, Thumbs.db, __MACOSX) and zips with and
without a top-level folder.
"""

import io
import logging
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from configs import dsb as dsb_config
from unetpp_jax.data import builders
from unetpp_jax.data import release
from test_datasets import _write  # pylint: disable=g-bad-import-order


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buffer, format='PNG')
  return buffer.getvalue()


def _png16(array: np.ndarray) -> bytes:
  """A 16-bit RGB ([H, W, 3]) or RGBA ([H, W, 4]) PNG, encoded by hand (Pillow cannot write one)."""
  height, width, channels = array.shape
  color_type = {3: 2, 4: 6}[channels]
  rows = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
          + chunk(b'IEND', b''))


def _mask(shape, box, value=255, dtype=np.uint8) -> np.ndarray:
  y0, x0, y1, x1 = box
  mask = np.zeros(shape, dtype)
  mask[y0:y1, x0:x1] = value
  return mask


def _display(path: pathlib.Path, name: str, as_zip: bool) -> str:
  """How the reader names `name` inside the release at `path` in messages."""
  return f'{path}:{name}' if as_zip else str(path / name)


both_layouts = pytest.mark.parametrize('as_zip', [True, False], ids=['zip', 'folder'])

# ---------------------------------------------------------------------------------------------
# Odd but valid files.


@both_layouts
def test_16bit_colour_palette_and_1bit_images_become_uint8_rgb(tmp_path, as_zip):
  rgb16 = np.array([[[0, 128 * 257, 65535], [256, 511, 65280]]], np.uint16)
  rgba16 = np.concatenate([rgb16, np.full((1, 2, 1), 65535, np.uint16)], axis=-1)
  colours = np.array([[[255, 0, 0], [0, 0, 255], [0, 0, 255]]], np.uint8)
  bits = np.array([[0, 255, 0]], np.uint8)
  files = {
      'rgb16/images/rgb16.png': _png16(rgb16),
      'rgba16/images/rgba16.png': _png16(rgba16),
      'palette/images/palette.png': _png(colours, mode='P'),
      'bits/images/bits.png': _png(bits, mode='1'),
      'la/images/la.png': _png(np.stack([bits, bits], axis=-1), mode='LA'),
  }
  path = _write(files, tmp_path / 'r', as_zip)
  examples = {e['id']: e['image'] for e in release.iter_examples(path)}
  # 16-bit colour keeps the high byte (v // 256): 0, 128, 255 | 1, 1, 255.
  expected16 = np.array([[[0, 128, 255], [1, 1, 255]]], np.uint8)
  np.testing.assert_array_equal(examples['rgb16'], expected16)
  np.testing.assert_array_equal(examples['rgba16'], expected16)
  np.testing.assert_array_equal(examples['palette'], colours)
  np.testing.assert_array_equal(examples['bits'], np.repeat(bits[..., None], 3, axis=-1))
  np.testing.assert_array_equal(examples['la'], np.repeat(bits[..., None], 3, axis=-1))
  assert all(image.dtype == np.uint8 and image.shape[-1] == 3 for image in examples.values())


@both_layouts
def test_any_nonzero_mask_value_is_foreground(tmp_path, as_zip):
  """Masks with 1, 128 or 254 instead of 255, a 16-bit mask, a 1-bit mask and an RGB mask."""
  shape = (6, 8)
  several = _mask(shape, (0, 0, 1, 3), value=1)
  several[0, 3] = 128
  several[0, 4] = 254
  rgb = np.zeros((*shape, 3), np.uint8)
  rgb[4, 0:2, 1] = 7  # Green only.
  files = {
      'x/images/x.png': _png(np.zeros(shape, np.uint8)),
      'x/masks/a_several_values.png': _png(several),
      'x/masks/b_16bit.png': _png(_mask(shape, (1, 0, 2, 8), value=1, dtype=np.uint16)),
      'x/masks/c_1bit.png': _png(_mask(shape, (2, 0, 3, 8)), mode='1'),
      'x/masks/d_rgb.png': _png(rgb),
  }
  [example] = release.iter_examples(_write(files, tmp_path / 'r', as_zip))
  expected = np.zeros(shape, np.uint16)
  expected[0, 0:5] = 1
  expected[1] = 2
  expected[2] = 3
  expected[4, 0:2] = 4
  np.testing.assert_array_equal(example['label'], expected)


# ---------------------------------------------------------------------------------------------
# Bad examples: rejected naming the file, or skipped and counted.

_GOOD = np.full((6, 8), 100, np.uint8)
_GOOD_PNG = _png(_GOOD)
_MASK_PNG = _png(_mask(_GOOD.shape, (1, 1, 3, 3)))


def _flip_one_byte_in_pixel_data(png: bytes) -> bytes:
  """The PNG with a byte of its compressed pixel data (IDAT) inverted."""
  data = bytearray(png)
  data[png.index(b'IDAT') + 6] ^= 0xFF
  return bytes(data)


# kind -> (files of the bad example, the name its error message must contain, folders skipped)
BAD_EXAMPLES = {
    'corrupt_image': ({'bad/images/bad.png': b'this is not a PNG file'}, 'bad/images/bad.png', 1),
    'truncated_image': ({'bad/images/bad.png': _GOOD_PNG[:len(_GOOD_PNG) // 2]},
                        'bad/images/bad.png', 1),
    'zero_byte_image': ({'bad/images/bad.png': b''}, 'bad/images/bad.png', 1),
    'zero_byte_mask': ({'bad/images/bad.png': _GOOD_PNG, 'bad/masks/m.png': b''},
                       'bad/masks/m.png', 1),
    'truncated_mask': ({'bad/images/bad.png': _GOOD_PNG, 'bad/masks/m.png': _MASK_PNG[:-20]},
                       'bad/masks/m.png', 1),
    'bit_flipped_mask': ({'bad/images/bad.png': _GOOD_PNG,
                          'bad/masks/m.png': _flip_one_byte_in_pixel_data(_MASK_PNG)},
                         'bad/masks/m.png', 1),
    'mask_size_differs': ({'bad/images/bad.png': _GOOD_PNG,
                           'bad/masks/m.png': _png(_mask((6, 9), (1, 1, 3, 3)))},
                          'bad/masks/m.png', 1),
    'masks_without_image': ({'bad/masks/m.png': _MASK_PNG}, 'bad has masks but no image', 1),
    'duplicate_id': ({'bad/images/bad.png': _GOOD_PNG, 'stage1_train/bad/images/bad.png':
                      _GOOD_PNG}, 'Image id bad occurs in more than one folder', 2),
}


def _release(tmp_path: pathlib.Path, kind: str, as_zip: bool) -> pathlib.Path:
  files = {
      'good1/images/good1.png': _GOOD_PNG, 'good1/masks/m.png': _MASK_PNG,
      'good2/images/good2.png': _GOOD_PNG,
      **BAD_EXAMPLES[kind][0],
  }
  return _write(files, tmp_path / 'release', as_zip)


@both_layouts
@pytest.mark.parametrize('kind', BAD_EXAMPLES)
def test_bad_example_is_rejected_naming_the_file(tmp_path, kind, as_zip):
  path = _release(tmp_path, kind, as_zip)
  _, name, _ = BAD_EXAMPLES[kind]
  named = _display(path, name, as_zip) if name.startswith('bad/') else name
  with pytest.raises(ValueError) as error:
    list(release.iter_examples(path))  # on_bad_example='error' is the default.
  assert named in str(error.value)
  assert "on_bad_example='skip'" in str(error.value)
  if kind == 'masks_without_image':
    assert _display(path, 'bad', as_zip) in str(error.value)


@both_layouts
@pytest.mark.parametrize('kind', BAD_EXAMPLES)
def test_bad_example_is_skipped_logged_and_counted(tmp_path, caplog, kind, as_zip):
  path = _release(tmp_path, kind, as_zip)
  _, name, skipped = BAD_EXAMPLES[kind]
  with caplog.at_level(logging.WARNING):
    examples = list(release.iter_examples(path, on_bad_example='skip'))
  assert [e['id'] for e in examples] == ['good1', 'good2']
  assert int(examples[0]['label'].max()) == 1
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum(name in w and 'Skipping a bad example' in w for w in warnings) == skipped
  assert f'Skipped {skipped} of {2 + skipped} examples in {path} as bad' in warnings[-1]
  if kind in ('masks_without_image', 'duplicate_id'):  # Bad folders, found without decoding.
    assert release.list_ids(path, on_bad_example='skip') == ['good1', 'good2']


def test_all_examples_bad_is_an_error_even_when_skipping(tmp_path):
  path = _write({'bad/images/bad.png': b''}, tmp_path / 'release', as_zip=True)
  with pytest.raises(ValueError, match=f'All 1 examples in {path} are bad'):
    list(release.iter_examples(path, on_bad_example='skip'))
  with pytest.raises(ValueError, match="on_bad_example='ignore' must be one of"):
    list(release.iter_examples(path, on_bad_example='ignore'))


def test_dsb2018_builder_follows_config_on_bad_example(tmp_path, caplog):
  """'error' fails preparation naming the file and leaves nothing; rerun with 'skip' prepares."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  zip_path = _write({
      'stage1_train/good1/images/good1.png': _GOOD_PNG,
      'stage1_train/good1/masks/m.png': _MASK_PNG,
      'stage1_train/good2/images/good2.png': _GOOD_PNG,
      'stage1_train/bad/images/bad.png': _GOOD_PNG[:30],
  }, manual / 'stage1_train', as_zip=True)
  config = dsb_config.get_config()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(manual)
  assert config.data.on_bad_example == 'error'  # The default.
  with pytest.raises(ValueError, match=f'{zip_path}:stage1_train/bad/images/bad.png'):
    builders.load_builder(config)
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))  # Nothing prepared.

  config.data.on_bad_example = 'skip'
  with caplog.at_level(logging.WARNING):
    builder = builders.load_builder(config)
  assert builder.info.splits['train'].num_examples == 2
  ids = sorted(e['id'].decode() for e in builder.as_dataset(split='train').as_numpy_iterator())
  assert ids == ['good1', 'good2']
  assert f'Skipped 1 of 3 examples in {zip_path} as bad' in caplog.text

"""Checks the prepared DSB2018 builder against the stage1_train zip, read independently with PIL.

Skipped when the release is absent (see dsb_fixture). Preparing takes about half a minute.
"""

import io
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import dsb_fixture


@pytest.fixture(scope='module')
def builder():
  return tfds.builder('dsb2018', data_dir=dsb_fixture.prepared_dsb2018_data_dir())


@pytest.fixture(scope='module')
def raw_examples(builder):
  """id -> (encoded image, encoded label) of every example, without decoding them."""
  ds = builder.as_dataset(
      split='train',
      decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()})
  return {ex['id'].decode(): (ex['image'], ex['label']) for ex in ds.as_numpy_iterator()}


def _zip_layout(path):
  """id -> (image member, sorted mask members), straight from the zip's names."""
  layout = {}
  with zipfile.ZipFile(path) as z:
    for name in z.namelist():
      parts = name.split('/')
      if len(parts) == 3 and parts[2].endswith('.png'):
        image, masks = layout.setdefault(parts[0], [None, []])
        if parts[1] == 'images':
          layout[parts[0]][0] = name
        else:
          masks.append(name)
  return {k: (image, sorted(masks)) for k, (image, masks) in layout.items()}


def test_counts_and_ids(builder, raw_examples):
  release = dsb_fixture.dsb2018_release()
  if release.suffix != '.zip':
    pytest.skip(f'{release} is unpacked; this test reads the zip.')
  assert builder.info.splits['train'].num_examples == 670
  layout = _zip_layout(release)
  assert sorted(raw_examples) == sorted(layout)
  assert sum(len(masks) for _, masks in layout.values()) == 29461


@pytest.mark.parametrize('pick', ['first', 'largest'])
def test_example_matches_zip(raw_examples, pick):
  release = dsb_fixture.dsb2018_release()
  if release.suffix != '.zip':
    pytest.skip(f'{release} is unpacked; this test reads the zip.')
  layout = _zip_layout(release)
  with zipfile.ZipFile(release) as z:
    if pick == 'first':
      image_id = sorted(layout)[0]
    else:  # The image with the most masks: many nuclei, and among the large images.
      image_id = max(sorted(layout), key=lambda k: len(layout[k][1]))
    image_name, mask_names = layout[image_id]
    png = np.asarray(Image.open(io.BytesIO(z.read(image_name))))
    expected = np.zeros(png.shape[:2], np.uint16)
    for k, name in enumerate(mask_names, start=1):
      expected[np.asarray(Image.open(io.BytesIO(z.read(name))).convert('L')) > 0] = k

  encoded_image, encoded_label = raw_examples[image_id]
  image = tf.io.decode_png(encoded_image, channels=3).numpy()
  label = tf.io.decode_png(encoded_label, dtype=tf.uint16).numpy()[..., 0]
  np.testing.assert_array_equal(image, png[..., :3])
  np.testing.assert_array_equal(label, expected)
  assert len(np.unique(label)) - 1 == len(mask_names)

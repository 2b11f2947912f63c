"""Segmenting one's own images: PNG, 16-bit and multi-channel TIFF, measurements, reruns, unreadable
files, and the same nuclei as evaluation for the same image and options."""

import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetpp_jax import train
from unetpp_jax.data import release
from unetpp_jax.data.builders import synthetic_nuclei
from unetpp_jax.evaluation import evaluate, instances, predict, rle, segment
from unetpp_jax.label_scheme import LabelScheme

import synthetic_release
import test_evaluate  # The tiny model and its in-memory training data.

REPO = pathlib.Path(__file__).resolve().parents[1]


def _raw16(grey8: np.ndarray) -> np.ndarray:
  """A 16-bit camera-like image of an 8-bit one: offset, 12-bit range."""
  return (grey8.astype(np.uint16) * 13 + 400).astype(np.uint16)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny trained workdir and a folder with an RGB PNG and a 16-bit grey TIFF of synthetic
  fluorescence nuclei, plus a multi-channel TIFF (nuclei in channel 2) elsewhere."""
  root = tmp_path_factory.mktemp('segment')
  # pylint: disable=protected-access
  config = test_evaluate._tiny_config(root / 'tfds')
  train.train_and_evaluate(config, root / 'work', input_fn=test_evaluate._input_fn)
  # pylint: enable=protected-access
  fluorescence = [i for i in range(40, 80)
                  if synthetic_nuclei.generate_example(i)['image'].mean() < 100][:2]
  png_index, tiff_index = fluorescence
  images = root / 'images'
  images.mkdir()
  Image.fromarray(synthetic_nuclei.generate_example(png_index)['image']).save(images / 'a.png')
  raw = _raw16(synthetic_nuclei.generate_example(tiff_index)['image'][..., 0])
  tifffile.imwrite(images / 'c.tif', raw)
  rng = np.random.default_rng(0)
  channels = rng.integers(0, 3000, size=(4, *raw.shape), dtype=np.uint16)
  channels[2] = raw
  (root / 'multi').mkdir()
  tifffile.imwrite(root / 'multi' / 'm.tif', channels, photometric='minisblack',
                   metadata={'axes': 'CYX'})
  return types.SimpleNamespace(root=root, workdir=root / 'work', config=config, images=images,
                               png_index=png_index, raw=raw)


def _run(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'unetpp_jax.segment', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _table(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _check_labels_and_measurements(labels, rows, summary, intensity):
  """Label image, nuclei.csv rows and summary.csv row of one image agree with direct measurement."""
  count = int(labels.max())
  assert labels.dtype == np.uint16 and count > 0
  assert sorted(np.unique(labels[labels > 0])) == list(range(1, count + 1))
  assert [int(r['label']) for r in rows] == list(range(1, count + 1))
  assert int(summary['num_nuclei']) == count
  assert (int(summary['height']), int(summary['width'])) == labels.shape
  areas = []
  for r in rows:
    mask = labels == int(r['label'])
    ys, xs = np.nonzero(mask)
    areas.append(mask.sum())
    assert int(r['area']) == mask.sum()
    assert float(r['centroid_y']) == pytest.approx(ys.mean())
    assert float(r['centroid_x']) == pytest.approx(xs.mean())
    assert [int(r[k]) for k in ('bbox_min_y', 'bbox_min_x', 'bbox_max_y', 'bbox_max_x')] == [
        ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
    assert float(r['equivalent_diameter']) == pytest.approx(np.sqrt(4 * mask.sum() / np.pi))
    assert float(r['mean_intensity']) == pytest.approx(intensity[mask].mean())
    assert float(r['max_intensity']) == pytest.approx(intensity[mask].max())
    assert 0 <= float(r['eccentricity']) < 1 and 0 < float(r['solidity']) <= 1
  assert float(summary['median_area']) == pytest.approx(np.median(areas))


def test_cli_png_and_16bit_tiff_unreadable_file_rerun_and_evaluate_equality(setup, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('a.png', 'c.tif'):
    (images / name).write_bytes((setup.images / name).read_bytes())
  (images / 'b.png').write_bytes((images / 'a.png').read_bytes()[:200])  # Cut short.
  out = tmp_path / 'out'
  result = _run(f'--workdir={setup.workdir}', f'--input={images}', f'--output={out}')
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and '1 of 3 images could not be used' in errors[0], result.stderr[-3000:]
  assert str(images / 'b.png') in errors[0] and 'Traceback' not in result.stderr
  run = json.loads((out / 'run.json').read_text())
  assert list(run['failed']) == [str(images / 'b.png')]
  assert run['num_segmented'] == 2 and run['checkpoint_step'] == 40
  assert run['weights'] == 'trained'
  assert run['inference']['flips'] and run['inference']['strategy'] == 'resize'
  assert run['instances'] == json.loads(json.dumps(
      dataclasses.asdict(instances.default_options(LabelScheme.from_config(setup.config)))))

  nuclei, summary = _table(out / 'nuclei.csv'), _table(out / 'summary.csv')
  assert [s['image'] for s in summary] == ['a', 'c']
  assert list(nuclei[0]) == list(segment.NUCLEUS_COLUMNS)
  label_a = tifffile.imread(out / 'labels' / 'a.tif')
  png = np.asarray(Image.open(images / 'a.png'), np.float64).mean(axis=-1)
  _check_labels_and_measurements(label_a, [r for r in nuclei if r['image'] == 'a'], summary[0], png)
  label_c = tifffile.imread(out / 'labels' / 'c.tif')
  # Intensities of the 16-bit image are its own values, not the 8-bit network input's.
  _check_labels_and_measurements(label_c, [r for r in nuclei if r['image'] == 'c'], summary[1],
                                 setup.raw)
  assert len(nuclei) == label_a.max() + label_c.max() == run['num_nuclei']
  overlay = np.asarray(Image.open(out / 'overlays' / 'a.png'))
  assert overlay.shape == (*label_a.shape, 3) and (overlay == (0, 255, 0)).all(-1).any()

  # Evaluation of the same PNG with the same (default) options finds the same nuclei.
  data = synthetic_release.write_zip(tmp_path / 'a.zip', [setup.png_index])
  evaluate.evaluate(setup.workdir, data, tmp_path / 'eval', inference=predict.InferenceOptions(),
                    num_overlays=0)
  (rows,) = rle.read_csv(tmp_path / 'eval' / 'submission.csv', require_shape=False).values()
  np.testing.assert_array_equal(rows.label_map('submission.csv', label_a.shape), label_a)

  # Rerun once the file is repaired: the two done images are skipped, the tables hold all three.
  mtime = (out / 'labels' / 'a.tif').stat().st_mtime_ns
  (images / 'b.png').write_bytes((images / 'a.png').read_bytes())
  result = _run(f'--workdir={setup.workdir}', f'--input={images}/*.png',
                f'--input={images / "c.tif"}', f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout)
  assert (printed['num_segmented'], printed['num_skipped'], printed['num_failed']) == (1, 2, 0)
  assert (out / 'labels' / 'a.tif').stat().st_mtime_ns == mtime
  assert [s['image'] for s in _table(out / 'summary.csv')] == ['a', 'b', 'c']
  np.testing.assert_array_equal(tifffile.imread(out / 'labels' / 'b.tif'), label_a)
  assert len(_table(out / 'nuclei.csv')) == 2 * label_a.max() + label_c.max()
  assert not [p for p in out.rglob('*') if '.tmp-' in p.name]


def test_multichannel_tiff_channel_choice(setup, tmp_path):
  """--channel picks the nuclei's channel: the nuclei of the grey TIFF of that channel. Without
  it the file is reported and skipped; other options segment it again."""
  multi = str(setup.root / 'multi' / 'm.tif')
  report = segment.segment(setup.workdir, [multi], tmp_path / 'none')
  assert report['num_failed'] == 1 and 'has 4 channels' in report['failed'][multi]
  assert _table(tmp_path / 'none' / 'summary.csv') == []

  out = tmp_path / 'out'
  inputs = [multi, str(setup.images / 'c.tif')]
  report = segment.segment(setup.workdir, inputs, out, channel=2, label_format='png',
                           parquet=True)
  assert report['num_segmented'] == 2 and not report['failed']
  labels = np.asarray(Image.open(out / 'labels' / 'm.png'))
  np.testing.assert_array_equal(labels, np.asarray(Image.open(out / 'labels' / 'c.png')))
  nuclei = _table(out / 'nuclei.csv')
  _check_labels_and_measurements(labels, [r for r in nuclei if r['image'] == 'm'],
                                 _table(out / 'summary.csv')[0], setup.raw)
  pyarrow_parquet = pytest.importorskip('pyarrow.parquet')
  table = pyarrow_parquet.read_table(out / 'nuclei.parquet')
  assert table.column_names == list(segment.NUCLEUS_COLUMNS) and table.num_rows == len(nuclei)
  none = segment.segment(setup.workdir, inputs, tmp_path / 'no_nuclei', channel=2, parquet=True,
                         instance_options=instances.InstanceOptions(min_size=10**6))
  assert none['num_segmented'] == 2 and not _table(tmp_path / 'no_nuclei' / 'nuclei.csv')
  assert (pyarrow_parquet.read_table(tmp_path / 'no_nuclei' / 'nuclei.parquet').schema.types
          == table.schema.types)  # Typed without values to infer them from.

  again = segment.segment(setup.workdir, inputs, out, channel=2, label_format='png')
  assert (again['num_segmented'], again['num_skipped']) == (0, 2)
  assert _table(out / 'nuclei.csv') == nuclei
  (out / 'labels' / 'c.png').unlink()  # An output deleted since: that image is done again.
  redone = segment.segment(setup.workdir, inputs, out, channel=2, label_format='png')
  assert (redone['num_segmented'], redone['num_skipped']) == (1, 1)
  assert (out / 'labels' / 'c.png').exists() and _table(out / 'nuclei.csv') == nuclei
  other = segment.segment(setup.workdir, inputs[1:], out, channel=2, label_format='png',
                          instance_options=instances.InstanceOptions(min_size=1000))
  assert (other['num_segmented'], other['num_nuclei']) == (1, 0)


def test_a_retrained_checkpoint_of_the_same_step_segments_again(setup, tmp_path):
  workdir = tmp_path / 'work'
  shutil.copytree(setup.workdir, workdir)
  inputs, out = [str(setup.images / 'c.tif')], tmp_path / 'out'
  assert segment.segment(workdir, inputs, out)['num_segmented'] == 1
  assert segment.segment(workdir, inputs, out)['num_skipped'] == 1
  # The run trained again from scratch to the same step: its checkpoint was saved later.
  metadata = workdir / 'checkpoints' / '40' / '_CHECKPOINT_METADATA'
  record = json.loads(metadata.read_text())
  record['init_timestamp_nsecs'] += 10**9
  metadata.write_text(json.dumps(record))
  again = segment.segment(workdir, inputs, out)
  assert (again['num_segmented'], again['num_skipped']) == (1, 0)
  assert again['checkpoint_saved_ns'] == record['init_timestamp_nsecs']


def test_input_values_split_on_commas_unless_they_name_a_file(tmp_path):
  named = tmp_path / 'day 1, well B2.tif'
  named.touch()
  assert segment.split_inputs([str(named), 'a.png,b/*.tif,', 'c.png']) == [
      str(named), 'a.png', 'b/*.tif', 'c.png']


def test_label_images_beyond_65535_nuclei_are_uint32_tiffs(tmp_path):
  labels = np.arange(70_000, dtype=np.int32).reshape(280, 250)
  segment._write_labels(tmp_path / 'slide.tif', labels)  # pylint: disable=protected-access
  written = tifffile.imread(tmp_path / 'slide.tif')
  assert written.dtype == np.uint32 and (written == labels).all()
  segment._write_labels(tmp_path / 'few.tif', labels[:2])  # pylint: disable=protected-access
  assert tifffile.imread(tmp_path / 'few.tif').dtype == np.uint16
  with pytest.raises(ValueError, match='69999 nuclei do not fit .* use --label_format=tiff'):
    segment._write_labels(tmp_path / 'slide.png', labels)  # pylint: disable=protected-access
  assert not (tmp_path / 'slide.png').exists()


def test_read_image_conversions(tmp_path, monkeypatch, caplog):
  rng = np.random.default_rng(1)
  rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  # Pillow's decompression-bomb limit, here 10 pixels, does not apply to the user's images.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10)
  image, intensity = segment.read_image(tmp_path / 'rgba.png')
  assert Image.MAX_IMAGE_PIXELS == 10
  monkeypatch.undo()
  # 8-bit images reach the network as evaluation's reader gives them.
  np.testing.assert_array_equal(
      image, release._to_rgb(Image.open(tmp_path / 'rgba.png')))  # pylint: disable=protected-access
  np.testing.assert_allclose(intensity, rgba[..., :3].mean(-1))

  grey16 = rng.integers(1000, 5000, size=(40, 50), dtype=np.uint16)
  Image.fromarray(grey16).save(tmp_path / 'grey16.png')
  image, intensity = segment.read_image(tmp_path / 'grey16.png')
  low, high = np.percentile(grey16.astype(np.float32), segment.PERCENTILES)
  expected = np.clip(np.round((grey16 - low) * (255 / (high - low))), 0, 255)
  np.testing.assert_allclose(image[..., 0], expected, atol=1)
  assert (image[..., 0] == image[..., 2]).all() and (intensity == grey16).all()

  # Sparse nuclei (0.06% of the pixels) stay above the noise, whose hot pixel sets nothing.
  rows, cols = np.mgrid[:512, :512]
  nuclei = np.zeros((512, 512), bool)
  for y, x in ((100, 100), (300, 400), (450, 60)):
    nuclei |= (rows - y) ** 2 + (cols - x) ** 2 <= 4 ** 2
  sparse = np.where(nuclei, 2000, rng.normal(100, 5, nuclei.shape)).astype(np.uint16)
  sparse[10, 10] = 60000
  image = segment.to_uint8(sparse)
  noise = ~nuclei
  noise[10, 10] = False
  assert image[nuclei].min() >= 250 and image[noise].max() < 40
  assert np.percentile(image[noise], 99.9) < 10  # The noise keeps a narrow range.

  tifffile.imwrite(tmp_path / 'rgb8.tif', rgba[..., :3])
  np.testing.assert_array_equal(segment.read_image(tmp_path / 'rgb8.tif')[0], rgba[..., :3])
  # Compressed as microscopes and OpenCV write them (LZW, JPEG: imagecodecs decodes them).
  Image.fromarray(rgba[..., :3]).save(tmp_path / 'lzw.tif', compression='tiff_lzw')
  np.testing.assert_array_equal(segment.read_image(tmp_path / 'lzw.tif')[0], rgba[..., :3])
  Image.fromarray(rgba[..., :3]).save(tmp_path / 'jpeg.tif', compression='jpeg', quality=95)
  assert np.abs(segment.read_image(tmp_path / 'jpeg.tif')[0] - rgba[..., :3].astype(float)
                ).mean() < 20
  # Three fluorescence channels (a Fiji composite, CYX) are stains, not colours: pick one.
  stains = rng.integers(0, 4000, size=(3, 20, 30), dtype=np.uint16)
  tifffile.imwrite(tmp_path / 'composite.tif', stains, imagej=True, metadata={'axes': 'CYX'})
  with pytest.raises(ValueError, match='has 3 channels that are not RGB colour: choose'):
    segment.read_image(tmp_path / 'composite.tif')
  assert (segment.read_image(tmp_path / 'composite.tif', channel=2)[1] == stains[2]).all()
  tifffile.imwrite(tmp_path / 'planar_rgb.tif', stains, photometric='rgb', planarconfig='separate')
  assert (segment.read_image(tmp_path / 'planar_rgb.tif')[1] == stains.mean(0)).all()
  # Alpha is dropped from TIFFs as from PNGs; other extra channels are not alpha.
  rgba16 = rng.integers(0, 4000, size=(20, 30, 4), dtype=np.uint16)
  tifffile.imwrite(tmp_path / 'rgba16.tif', rgba16, photometric='rgb', extrasamples=['unassalpha'])
  tifffile.imwrite(tmp_path / 'rgb16.tif', rgba16[..., :3], photometric='rgb')
  for a, b in zip(segment.read_image(tmp_path / 'rgba16.tif'),
                  segment.read_image(tmp_path / 'rgb16.tif')):
    np.testing.assert_array_equal(a, b)
  tifffile.imwrite(tmp_path / 'grey_alpha.tif', rgba16[..., 1:3], photometric='minisblack',
                   planarconfig='contig', extrasamples=['unassalpha'])
  image, intensity = segment.read_image(tmp_path / 'grey_alpha.tif')
  assert (intensity == rgba16[..., 1]).all() and (image[..., 0] == image[..., 1]).all()
  tifffile.imwrite(tmp_path / 'four.tif', rgba16, photometric='rgb', extrasamples=['unspecified'])
  with pytest.raises(ValueError, match='has 4 channels'):
    segment.read_image(tmp_path / 'four.tif')
  # Pillow reads 16-bit colour PNGs as their high bytes: refused rather than mis-read.
  (tmp_path / 'rgb16.png').write_bytes(_png16(rgba16[..., :3]))
  with pytest.raises(ValueError, match='16-bit colour PNG'):
    segment.read_image(tmp_path / 'rgb16.png')
  (tmp_path / 'cut.png').write_bytes((tmp_path / 'rgb16.png').read_bytes()[:20])
  with pytest.raises(ValueError, match=r'is a PNG cut short \(20 bytes\)'):
    segment.read_image(tmp_path / 'cut.png')
  # Pages without metadata (axes IYX) are channels; MINISWHITE is inverted, as viewers show it.
  tifffile.imwrite(tmp_path / 'pages.tif', stains, photometric='minisblack', metadata=None)
  assert tifffile.TiffFile(tmp_path / 'pages.tif').series[0].axes == 'IYX'
  with pytest.raises(ValueError, match=r'has 3 channels that are not RGB colour: choose'):
    segment.read_image(tmp_path / 'pages.tif')
  assert (segment.read_image(tmp_path / 'pages.tif', channel=1)[1] == stains[1]).all()
  tifffile.imwrite(tmp_path / 'white.tif', rgba[..., 0], photometric='miniswhite')
  np.testing.assert_array_equal(segment.read_image(tmp_path / 'white.tif')[0][..., 0],
                                255 - rgba[..., 0])
  with tifffile.TiffWriter(tmp_path / 'two.tif') as tif:  # Two positions, say: the first is read.
    tif.write(rgba[..., 0])
    tif.write(np.zeros((5, 5), np.uint8))
  np.testing.assert_array_equal(segment.read_image(tmp_path / 'two.tif')[1], rgba[..., 0])
  assert 'holds 2 image series' in caplog.text
  tifffile.imwrite(tmp_path / 'stack.tif', np.zeros((3, 8, 8, 2), np.uint16),
                   metadata={'axes': 'ZYXC'})
  for name, match in (('stack.tif', 'stack of axes'), ('empty.png', 'empty file'),
                      ('rgba.png', r'has 3 channels \(0..2\), not --channel=5')):
    (tmp_path / 'empty.png').touch()
    with pytest.raises(ValueError, match=match):
      segment.read_image(tmp_path / name, channel=5 if name == 'rgba.png' else None)


def _png16(rgb: np.ndarray) -> bytes:
  """A 16-bit RGB PNG of uint16 [H, W, 3] `rgb` (Pillow cannot write one)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in rgb)  # Filter 0 per row.
  header = struct.pack('>IIBBBBB', rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
          + chunk(b'IEND', b''))


def test_failures_after_reading_hidden_files_and_outputs_among_inputs(setup, tmp_path,
                                                                      monkeypatch):
  """An image that fails after it was read (in the network or after it) is listed and skipped and
  the others go on; an image whose outputs were being replaced when it failed is done again; the
  outputs and hidden files in an input folder are not inputs."""
  images = tmp_path / 'images'
  images.mkdir()
  a = np.asarray(Image.open(setup.images / 'a.png'))
  Image.fromarray(a).save(images / 'a.png')
  # 30x30, padded to 32x32: the one input of that shape (synthetic images are 96 to 160 wide).
  Image.fromarray(a[:30, :30]).save(images / 'b.png')
  Image.fromarray(a[::-1]).save(images / 'c.png')
  (images / '._a.png').write_bytes(b'\x00\x05\x16\x07')  # A macOS resource fork, not a PNG.
  out = images / 'out'  # Its PNG labels and overlays match the input pattern below.
  inputs = [f'{images}/**/*.png']
  pad = predict.InferenceOptions(strategy='pad', pad_multiple=32)
  run = predict.Predictor.run

  def failing_run(self, inputs):
    if inputs[0].shape[:2] == (32, 32):
      raise RuntimeError('out of memory')
    return run(self, inputs)
  monkeypatch.setattr(predict.Predictor, 'run', failing_run)
  report = segment.segment(setup.workdir, inputs, out, inference=pad, label_format='png')
  assert list(report['failed']) == [str(images / 'b.png')]
  assert 'RuntimeError: out of memory' in report['failed'][str(images / 'b.png')]
  assert (report['num_images'], report['num_segmented']) == (3, 2)
  assert [s['image'] for s in _table(out / 'summary.csv')] == ['a', 'c']
  monkeypatch.setattr(predict.Predictor, 'run', run)

  # Preparing an image fails while the one before it waits in the network's queue: the failure
  # is that image's, and the one before it is segmented.
  split = predict.Pad.split

  def failing_split(self, image):
    if image.shape[:2] == (30, 30):
      raise MemoryError('padding')
    return split(self, image)
  monkeypatch.setattr(predict.Pad, 'split', failing_split)
  prepared = segment.segment(setup.workdir, [str(images / f'{n}.png') for n in 'abc'],
                             tmp_path / 'prepared', inference=pad)
  assert list(prepared['failed']) == [str(images / 'b.png')]
  assert 'MemoryError: padding' in prepared['failed'][str(images / 'b.png')]
  assert [s['image'] for s in _table(tmp_path / 'prepared' / 'summary.csv')] == ['a', 'c']
  monkeypatch.setattr(predict.Pad, 'split', split)

  again = segment.segment(setup.workdir, inputs, out, inference=pad, label_format='png')
  assert (again['num_images'], again['num_segmented'], again['num_skipped']) == (3, 1, 2)
  assert not again['failed']
  labels_a = np.asarray(Image.open(out / 'labels' / 'a.png'))

  # Other options, and 'a' fails while its outputs are replaced: with the first options it is
  # segmented again rather than kept as done.
  measure = segment.measure_nuclei

  def failing_measure(name, labels, intensity):
    if name == 'a':
      raise ValueError('disk full')
    return measure(name, labels, intensity)
  monkeypatch.setattr(segment, 'measure_nuclei', failing_measure)
  other = segment.segment(setup.workdir, inputs, out, inference=pad, label_format='png',
                          instance_options=instances.InstanceOptions(min_size=1000))
  assert list(other['failed']) == [str(images / 'a.png')] and other['num_segmented'] == 2
  monkeypatch.setattr(segment, 'measure_nuclei', measure)
  last = segment.segment(setup.workdir, inputs, out, inference=pad, label_format='png')
  assert (last['num_segmented'], last['num_skipped']) == (3, 0)  # b and c had other options.
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'labels' / 'a.png')), labels_a)


def test_failure_in_the_size_normalisation_pass_is_that_images(setup, tmp_path, monkeypatch):
  """With size normalisation an image is prepared a second time after the next one was read: a
  failure there is still its own, and the images after it are segmented."""
  a = np.asarray(Image.open(setup.images / 'a.png'))
  for name, image in (('a', a), ('b', a[:30, :30]), ('c', a[::-1])):
    Image.fromarray(image).save(tmp_path / f'{name}.png')
  load_config = evaluate.load_config

  def normalised(*args, **kwargs):
    config = load_config(*args, **kwargs)
    config.data.nucleus_diameter = 20.0
    return config
  monkeypatch.setattr(evaluate, 'load_config', normalised)
  monkeypatch.setattr(predict.Predictor, 'magnification', lambda self, image, final: 2.0)
  split = predict.Pad.split

  def failing_split(self, image):
    if image.shape[:2] == (60, 60):  # b at twice its size: the second pass only.
      raise MemoryError('magnifying')
    return split(self, image)
  monkeypatch.setattr(predict.Pad, 'split', failing_split)
  report = segment.segment(setup.workdir, [str(tmp_path / f'{n}.png') for n in 'abc'],
                           tmp_path / 'out',
                           inference=predict.InferenceOptions(strategy='pad', pad_multiple=32))
  assert list(report['failed']) == [str(tmp_path / 'b.png')]
  assert 'MemoryError: magnifying' in report['failed'][str(tmp_path / 'b.png')]
  assert [s['image'] for s in _table(tmp_path / 'out' / 'summary.csv')] == ['a', 'c']


def test_bad_workdir_and_inputs(setup, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((setup.workdir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match=f'No checkpoint in {empty}/checkpoints'):
    segment.segment(empty, [str(setup.images)], tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='matches no PNG, JPEG or TIFF file'):
    segment.segment(setup.workdir, [str(tmp_path / '*.png')], tmp_path / 'out')
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'a.tif').touch()
  (tmp_path / 'x' / 'A.png').touch()
  with pytest.raises(ValueError, match='would both be written as [aA]: rename one'):
    segment.segment(setup.workdir, [str(tmp_path / 'x')], tmp_path / 'out')
  # Files of one name in different folders (a plate's wells) are named by their folders.
  plates = [tmp_path / 'plates' / p / 'A01.tif' for p in ('p1', 'p2')]
  assert segment.output_names([*plates, tmp_path / 'x' / 'a.tif']) == ['p1__A01', 'p2__A01', 'a']
  assert segment.output_names([tmp_path / 'A01.tif', plates[1]]) == ['A01', 'plates__p2__A01']
  with pytest.raises(ValueError, match='would both be written as p1__A01'):
    segment.output_names([*plates, tmp_path / 'x' / 'p1__A01.png'])
  result = _run(f'--workdir={setup.workdir}', f'--input={tmp_path}/nothing',
                f'--output={tmp_path / "out"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: --input={tmp_path}/nothing: no such file or folder.')
  assert 'Traceback' not in result.stderr


def test_bit_depth_check_finds_the_same_nuclei_in_16_bit_copies(setup, tmp_path):
  """scripts/bit_depth_check.py: 8-bit images and their 16-bit copies segmented and scored."""
  spec = importlib.util.spec_from_file_location('bit_depth_check',
                                                REPO / 'scripts' / 'bit_depth_check.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  fluorescence = [i for i in range(40, 80)
                  if synthetic_nuclei.generate_example(i)['image'].mean() < 100][:4]
  data = synthetic_release.write_zip(tmp_path / 'release.zip', fluorescence, prefix='')
  result = script.main([f'--workdir={setup.workdir}', f'--data={data}', '--per_kind=3',
                        f'--output={tmp_path / "out"}'])
  assert 0 < sum(result['images'].values()) <= 6
  png8, tif16 = result['official']['png8'], result['official']['tif16']
  assert png8.keys() == tif16.keys() and png8
  for kind, score in png8.items():
    assert score > 0.2 and abs(tif16[kind] - score) < 0.05, (kind, score, tif16[kind])
  assert len(list((tmp_path / 'out' / 'tif16').glob('*.tif'))) == sum(result['images'].values())

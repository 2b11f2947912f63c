r"""Segments the user's own microscopy images with a trained model, exactly as evaluation predicts.

The library behind `python -m unetpp_jax.segment` (flags there; docs/segment.md). Loads the
workdir's config and checkpoint (`predict.load_variables`), predicts every image with
`predict.Predictor` and turns the final prediction into nuclei with `instances.to_instances`: the
inference path of `evaluate`, with the same defaults as its command line.

Images: PNG and JPEG (read with Pillow), TIFF (tifffile); 8-bit, 16-bit, 32-bit or float; grey, RGB
(alpha is dropped) or multi-channel; not 16-bit colour PNGs, which Pillow reads as 8 bits (refused:
save them as TIFF). The network gets the uint8 RGB image evaluation gives it:
  * 8-bit images pass unchanged (grey replicated into RGB, alpha dropped, as `data.release` reads
    the DSB2018 PNGs), so the same PNG gives the same nuclei here and in `evaluate`;
  * other pixel types are mapped to 8 bits per image, linearly, so that the 0.1th and 99.9th
    percentiles of its pixels (all channels together) become 0 and 255, clipped (`to_uint8`);
  * `channel` picks one channel of every multi-channel image (RGB included) as a grey image, which
    images with 2 or more than 3 channels need; a grey image is used as it is.
Intensities in the nuclei table are the image's own values, before the mapping to 8 bits: the grey
value, the selected channel's, or the mean of R, G and B.

Outputs in `output`, each file written under a temporary name and renamed once complete:
  labels/<name>.tif|png  uint16 label image: 0 background, 1..N the nuclei (a TIFF's uint32
                         beyond 65,535 nuclei).
  overlays/<name>.png    the network's input with the nuclei's contours in green.
  nuclei.csv             one row per nucleus (NUCLEUS_COLUMNS; pixel units, bounding box maxima
                         exclusive), optionally also nuclei.parquet (needs pyarrow).
  summary.csv            one row per image (SUMMARY_COLUMNS).
  run.json               the workdir, checkpoint step, every option, and the files that failed.
  parts/<name>.csv|json  each image's rows of those tables. An image whose parts record the same
                         checkpoint (step, time saved), options and input file (size,
                         modification time) is not
                         segmented again unless `overwrite`; the tables are merged from the
                         parts, so a rerun's tables still hold every image.
<name> is the file name without its extension (`output_names`: with its folders where files in
different folders share it). Hidden files (names starting with '.') and the files under `output`
are not inputs. An image that cannot be read or segmented (say, more nuclei than a PNG label image
holds) is logged, left out of the tables and listed under 'failed' in run.json; the other images
go on.
"""

import csv
import dataclasses
import glob
import io
import json
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tifffile
from absl import logging
from PIL import Image
from skimage import measure

from unetpp_jax import atomic
from unetpp_jax.data import splits
from unetpp_jax.evaluation import evaluate, instances, predict
from unetpp_jax.workdir import Workdir

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
TIFF_SUFFIXES = ('.tif', '.tiff')
_ALPHA_SAMPLES = (1, 2)  # TIFF ExtraSamples: associated and unassociated alpha.
LABEL_FORMATS = {'tiff': '.tif', 'png': '.png'}
PERCENTILES = (0.1, 99.9)  # Of an image's pixels, mapped to 0 and 255 (see `to_uint8`).
INTENSITY_MAPPING = ('8-bit images unchanged; others linearly per image, the 0.1th percentile of '
                     'their pixels to 0 and the larger of the 99.9th and the brightest 2x2 block '
                     'to 255, clipped')

# Columns of nuclei.csv and the `skimage.measure.regionprops_table` properties they come from.
_PROPERTIES = {
    'label': 'label', 'area': 'area', 'centroid_y': 'centroid-0', 'centroid_x': 'centroid-1',
    'bbox_min_y': 'bbox-0', 'bbox_min_x': 'bbox-1', 'bbox_max_y': 'bbox-2', 'bbox_max_x': 'bbox-3',
    'equivalent_diameter': 'equivalent_diameter_area', 'eccentricity': 'eccentricity',
    'solidity': 'solidity', 'mean_intensity': 'intensity_mean', 'max_intensity': 'intensity_max',
}
NUCLEUS_COLUMNS = ('image', *_PROPERTIES)
# The regionprops names behind them ('centroid' gives 'centroid-0' and 'centroid-1').
_REGIONPROPS = tuple(dict.fromkeys(v.split('-')[0] for v in _PROPERTIES.values()))
SUMMARY_COLUMNS = ('image', 'file', 'height', 'width', 'num_nuclei', 'median_area',
                   'median_equivalent_diameter')


# ----------------------------------------------------------------------------------------------
# Inputs.


def split_inputs(values: Sequence[str]) -> list[str]:
  """The inputs of --input values, each one input or a comma-separated list; a value that names
  an existing file or folder is one input, commas in its name included."""
  return [item for value in values
          for item in ([value] if os.path.exists(os.path.expanduser(value)) else value.split(','))
          if item]


def find_images(inputs: Sequence[str], output: str | os.PathLike[str] | None = None
                ) -> list[pathlib.Path]:
  """The files that `inputs` name, in order and without repeats.

  Each input is a folder (its PNG, JPEG and TIFF files, not those of subfolders), a glob pattern
  (the matching images; '**' matches subfolders too) or a file (taken whatever its suffix). Folders
  and patterns leave out hidden files (such as the '._name' copies macOS leaves on shared drives)
  and, so that a rerun does not take its own label images and overlays as inputs, the files under
  `output`.
  """
  found = {}
  for spec in inputs:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      matches = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p, output))
    elif path.is_file():
      matches = [path]
    elif any(c in spec for c in '*?['):
      matches = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(p) and _is_image(pathlib.Path(p), output))
    else:
      raise FileNotFoundError(f'--input={spec}: no such file or folder.')
    if not matches:
      raise FileNotFoundError(f'--input={spec} matches no PNG, JPEG or TIFF file '
                              f'({", ".join(IMAGE_SUFFIXES)}).')
    for p in matches:
      found.setdefault(p.resolve(), p)
  return list(found.values())


def _is_image(path: pathlib.Path, output: str | os.PathLike[str] | None) -> bool:
  """Whether a file found in a folder or by a pattern is an input image."""
  if path.name.startswith('.') or path.suffix.lower() not in IMAGE_SUFFIXES:
    return False
  return output is None or not path.resolve().is_relative_to(pathlib.Path(output).resolve())


def output_names(paths: Sequence[pathlib.Path]) -> list[str]:
  """Each file's name in the outputs: its name without the suffix or, where files in different
  folders share that, its path from their common folder with '__' for '/' (plate1/A01.tif and
  plate2/A01.tif -> plate1__A01, plate2__A01). Refuses two alike, in case too (the same file on
  macOS and Windows)."""
  by_stem = {}
  for path in paths:
    by_stem.setdefault(path.stem.casefold(), []).append(path)
  names = {}
  for same in by_stem.values():
    root = os.path.commonpath([p.absolute().parent for p in same])
    for path in same:
      folders = path.absolute().parent.relative_to(root).parts if len(same) > 1 else ()
      names[path] = '__'.join((*folders, path.stem))
  seen = {}
  for path in paths:
    other = seen.setdefault(names[path].casefold(), path)
    if other != path:
      raise ValueError(f'{other} and {path} would both be written as {names[path]}: rename one, '
                       'or segment them into different --output folders.')
  return [names[p] for p in paths]


def read_image(path: str | os.PathLike[str], channel: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """(network input uint8 [H, W, 3], intensities [H, W] for the nuclei table) of an image file.

  Raises ValueError (or the decoder's error) for a file that cannot be used.
  """
  path = pathlib.Path(path)
  if path.stat().st_size == 0:
    raise ValueError('empty file')
  if path.suffix.lower() in TIFF_SUFFIXES:
    pixels, colour = _decode_tiff(path)
  else:
    pixels = _decode_pil(path)
    colour = pixels.ndim == 3  # Pillow's RGB.
  if pixels.size == 0:
    raise ValueError(f'no pixels (shape {pixels.shape})')
  if pixels.ndim == 3:
    count = pixels.shape[-1]
    if channel is not None:
      if not 0 <= channel < count:
        raise ValueError(f'has {count} channels (0..{count - 1}), not --channel={channel}')
      pixels = pixels[..., channel]
    elif count == 1:
      pixels = pixels[..., 0]
    elif count != 3 or not colour:
      kind = '' if count != 3 else ' that are not RGB colour'
      raise ValueError(f'has {count} channels{kind}: choose the nuclear stain with --channel '
                       f'(0..{count - 1})')
  intensity = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
  image = to_uint8(pixels)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image, intensity


def _decode_pil(path: pathlib.Path) -> np.ndarray:
  """[H, W] or [H, W, 3] pixels of a PNG or JPEG; 8-bit ones as `release` converts them to RGB."""
  with open(path, 'rb') as f:
    header = f.read(26)
  # A PNG's IHDR: bit depth at byte 24, colour type at 25 (2 RGB, 4 grey + alpha, 6 RGBA).
  if header[:8] == b'\x89PNG\r\n\x1a\n':
    if len(header) < 26:
      raise ValueError(f'is a PNG cut short ({len(header)} bytes)')
    if header[24] == 16 and header[25] in (2, 4, 6):
      raise ValueError('is a 16-bit colour PNG (RGB, RGBA or grey + alpha), of which Pillow reads '
                       'only the high bytes: save it as a TIFF')
  # Pillow refuses images over MAX_IMAGE_PIXELS (179 megapixels) as decompression bombs; a
  # slide scan the user names is not one (--strategy=tile bounds the network's memory).
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    with Image.open(path) as image:
      image.verify()  # Checks the PNG's CRCs and end: load() alone accepts a file cut short.
    with Image.open(path) as image:
      image.load()
      if image.mode in ('L', 'RGB', 'I', 'F') or image.mode.startswith('I;16'):
        return np.asarray(image)
      if image.mode == 'RGBA':
        return np.asarray(image)[..., :3]  # As image.convert('RGB').
      if image.mode in ('1', 'LA'):
        return np.asarray(image.convert('L'))
      return np.asarray(image.convert('RGB'))  # Palette, CMYK, YCbCr, ...
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def _decode_tiff(path: pathlib.Path) -> tuple[np.ndarray, bool]:
  """([H, W] or [H, W, C] pixels of a TIFF's first image series (axes of size 1 and alpha samples
  dropped; pages without metadata, axis I, as channels; MINISWHITE inverted, so that higher is
  brighter as in every other image), whether its channels are RGB colour rather than separate
  stains or planes)."""
  with tifffile.TiffFile(path) as tif:
    if len(tif.series) > 1:
      logging.warning('%s holds %d image series (positions or resolutions): reading the first.',
                      path, len(tif.series))
    series = tif.series[0]
    pixels, axes = series.asarray(), series.axes
    extra_samples = tif.pages[0].extrasamples
    photometric = tif.pages[0].photometric
  colour = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
  if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
    pixels = (~pixels if pixels.dtype == bool else np.iinfo(pixels.dtype).max - pixels
              if pixels.dtype.kind == 'u' else -pixels.astype(np.float32))
  alpha = sum(int(e) in _ALPHA_SAMPLES for e in extra_samples)
  if alpha and 'S' in axes and pixels.shape[axes.index('S')] > alpha:
    pixels = np.take(pixels, range(pixels.shape[axes.index('S')] - alpha), axis=axes.index('S'))
  keep = [i for i, (a, n) in enumerate(zip(axes, pixels.shape)) if n > 1 or a in 'YX']
  shape = tuple(pixels.shape[i] for i in keep)
  pixels, axes = pixels.reshape(shape), ''.join(axes[i] for i in keep)
  extra = axes.replace('Y', '').replace('X', '')
  if len(extra) > 1 or (extra and extra not in 'SCQI') or 'Y' not in axes or 'X' not in axes:
    raise ValueError(f'is a stack of axes {axes} and shape {shape}: give one 2-D image per file '
                     '(axes YX, or with channels YXS, CYX or pages IYX)')
  return (np.moveaxis(pixels, axes.index(extra), -1) if extra else pixels), colour


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """8-bit pixels unchanged; others mapped linearly, per image (all channels together): the
  PERCENTILES[0] of its pixels becomes 0, 255 the larger of PERCENTILES[1] and the brightest
  value that a 2 x 2 block of pixels holds throughout (clipped; a constant image becomes 0).

  The block keeps sparse nuclei from being clipped with the background noise (nuclei covering
  under 0.1% of the pixels put the 99.9th percentile in the noise) and a lone hot pixel from
  setting the range.
  """
  if pixels.dtype == np.uint8:
    return pixels
  if pixels.dtype == bool:
    return pixels.astype(np.uint8) * 255
  values = pixels.astype(np.float32)
  finite = np.isfinite(values)
  if not finite.any():
    raise ValueError('no finite pixel value')
  low, high = np.nanpercentile(np.where(finite, values, np.nan), PERCENTILES)
  if min(values.shape[:2]) > 1:
    lowest = np.where(finite, values, -np.inf)
    blocks = np.minimum(np.minimum(lowest[:-1, :-1], lowest[1:, :-1]),
                        np.minimum(lowest[:-1, 1:], lowest[1:, 1:]))
    high = max(high, float(blocks.max()))
  if not high > low:
    low, high = np.nanmin(values), np.nanmax(values)
  scale = 255 / (high - low) if high > low else 0.0
  scaled = np.nan_to_num((values - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Measurements and outputs.


def measure_nuclei(name: str, labels: np.ndarray, intensity: np.ndarray) -> list[list[Any]]:
  """Rows of nuclei.csv (NUCLEUS_COLUMNS) of one image's label map, in label order."""
  table = measure.regionprops_table(labels, intensity_image=intensity.astype(np.float64),
                                    properties=_REGIONPROPS)
  columns = [table[p] for p in _PROPERTIES.values()]
  integral = {'label', 'area', 'bbox_min_y', 'bbox_min_x', 'bbox_max_y', 'bbox_max_x'}
  kinds = [int if c in integral else float for c in _PROPERTIES]
  return [[name, *(kind(v) for kind, v in zip(kinds, values))] for values in zip(*columns)]


def _summary(name: str, path: pathlib.Path, labels: np.ndarray, rows: list[list[Any]]
             ) -> dict[str, Any]:
  area = [r[NUCLEUS_COLUMNS.index('area')] for r in rows]
  diameter = [r[NUCLEUS_COLUMNS.index('equivalent_diameter')] for r in rows]
  return {'image': name, 'file': str(path.resolve()), 'height': labels.shape[0],
          'width': labels.shape[1], 'num_nuclei': len(rows),
          'median_area': float(np.median(area)) if rows else None,
          'median_equivalent_diameter': float(np.median(diameter)) if rows else None}


def _write_text(path: pathlib.Path, text: str) -> None:
  atomic.write_atomically(path, text)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(['' if v is None else v for v in row] for row in rows)
  return buffer.getvalue()


def _write_labels(path: pathlib.Path, labels: np.ndarray) -> None:
  """uint16 labels; a TIFF's uint32 where the nuclei outnumber uint16 (a slide scan)."""
  wide = labels.max(initial=0) > np.iinfo(np.uint16).max
  if wide and path.suffix == '.png':
    raise ValueError(f'{labels.max()} nuclei do not fit in the 16-bit PNG label image {path}: '
                     'use --label_format=tiff.')
  labels = labels.astype(np.uint32 if wide else np.uint16)
  if path.suffix == '.png':
    atomic.write_via(path, lambda tmp: Image.fromarray(labels).save(tmp, format='PNG'))
  else:
    atomic.write_via(path, lambda tmp: tifffile.imwrite(tmp, labels, compression='zlib'))


def _source(path: pathlib.Path) -> dict[str, int]:
  """What identifies an input file's version: a changed file is segmented again."""
  stat = path.stat()
  return {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _record(output: pathlib.Path, name: str, path: pathlib.Path,
            settings: Mapping[str, Any]) -> dict[str, Any] | None:
  """The image's parts record if it holds this image segmented with these settings and its
  outputs are all there, else None."""
  try:
    record = json.loads((output / 'parts' / f'{name}.json').read_text())
    current = record['file'] == str(path.resolve()) and record['source'] == _source(path)
  except (OSError, ValueError, KeyError):
    return None
  outputs = (output / 'labels' / f'{name}{LABEL_FORMATS[settings["label_format"]]}',
             output / 'overlays' / f'{name}.png', output / 'parts' / f'{name}.csv')
  return (record if current and record['settings'] == settings and all(map(os.path.exists, outputs))
          else None)


# ----------------------------------------------------------------------------------------------
# The whole run.


class _Progress:
  """Logs images done, rate and ETA: after the first image, then every few seconds."""

  def __init__(self, total: int, every_s: float = 5.0):
    self.total, self.every_s = total, every_s
    self.segmented = self.failed = 0
    self.start = self.last = time.time()

  def update(self, failed: bool = False) -> None:
    self.failed += failed
    self.segmented += not failed
    now = time.time()
    finished = self.segmented + self.failed == self.total
    if self.segmented + self.failed > 1 and now - self.last < self.every_s and not finished:
      return
    self.last = now
    rate = self.segmented / (now - self.start)
    left = self.total - self.segmented - self.failed
    eta = f'{left / rate:.0f} s' if rate > 0 else '?'
    logging.info('%d/%d images segmented (%d failed), %.2f images/s, ETA %s.', self.segmented,
                 self.total, self.failed, rate, eta)


def segment(
    workdir: str | os.PathLike[str],
    inputs: Sequence[str],
    output: str | os.PathLike[str],
    *,
    step: int | None = None,
    average: bool = True,
    inference: predict.InferenceOptions = predict.InferenceOptions(),
    instance_options: instances.InstanceOptions | None = None,
    channel: int | None = None,
    label_format: str = 'tiff',
    overwrite: bool = False,
    parquet: bool = False,
    config_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Segments the images of `inputs` with the checkpoint of `workdir` into `output` (see module).

  Args:
    workdir: Training workdir (see `unetpp_jax.workdir`).
    inputs: Folders, glob patterns or files (`find_images`).
    output: Folder for the results (created; earlier results there are kept and reused).
    step: Checkpoint step; None = the newest.
    average: Predict with the moving average of the weights where the checkpoint holds one.
    inference: How the network runs on native-size images.
    instance_options: Probabilities -> nuclei; None = `instances.default_options` of the model's
      label scheme.
    channel: The channel of multi-channel images to segment (0-based); None: RGB or grey.
    label_format: 'tiff' or 'png' label images.
    overwrite: Segment again images whose results are already in `output`.
    parquet: Also write nuclei.parquet (needs pyarrow).
    config_defaults: Values of config fields missing from an older run's config.

  Returns:
    The contents of run.json; its 'failed' maps each unreadable file to the reason.

  Raises:
    FileNotFoundError, ValueError: a workdir without config or checkpoint, inputs that match no
      image, bad options.
  """
  start = time.time()
  if label_format not in LABEL_FORMATS:
    raise ValueError(f'--label_format must be one of {tuple(LABEL_FORMATS)}, got {label_format!r}.')
  if parquet:
    _pyarrow()
  config = evaluate.load_config(workdir, config_defaults)
  paths = find_images(inputs, output)
  names = output_names(paths)
  variables, step = predict.load_variables(workdir, config, step, average)
  predictor = predict.Predictor(config, variables, inference, final_only=True)
  if instance_options is None:
    instance_options = instances.default_options(predictor.scheme)
  settings = json.loads(json.dumps({
      'workdir': str(pathlib.Path(workdir).absolute()), 'checkpoint_step': step,
      'checkpoint_saved_ns': Workdir(workdir).saved_at(step),  # A retrained run's differs.
      'weights': predict.weights_name(workdir, step, average),
      'inference': {**dataclasses.asdict(inference), 'strategy': predictor.strategy,
                    'mode': predictor.mode, 'prune_level': predictor.level,
                    'final_heads': predictor.final_heads},
      'instances': dataclasses.asdict(instance_options), 'channel': channel,
      'label_format': label_format, 'intensity_to_uint8': INTENSITY_MAPPING}))

  output = pathlib.Path(output)
  for folder in ('labels', 'overlays', 'parts'):
    (output / folder).mkdir(parents=True, exist_ok=True)
  todo = [(path, name) for path, name in zip(paths, names)
          if overwrite or _record(output, name, path, settings) is None]
  logging.info('Segmenting %d images (%d of %d already done) with step %d of %s (%s, strategy %s) '
               'into %s.', len(todo), len(paths) - len(todo), len(paths), step, workdir,
               predictor.mode, predictor.strategy, output)
  progress = _Progress(len(todo))
  failed = {}

  def fail(path: pathlib.Path, error: Exception) -> None:
    failed[str(path)] = f'{type(error).__name__}: {error}'
    logging.warning('Skipping %s: %s.', path, failed[str(path)])
    progress.update(failed=True)

  def examples(queue: Sequence[tuple[pathlib.Path, str]], read: list[int]
               ) -> Iterator[dict[str, Any]]:
    for index, (path, name) in enumerate(queue):
      try:
        source = _source(path)  # The version read: a file replaced meanwhile is redone.
        image, intensity = read_image(path, channel)
      except Exception as e:  # pylint: disable=broad-except  # Any file the decoders refuse.
        fail(path, e)
        continue
      read.append(index)
      yield {'id': name, 'path': path, 'source': source, 'image': image, 'intensity': intensity}

  loop_start = time.time()
  queue = todo
  while queue:
    read, finished = [], 0  # Indices into queue of the images read; how many came back.
    try:
      for example, probs in predictor.predict(examples(queue, read)):
        finished += 1
        try:
          _segment_one(output, example, probs, predictor, instance_options, label_format,
                       settings)
        except Exception as e:  # pylint: disable=broad-except  # This image only.
          fail(example['path'], e)
          continue
        progress.update()
      queue = []
    except Exception as e:  # pylint: disable=broad-except  # One image failed.
      if finished == len(read):
        raise
      # Predictions come back in input order: the network failed on the first image read and not
      # returned, or preparing the image the error names failed. The others start again.
      prepare = isinstance(e, predict.PrepareError)
      culprit = (next(i for i in read if queue[i][1] == e.example['id']) if prepare
                 else read[finished])
      fail(queue[culprit][0], e.__cause__ if prepare else e)
      queue = [queue[i] for i in read[finished:] if i != culprit] + queue[read[-1] + 1:]
  loop_seconds = time.time() - loop_start

  records = [(name, _record(output, name, path, settings)) for path, name in zip(paths, names)
             if str(path) not in failed]
  records = [(name, r) for name, r in records if r is not None]
  num_nuclei = _write_tables(output, records, parquet)
  report = {
      **settings, 'inputs': list(inputs), 'output': str(output), 'num_images': len(paths),
      'num_segmented': progress.segmented,
      'num_skipped': len(paths) - len(todo), 'num_failed': len(failed), 'failed': failed,
      'num_nuclei': num_nuclei, 'overwrite': overwrite, 'parquet': parquet,
      'seconds': round(time.time() - start, 1),
      'images_per_second': round(progress.segmented / loop_seconds, 3) if progress.segmented
                           else None,
  }
  _write_text(output / 'run.json', json.dumps(report, indent=2) + '\n')
  return report


def _segment_one(output: pathlib.Path, example: Mapping[str, Any], probs: np.ndarray,
                 predictor: predict.Predictor, instance_options: instances.InstanceOptions,
                 label_format: str, settings: Mapping[str, Any]) -> None:
  """Writes one image's nuclei (labels, overlay, parts) from its probabilities [P, H, W, c]."""
  name, path = example['id'], example['path']
  # The record marks the image done: it goes first and comes back last, so that a stop in between
  # leaves the image to be segmented again rather than outputs of other settings kept.
  (output / 'parts' / f'{name}.json').unlink(missing_ok=True)
  options = instance_options.for_background(splits.bright_background(example['image']))
  labels = instances.to_instances(*predictor.scheme.split(probs[-1]), options)
  rows = measure_nuclei(name, labels, example['intensity'])
  _write_labels(output / 'labels' / f'{name}{LABEL_FORMATS[label_format]}', labels)
  picture = evaluate.overlay(example['image'], np.zeros_like(labels), labels)
  atomic.write_via(output / 'overlays' / f'{name}.png',
                   lambda tmp: Image.fromarray(picture).save(tmp, format='PNG'))
  _write_text(output / 'parts' / f'{name}.csv', _csv_text(NUCLEUS_COLUMNS, rows))
  record = {'file': str(path.resolve()), 'source': example['source'], 'settings': settings,
            'summary': _summary(name, path, labels, rows)}
  _write_text(output / 'parts' / f'{name}.json', json.dumps(record, indent=1) + '\n')


def _write_tables(output: pathlib.Path, records: Sequence[tuple[str, Mapping[str, Any]]],
                  parquet: bool) -> int:
  """nuclei.csv (and .parquet) and summary.csv of the images' parts; returns the nuclei count."""
  lines = []
  for name, _ in records:
    lines += (output / 'parts' / f'{name}.csv').read_text().splitlines(keepends=True)[1:]
  _write_text(output / 'nuclei.csv', _csv_text(NUCLEUS_COLUMNS, []) + ''.join(lines))
  summaries = [[r['summary'][c] for c in SUMMARY_COLUMNS] for _, r in records]
  _write_text(output / 'summary.csv', _csv_text(SUMMARY_COLUMNS, summaries))
  if parquet:
    pa, pa_csv, pq = _pyarrow()
    # Typed explicitly: a table without nuclei gives no values to infer them from.
    types = {c: pa.string() if c == 'image' else
             pa.int64() if c == 'label' or c.startswith('bbox') else pa.float64()
             for c in NUCLEUS_COLUMNS}
    table = pa_csv.read_csv(output / 'nuclei.csv',
                            convert_options=pa_csv.ConvertOptions(column_types=types))
    atomic.write_via(output / 'nuclei.parquet', lambda tmp: pq.write_table(table, tmp))
  return len(lines)


def _pyarrow() -> tuple[Any, Any, Any]:
  """pyarrow and its csv and parquet modules; a clear error where it is not installed."""
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    from pyarrow import csv as pa_csv  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    from pyarrow import parquet  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  except ImportError as e:
    raise ValueError('--parquet needs pyarrow (pip install pyarrow); nuclei.csv has the same '
                     'table.') from e
  return pyarrow, pa_csv, parquet

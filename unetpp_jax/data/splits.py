"""The validation split: kinds of image, mosaic groups, and a split by group stratified by kind.

DSB2018's stage1_train mixes kinds of image, and many of its images are tiles of one larger
original (mosaics: an original cut into 2, 4 or more tiles that continue each other across their
shared edges). A validation image whose sibling tiles were trained on promises more than images
the model has never seen, so the 'grouped' split keeps each mosaic whole, on one side, and gives
every kind of image about its share of the validation split or more.

Kinds (`image_kind`), from the image and its true labels:
  tissue                bright background (median grey > half of white), colour (stained tissue,
                        H&E-like purple/pink)
  brightfield           bright background, grey (R = G = B up to a mean deviation of 2 levels)
  fluorescence_crowded  dark background, at least 60 true nuclei
  fluorescence_sparse   dark background, fewer than 60 true nuclei
On stage1_train the two image statistics separate cleanly: medians are below 40 or above 128, and
colour images deviate from grey by 5 levels or more.

Mosaic tiles (`mosaic_groups`): tile A continues into tile B across A's right (bottom) edge when
their shared edge lengths are equal and the mean absolute difference between A's last column and
B's first is (a) about as small as between neighbouring columns inside the two images (at most
1.6 times), (b) clearly smaller than with any other candidate (at most 0.85 times the second best)
and (c) the edges are not flat (standard deviation over 2 grey levels: a black fluorescence border
would match any other). Matches are joined transitively into groups; a false match only makes a
group larger, which keeps the split honest.

The kinds and groups of a dataset are computed from the pixels once and cached (`describe`).
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from unetpp_jax import atomic

KINDS = ('fluorescence_sparse', 'fluorescence_crowded', 'tissue', 'brightfield')
BRIGHT_KINDS = ('tissue', 'brightfield')  # The kinds of `bright_background` images.
SPLITS = ('grouped', 'tail')  # config.data.split: see `split_ids` and the sources.

# Median grey (0 = black, 1 = white) above which an image's background is bright. The network's
# input norms (models.normalize_input) and the stain augmentation (contract.stain) use it too.
BRIGHT_MEDIAN = 0.5
GREY_DEVIATION = 2.0  # Mean |channel - grey| (levels) up to which an image counts as grey.
CROWDED_NUCLEI = 60  # True nuclei from which a fluorescence image counts as crowded.

# Mosaic edge matching (see the module docstring).
_MAX_EDGE_RATIO = 1.6
_MAX_SECOND_RATIO = 0.85
_MIN_EDGE_STD = 2.0

_CACHE_VERSION = 1  # Bump when kinds or groups are computed differently.


def bright_background(image: np.ndarray) -> bool:
  """Whether uint8 [H, W, 3] `image` has a bright background (stained tissue, brightfield)."""
  return float(np.median(image.mean(axis=-1))) > BRIGHT_MEDIAN * 255


def is_grey(image: np.ndarray, white: float = 255) -> bool:
  """Whether [..., 3] `image` is grey (brightfield, not a stained section): its channels within
  GREY_DEVIATION levels of their mean on average; `white` is the value of white in its units."""
  pixels = np.asarray(image, np.float32)
  deviation = float(np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).mean())
  return deviation <= GREY_DEVIATION * white / 255


def image_kind(image: np.ndarray, label: np.ndarray) -> str:
  """The kind (one of KINDS) of uint8 image [H, W, 3] with instance label map [H, W]."""
  if bright_background(image):
    return 'brightfield' if is_grey(image) else 'tissue'
  num_nuclei = len(np.unique(label[label > 0]))
  return 'fluorescence_crowded' if num_nuclei >= CROWDED_NUCLEI else 'fluorescence_sparse'


@dataclasses.dataclass(frozen=True)
class _Edges:
  """An image's outermost and next-to-outermost rows and columns, in grey levels."""
  right: tuple[np.ndarray, np.ndarray]
  left: tuple[np.ndarray, np.ndarray]
  bottom: tuple[np.ndarray, np.ndarray]
  top: tuple[np.ndarray, np.ndarray]

  @classmethod
  def of(cls, image: np.ndarray) -> '_Edges':
    g = image.astype(np.float32).mean(axis=-1)
    if min(g.shape) < 2:
      g = np.pad(g, ((0, max(0, 2 - g.shape[0])), (0, max(0, 2 - g.shape[1]))), mode='edge')
    return cls((g[:, -1], g[:, -2]), (g[:, 0], g[:, 1]), (g[-1], g[-2]), (g[0], g[1]))


def _edge_matches(first: list[tuple[np.ndarray, np.ndarray]],
                  second: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, int]]:
  """Pairs (a, b) whose edges first[a] and second[b] (equal lengths) continue each other."""
  a_edge = np.stack([e for e, _ in first])
  b_edge = np.stack([e for e, _ in second])
  a_inner = np.abs(a_edge - np.stack([i for _, i in first])).mean(axis=1)
  b_inner = np.abs(b_edge - np.stack([i for _, i in second])).mean(axis=1)
  n = len(first)
  distance = np.empty((n, n), np.float32)
  for lo in range(0, n, 64):  # Chunks bound the [64, n, L] temporary.
    distance[lo:lo + 64] = np.abs(a_edge[lo:lo + 64, None] - b_edge[None]).mean(axis=2)
  np.fill_diagonal(distance, np.inf)  # An image does not continue itself.
  textured = np.minimum(a_edge.std(axis=1)[:, None], b_edge.std(axis=1)[None]) > _MIN_EDGE_STD
  inner = (a_inner[:, None] + b_inner[None]) / 2
  close = distance <= _MAX_EDGE_RATIO * inner + 1e-3
  pairs = set()
  for matrix, transpose in ((distance, False), (distance.T, True)):  # Best b per a, a per b.
    order = np.argsort(matrix, axis=1)[:, :2]
    for row, (best, runner_up) in enumerate(order):
      if matrix[row, best] <= _MAX_SECOND_RATIO * matrix[row, runner_up]:
        a, b = (best, row) if transpose else (row, best)
        if textured[a, b] and close[a, b]:
          pairs.add((int(a), int(b)))
  return sorted(pairs)


def mosaic_groups(images: Mapping[str, np.ndarray]) -> dict[str, str]:
  """Maps every id of `images` (uint8 [H, W, 3]) to its mosaic group: the smallest id in it."""
  ids = sorted(images)
  parent = {i: i for i in ids}

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  edges = {i: _Edges.of(images[i]) for i in ids}
  for first, second, axis in (('right', 'left', 0), ('bottom', 'top', 1)):
    by_length = collections.defaultdict(list)
    for i in ids:
      by_length[images[i].shape[axis]].append(i)
    for members in by_length.values():
      if len(members) < 2:
        continue
      pairs = _edge_matches([getattr(edges[i], first) for i in members],
                            [getattr(edges[i], second) for i in members])
      for a, b in pairs:
        root_a, root_b = find(members[a]), find(members[b])
        parent[max(root_a, root_b)] = min(root_a, root_b)
  return {i: find(i) for i in ids}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the split needs to know of one image."""
  kind: str
  group: str  # Mosaic group: the smallest id among the tiles of its original.


def describe_examples(examples: Iterable[Mapping[str, Any]]) -> dict[str, ImageInfo]:
  """Kind and mosaic group of every example {'id', 'image', 'label'}."""
  kinds, images = {}, {}
  for example in examples:
    kinds[example['id']] = image_kind(example['image'], example['label'])
    images[example['id']] = example['image']
  groups = mosaic_groups(images)
  return {i: ImageInfo(kinds[i], groups[i]) for i in sorted(kinds)}


def cache_dir() -> pathlib.Path:
  """$UNETPP_JAX_SPLIT_CACHE, else ~/.cache/unetpp_jax/splits."""
  return pathlib.Path(os.environ.get('UNETPP_JAX_SPLIT_CACHE',
                                     pathlib.Path.home() / '.cache' / 'unetpp_jax' / 'splits'))


def describe(ids: Sequence[str], fingerprint: str,
             examples: Callable[[], Iterable[Mapping[str, Any]]]) -> dict[str, ImageInfo]:
  """`describe_examples(examples())`, cached under (ids, fingerprint).

  Args:
    ids: the ids `examples()` yields.
    fingerprint: what else identifies the pixels and labels behind those ids (the dataset's name
      and version, or the release's name and the size of its zip or its folder's files).
    examples: called only when the cache has no entry.
  """
  key = hashlib.sha256(json.dumps([_CACHE_VERSION, fingerprint, sorted(ids)]).encode()).hexdigest()
  path = cache_dir() / f'{key[:32]}.json'
  try:
    cached = json.loads(path.read_text())
    return {i: ImageInfo(**cached[i]) for i in ids}
  except (OSError, ValueError, KeyError, TypeError):
    pass  # Absent or unreadable: compute it again.
  info = describe_examples(examples())
  missing = sorted(set(ids) - set(info))
  if missing:
    raise ValueError(f'{len(missing)} id(s) were not among the examples, e.g. {missing[0]}.')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_atomically(path, json.dumps({i: dataclasses.asdict(v) for i, v in info.items()}))
  except OSError:
    pass  # A read-only home only costs the recomputation next time.
  return info


def _stable_key(text: str) -> int:
  return int(hashlib.md5(f'validation:{text}'.encode()).hexdigest(), 16)


def grouped_split(info: Mapping[str, ImageInfo], val_fraction: float
                  ) -> tuple[list[str], list[str]]:
  """(train ids, validation ids): whole mosaic groups, each kind about its share in validation.

  A group's kind is its most common one (in a tie, that of its first image in id order). For
  each kind, groups are taken into validation in a fixed pseudo-random order (the md5 of their
  id) until they hold ceil(val_fraction * the kind's images) images; as a group's images may
  include other kinds, a kind can end a little under its share (and another over); a group that
  would overshoot that target by more than half of itself is passed over for a smaller one. The
  result depends on the ids and pixels only (not on the seed, nor on the order of `info`), so
  runs with different seeds share their validation split.
  """
  members = collections.defaultdict(list)
  for image_id, item in sorted(info.items()):  # Independent of `info`'s order.
    members[item.group].append(image_id)
  by_kind = collections.defaultdict(list)
  for group, ids in members.items():
    kind = collections.Counter(info[i].kind for i in ids).most_common(1)[0][0]
    by_kind[kind].append(group)
  kind_sizes = collections.Counter(item.kind for item in info.values())
  validation = set()
  for kind, groups in by_kind.items():
    target = math.ceil(val_fraction * kind_sizes[kind]) if val_fraction > 0 else 0
    taken = 0
    for group in sorted(groups, key=_stable_key):
      if taken >= target:
        break
      size = len(members[group])
      if taken + size - target > size / 2 and taken > 0:
        continue
      validation.update(members[group])
      taken += size
  ids = sorted(info)
  return [i for i in ids if i not in validation], [i for i in ids if i in validation]


def kind_counts(ids: Iterable[str], info: Mapping[str, ImageInfo]) -> dict[str, int]:
  """Images of each kind (all KINDS, in order) among `ids`."""
  counts = collections.Counter(info[i].kind for i in ids)
  return {kind: counts[kind] for kind in KINDS}


def num_train_examples(num_examples: int, val_fraction: float) -> int:
  """Size of TFDS's 'train[:p%]' with p = round(100 * (1 - val_fraction)): the 'tail' split."""
  p = round(100 * (1 - val_fraction))
  return int(round(p * num_examples / 100))


@dataclasses.dataclass(frozen=True)
class Split:
  """A dataset's training and validation ids (each in the dataset's order) and, where computed,
  every image's kind and mosaic group."""
  train: list[str]
  val: list[str]
  info: dict[str, ImageInfo] | None


def oversampled(config: Any) -> bool:
  """Whether config.data.repeats repeats any kind of image."""
  repeats = config.data.get('repeats', None)
  return bool(repeats) and any(int(repeats.get(kind, 1)) != 1 for kind in KINDS)


def split_ids(config: Any, ordered_ids: Sequence[str], fingerprint: str,
              examples: Callable[[], Iterable[Mapping[str, Any]]]) -> Split:
  """The split config.data.split names, of `ordered_ids` (a dataset's ids in its stored order).

  'grouped': `grouped_split` (whole mosaics, stratified by kind); 'tail' (runs recorded before
  the grouped split existed): the last config.data.val_fraction of the stored order. Kinds and
  groups are computed (see `describe`) for 'grouped' and for oversampling (config.data.repeats).
  """
  mode = config.data.get('split', 'tail')
  if mode not in SPLITS:
    raise ValueError(f'config.data.split={mode!r} must be one of {SPLITS}.')
  info = None
  if mode == 'grouped' or oversampled(config):
    info = describe(ordered_ids, fingerprint, examples)
  if mode == 'tail':
    n = num_train_examples(len(ordered_ids), config.data.val_fraction)
    return Split(list(ordered_ids[:n]), list(ordered_ids[n:]), info)
  train_ids, val_ids = grouped_split(info, config.data.val_fraction)
  train, val = set(train_ids), set(val_ids)
  return Split([i for i in ordered_ids if i in train], [i for i in ordered_ids if i in val], info)


def train_repeats(config: Any, ids: Sequence[str], info: Mapping[str, ImageInfo] | None
                  ) -> tuple[int, ...]:
  """`contract.TrainSchedule.repeats` of training examples `ids`: config.data.repeats[kind]."""
  if not oversampled(config):
    return ()
  repeats = config.data.repeats
  return tuple(int(repeats.get(info[i].kind, 1)) for i in ids)

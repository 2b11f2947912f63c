"""The contract every input source keeps, and what the sources share.

`Input` is what a source returns to the train loop; `Examples`, `Layout` (how global batches split
over processes and devices), `TrainSchedule` (which example and which augmentation every step
uses), `EvalBatches` (padded validation batches) and the .npz format are shared by the sources in
this package. Nothing here may import tensorflow (directly or through another module).

Training order and augmentation are pure functions of (config.seed, position):
* Process p owns a contiguous shard of each split (`shard_range`). Its stream of training examples
  is a sequence of epochs, each a permutation of the shard seeded by (seed, p, epoch); step s uses
  stream positions [s * b, (s + 1) * b), b = per-process batch.
* The augmentation of an example is drawn from a generator seeded by (seed, global position),
  global position = s * batch_size + p * b + j, so no two slots of the global stream share one.
Resuming at any step is therefore exact and costs nothing: there is no state to replay.
"""

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color

from unetpp_jax import atomic
from unetpp_jax.data import splits

# Distinguishes the random streams derived from config.seed.
_PERMUTATION_STREAM = 1
_AUGMENT_STREAM = 2

# The elastic deformation (`crop`'s `warp`) is drawn at WARP_GRID x WARP_GRID control points spread
# over the window (32 pixels apart in a 128-pixel crop) and interpolated by cubic splines between
# them, as U-Net's authors deformed their tiles on a coarse grid.
WARP_GRID = 5
PREPROCESS_MODES = ('resize', 'crop')  # config.data.train_preprocess (see tfds_source).
# The orders of the colour channels `augment_params` draws from ('channels'); row 0 keeps them.
CHANNEL_ORDERS = np.array(list(itertools.permutations(range(3))), np.int32)
EXPORT_HINT = 'python -m unetpp_jax.export_npz --config=configs/dsb.py --output={path}'
# Colour deconvolution of optical density into (haematoxylin, eosin, DAB) densities and back, with
# Ruifrok & Johnston's stain vectors (skimage.color.rgb2hed); `stain` rescales the densities.
HED_FROM_RGB = np.asarray(color.hed_from_rgb, np.float32)
RGB_FROM_HED = np.asarray(color.rgb_from_hed, np.float32)
# The densities of `recolour`'s H&E drawings: nuclear and background haematoxylin, eosin outside
# nuclei, each uniform in its interval, set after the training sections' own densities
# (skimage.color.rgb2hed).
RECOLOUR_NUCLEUS = (0.8, 2.0)
RECOLOUR_BACKGROUND = (0.0, 0.4)
RECOLOUR_EOSIN = (0.0, 0.5)
# Size normalisation (config.data.nucleus_diameter) magnifies or shrinks by at most this factor:
# beyond it a mis-measured image (a few huge blobs, specks) would be blown up or lost.
MAX_SIZE_FACTOR = 3.0


@dataclasses.dataclass(frozen=True)
class Input:
  """The data of one training run, as seen by one process.

  Attributes:
    train_iter: infinite iterator; its batch k is global step start_step + k:
      {'image': float32 [D, B, S, S, 3] in [0, 1], 'label': int32 [D, B, S, S] instance ids}.
    eval_batches: re-iterable (each iter() is one full pass) validation batches
      {'image', 'label', 'weight': float32 [D, B_eval]}; weight 0 marks padding.
    num_train: training examples over all processes.
    num_eval: validation examples over all processes.
  """
  train_iter: Iterator[dict[str, np.ndarray]]
  eval_batches: 'EvalBatches'
  num_train: int
  num_eval: int


@dataclasses.dataclass(frozen=True)
class Examples:
  """Preprocessed examples in memory.

  Attributes:
    ids: str [N].
    images: uint8 [N, S, S, 3].
    labels: uint16 [N, S, S] instance ids.
  """
  ids: np.ndarray
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def slice(self, lo: int, hi: int) -> 'Examples':
    return Examples(self.ids[lo:hi], self.images[lo:hi], self.labels[lo:hi])


@dataclasses.dataclass(frozen=True)
class Layout:
  """How global batches split over processes and their local devices."""
  process_index: int
  process_count: int
  local_devices: int
  per_device_batch: int
  per_device_eval_batch: int

  @classmethod
  def create(
      cls, config: Any, process_index: int | None = None, process_count: int | None = None
  ) -> 'Layout':
    """Layout for `config` on this process (or on a simulated one, for tests)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
    local_devices = jax.local_device_count()
    devices = local_devices * process_count
    for name in ('batch_size', 'eval_batch_size'):
      size = config[name]
      if size <= 0 or size % devices:
        raise ValueError(
            f'config.{name}={size} must be a positive multiple of the number of devices '
            f'({process_count} process(es) x {local_devices} local device(s) = {devices}).')
    return cls(process_index, process_count, local_devices,
               config.batch_size // devices, config.eval_batch_size // devices)

  @property
  def per_process_batch(self) -> int:
    return self.local_devices * self.per_device_batch

  @property
  def per_process_eval_batch(self) -> int:
    return self.local_devices * self.per_device_eval_batch

  def shard(self, num_examples: int) -> tuple[int, int]:
    return shard_range(num_examples, self.process_index, self.process_count)

  def num_eval_batches(self, num_eval: int) -> int:
    """Eval batches per process: enough for the largest shard, so equal on every process."""
    largest_shard = -(-num_eval // self.process_count)
    return -(-largest_shard // self.per_process_eval_batch)


def shard_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[lo, hi) of the contiguous shard of process `process_index`; sizes differ by at most one."""
  return (num_examples * process_index // process_count,
          num_examples * (process_index + 1) // process_count)


def augment_params(
    seed: int, positions: np.ndarray, *, augment: bool, jitter: float,
    scale_range: tuple[float, float] = (1.0, 1.0), invert_prob: float = 0.0,
    grey_prob: float = 0.0, channel_shuffle: bool = False, stain_jitter: float = 0.0,
    recolour_prob: float = 0.0, touching_crop_prob: float = 0.0, max_rotation: float = 0.0,
    elastic: float = 0.0,
) -> dict[str, np.ndarray]:
  """Per-example augmentation parameters, each a pure function of (seed, global position).

  Every parameter is always drawn, so switching one augmentation on or off leaves the others
  unchanged.

  Args:
    seed: config.seed.
    positions: int [N] global stream positions.
    augment: whether to flip / rotate.
    jitter: photometric jitter strength s (0 = off).
    scale_range: (lo, hi) of the random zoom of native-resolution crops (log-uniform; (1, 1) =
      off).
    invert_prob: probability of inverting an image (x -> 1 - x).
    grey_prob: probability of replacing an image by its grey version.
    channel_shuffle: whether to permute the colour channels of every image at random.
    stain_jitter: strength t of the stain augmentation of bright-background images: haematoxylin
      and eosin densities each scaled by a factor log-uniform in [exp(-t), exp(t)] (0 = off).
    recolour_prob: probability of drawing a dark-background (fluorescence) image as an H&E
      section (`recolour`).
    touching_crop_prob: probability of centring a crop where nuclei touch (`crop`'s `pick`).
    max_rotation: the largest angle, in degrees, of a crop's rotation about its centre (`crop`'s
      `angle`; uniform in [-max_rotation, max_rotation], 0 = off).
    elastic: the standard deviation, in pixels of the crop, of the displacements of its elastic
      deformation at the control points (`crop`'s `warp`; 0 = off).

  Returns:
    Arrays [N]: 'flip_lr', 'flip_ud' (bool), 'rot90' (int32 quarter turns, counter-clockwise),
    'brightness' (added, in [-s, s]), 'contrast' (factor in [1-s, 1+s]), 'gamma' (exponent in
    [exp(-s), exp(s)]), 'crop_y', 'crop_x' (float32 in [0, 1): relative random-crop offsets),
    'zoom' (float32 in scale_range: magnification of the crop, see `crop`), 'channels' (int32
    row of CHANNEL_ORDERS; 0 = unchanged), 'grey', 'invert' (bool), 'haematoxylin', 'eosin'
    (float32 stain density factors, 1 = unchanged; see `colour`), 'recolour' (bool) and the
    densities of the H&E drawing, 'recolour_nucleus', 'recolour_background' (haematoxylin),
    'recolour_eosin' (float32; see `recolour`), 'touching_crop' (bool) and 'crop_pick' (float32
    in [0, 1): which pixel a touching crop is centred on; see `crop`), 'angle' (float32 degrees,
    counter-clockwise; see `crop`), 'warp' (float32 [N, WARP_GRID, WARP_GRID, 2]: the
    elastic displacements (dy, dx) in pixels of the crop; see `crop`).
  """
  # A generator's first k numbers do not depend on how many follow: adding 'zoom' (the 9th), the
  # colour parameters (10th to 12th), the stain factors (13th, 14th) and the recolouring (15th to
  # 18th), the touching crops (19th, 20th) and the rotation (21st) left the earlier parameters of
  # every position unchanged; the elastic displacements are drawn after them.
  rngs = [np.random.default_rng([seed, _AUGMENT_STREAM, int(p)]) for p in positions]
  u = np.array([rng.random(21) for rng in rngs], np.float64).reshape(-1, 21)
  normals = np.array([rng.standard_normal((WARP_GRID, WARP_GRID, 2)) for rng in rngs],
                     np.float64).reshape(-1, WARP_GRID, WARP_GRID, 2)
  lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
  symmetric = jitter * (2 * u[:, 3:6] - 1)  # U(-s, s)
  return {
      'flip_lr': (u[:, 0] < 0.5) & augment,
      'flip_ud': (u[:, 1] < 0.5) & augment,
      'rot90': (np.floor(u[:, 2] * 4).astype(np.int32) * augment).astype(np.int32),
      'brightness': symmetric[:, 0].astype(np.float32),
      'contrast': (1 + symmetric[:, 1]).astype(np.float32),
      'gamma': np.exp(symmetric[:, 2]).astype(np.float32),
      'crop_y': u[:, 6].astype(np.float32),
      'crop_x': u[:, 7].astype(np.float32),
      'zoom': np.exp(lo + (hi - lo) * u[:, 8]).astype(np.float32),
      'channels': (np.floor(u[:, 9] * len(CHANNEL_ORDERS)).astype(np.int32)
                   * channel_shuffle).astype(np.int32),
      'grey': u[:, 10] < grey_prob,
      'invert': u[:, 11] < invert_prob,
      'haematoxylin': np.exp(stain_jitter * (2 * u[:, 12] - 1)).astype(np.float32),
      'eosin': np.exp(stain_jitter * (2 * u[:, 13] - 1)).astype(np.float32),
      'recolour': u[:, 14] < recolour_prob,
      'recolour_nucleus': _lerp(RECOLOUR_NUCLEUS, u[:, 15]),
      'recolour_background': _lerp(RECOLOUR_BACKGROUND, u[:, 16]),
      'recolour_eosin': _lerp(RECOLOUR_EOSIN, u[:, 17]),
      'touching_crop': u[:, 18] < touching_crop_prob,
      'crop_pick': u[:, 19].astype(np.float32),
      'angle': (max_rotation * (2 * u[:, 20] - 1)).astype(np.float32),
      'warp': (elastic * normals).astype(np.float32),
  }


def _lerp(interval: tuple[float, float], u: np.ndarray) -> np.ndarray:
  """float32 values uniform in `interval` for uniforms `u` in [0, 1)."""
  return (interval[0] + (interval[1] - interval[0]) * u).astype(np.float32)


def recolour(image: np.ndarray, label: np.ndarray, nucleus: float, background: float,
             eosin: float) -> np.ndarray:
  """Dark-background (fluorescence) float32 [S, S, 3] `image` in [0, 1] drawn as an H&E section;
  a bright-background image is returned as it is.

  Stained tissue is the rarest kind of image in DSB2018 and the one the network finds hardest,
  while fluorescence images hold most of its labelled nuclei. Drawn as sections, they show the
  network many more nuclei on a bright background. The image's grey level, relative to the mean
  grey of its nuclei (`label` > 0; relative to white when it has none), sets the haematoxylin
  density between `background` (0) and `nucleus` (1; up to 1.5x that in brighter pixels); the
  eosin density is `eosin` outside nuclei and falls to 0 inside them. tfds_source.augment is its
  twin.
  """
  grey = (image[..., 0] + image[..., 1] + image[..., 2]) / np.float32(3)
  if np.median(grey) > splits.BRIGHT_MEDIAN:
    return image
  nuclei = label > 0
  # In float32 throughout, as the tf.data twin computes it.
  reference = (np.sum(grey, where=nuclei) / np.float32(np.sum(nuclei)) if nuclei.any()
               else np.float32(1))
  signal = np.minimum(grey / np.maximum(reference, np.float32(1 / 255)), np.float32(1.5))
  densities = np.stack([background + (nucleus - background) * signal,
                        eosin * np.maximum(1 - signal, 0), np.zeros_like(grey)], -1)
  return np.clip(np.exp(-(densities.astype(np.float32) @ RGB_FROM_HED)), 0, 1).astype(np.float32)


def stain(image: np.ndarray, haematoxylin: float, eosin: float) -> np.ndarray:
  """float32 [S, S, 3] `image` in [0, 1] with its haematoxylin and eosin densities scaled, if it has
  a bright background and colour; a dark-background (fluorescence) or grey (brightfield) image is
  returned as it is.

  H&E sections differ from lab to lab in how much of each stain they take up: deep purple nuclei in
  lilac cytoplasm, or pale nuclei beside pink stroma and red muscle. Rescaling the two densities
  shows the network both from the same labelled section. White stays white (density 0). A grey
  image holds no stains to tell apart: scaled, it would turn green or purple, as no brightfield
  image is. tfds_source.augment is its twin.
  """
  grey = (image[..., 0] + image[..., 1] + image[..., 2]) / np.float32(3)
  if ((haematoxylin == 1 and eosin == 1) or not np.median(grey) > splits.BRIGHT_MEDIAN
      or splits.is_grey(image, white=1)):
    return image
  densities = -np.log(np.maximum(image, np.float32(1 / 255))) @ HED_FROM_RGB
  densities = densities * np.array([haematoxylin, eosin, 1], np.float32)
  return np.clip(np.exp(-(densities @ RGB_FROM_HED)), 0, 1).astype(np.float32)


def colour(image: np.ndarray, channels: int, grey: bool, invert: bool,
           haematoxylin: float = 1.0, eosin: float = 1.0) -> np.ndarray:
  """The colour augmentation of float32 [S, S, 3] `image` in [0, 1], so that fluorescence,
  stained tissue and brightfield look alike to the network: stain densities scaled (`stain`),
  channels reordered by CHANNEL_ORDERS[channels], then (if grey) every channel replaced by the
  channels' mean, then (if invert) x -> 1 - x (dark nuclei on a bright background).
  tfds_source.augment is its twin."""
  image = stain(image, haematoxylin, eosin)[..., CHANNEL_ORDERS[channels]]
  if grey:
    mean = (image[..., 0] + image[..., 1] + image[..., 2]) / np.float32(3)
    image = np.repeat(mean[..., None], 3, axis=-1)
  if invert:
    image = np.float32(1) - image
  return image


def median_diameter(label: np.ndarray, min_size: int = 1) -> float:
  """The diameter (pixels) of a disk with the median area of the instances of at least min_size
  pixels in the instance map `label`; 0 without any."""
  areas = np.bincount(label.ravel())[1:]
  areas = areas[areas >= max(min_size, 1)]
  return float(2 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


def size_factor(diameter: float, nucleus_diameter: float) -> float:
  """The magnification that brings nuclei of median `diameter` to `nucleus_diameter` pixels
  (config.data.nucleus_diameter), within MAX_SIZE_FACTOR either way; 1 when either is 0 (off, or
  no nuclei to measure)."""
  if not diameter > 0 or not nucleus_diameter > 0:
    return 1.0
  return float(np.clip(nucleus_diameter / diameter, 1 / MAX_SIZE_FACTOR, MAX_SIZE_FACTOR))


def touching(label: np.ndarray) -> np.ndarray:
  """bool [H, W]: the nucleus pixels of instance map `label` beside (4-connected) a pixel of
  another nucleus, where touching nuclei must be told apart."""
  out = np.zeros(label.shape, bool)
  for axis in (0, 1):
    a, b = np.moveaxis(label, axis, 0)[:-1], np.moveaxis(label, axis, 0)[1:]
    edge = (a != b) & (a > 0) & (b > 0)
    np.moveaxis(out, axis, 0)[:-1] |= edge
    np.moveaxis(out, axis, 0)[1:] |= edge
  return out


def crop(image: np.ndarray, label: np.ndarray, size: int, fy: float, fx: float,
         zoom: float = 1.0, nucleus_diameter: float = 0.0, pick: float | None = None,
         angle: float = 0.0, warp: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A size x size training window of a native-resolution example, shared by every source.

  The window covers round(size / zoom) source pixels (zoom > 1 magnifies), at relative offsets
  fy, fx in [0, 1], and is resized to size (image bilinear, label nearest). An image smaller than
  the window is first reflect-padded at the bottom/right, its label with it (the mirrored nuclei
  are labelled like the ones they mirror), so that the window never sees an artificial border.
  With `nucleus_diameter` the zoom is also multiplied by the example's `size_factor` (measured
  on its whole label), so that its median nucleus is that many pixels across before the random
  zoom. With `pick` the window is instead centred (as far as the image allows) on a pixel where
  two nuclei touch (`touching`), or on any nucleus pixel if none touch: the pick-th of them in
  row-major order, as a fraction of their number. With `angle` the window is rotated about its
  centre (the image's content turns counter-clockwise by that many degrees) before it is resized;
  where its corners reach past the image, they see the image mirrored. With `warp` the window is
  then deformed elastically: each of its pixels shows the source a smooth random displacement away
  (the displacements at WARP_GRID x WARP_GRID control points, cubic splines between them), the
  image mirrored where that reaches past it.

  Args:
    image: uint8 [H, W, 3].
    label: uint16 [H, W] instance ids.
    size: output size S.
    fy, fx: relative offsets (`augment_params`' 'crop_y', 'crop_x'; 0.5, 0.5 is the centre).
    zoom: magnification (`augment_params`' 'zoom').
    nucleus_diameter: config.data.nucleus_diameter (0 = native scale).
    pick: `augment_params`' 'crop_pick' for a touching crop; None, or an image without nuclei:
      placed by fy, fx.
    angle: `augment_params`' 'angle' (degrees; 0 = unrotated).
    warp: `augment_params`' 'warp': [WARP_GRID, WARP_GRID, 2] displacements (dy, dx) in pixels of
      the crop at the control points, the first and last on the window's edges; None or zeros:
      undeformed.

  Returns:
    uint8 [S, S, 3] and uint16 [S, S].
  """
  if nucleus_diameter:
    zoom = float(zoom) * size_factor(median_diameter(label), nucleus_diameter)
  window = max(1, int(round(size / float(zoom))))
  height, width = max(image.shape[0], window), max(image.shape[1], window)
  pad = ((0, height - image.shape[0]), (0, width - image.shape[1]))
  if any(p for _, p in pad):
    # Mirrored with the edge row repeated ('symmetric'); every source's crops depend on it.
    image, label = np.pad(image, pad + ((0, 0),), mode='symmetric'), np.pad(label, pad,
                                                                              mode='symmetric')

  def offset(f, extent):
    return min(int(float(f) * (extent - window + 1)), extent - window)
  y, x = offset(fy, height), offset(fx, width)
  if pick is not None:
    targets = np.flatnonzero(touching(label))
    if not targets.size:
      targets = np.flatnonzero(label)
    if targets.size:
      cy, cx = divmod(int(targets[min(int(float(pick) * targets.size), targets.size - 1)]), width)
      y = int(np.clip(cy - window // 2, 0, height - window))
      x = int(np.clip(cx - window // 2, 0, width - window))
  displacements, margin = None, 0
  if warp is not None and np.any(warp):
    displacements = _displacements(np.asarray(warp, np.float64) * (window / size), window)
    margin = int(np.ceil(np.abs(displacements).max())) + 1
  if angle or margin:
    image, label = _mirrored_window(image, label, y, x, window, float(angle), margin)
  else:
    image, label = image[y:y + window, x:x + window], label[y:y + window, x:x + window]
  if margin:
    image, label = _warped(image, label, displacements, margin)
  if window != size:
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size),
                                                                           Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((size, size),
                                                                     Image.NEAREST))
  return np.ascontiguousarray(image, np.uint8), np.ascontiguousarray(label, np.uint16)


def _mirrored_window(image: np.ndarray, label: np.ndarray, y: int, x: int, window: int,
                     angle: float, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The window [y, y + window) x [x, x + window), grown by `margin` pixels on every side and
  rotated by `angle` degrees about its centre (image bilinear, label nearest), the image mirrored
  around it."""
  side = window + 2 * margin
  # A rotated square's corners reach at most (sqrt(2) - 1) / 2 of its side past its edges.
  reach = margin + (int(np.ceil(side * (np.sqrt(2) - 1) / 2)) + 1 if angle else 0)

  def mirrored(start, extent):  # Indices [start - reach, start + window + reach), 'symmetric'.
    i = np.mod(np.arange(start - reach, start + window + reach), 2 * extent)
    return np.where(i >= extent, 2 * extent - 1 - i, i).astype(np.intp)
  rows, cols = mirrored(y, image.shape[0]), mirrored(x, image.shape[1])
  image, label = image[np.ix_(rows, cols)], label[np.ix_(rows, cols)]
  if angle:
    image = Image.fromarray(np.ascontiguousarray(image)).rotate(angle, Image.BILINEAR)
    label = Image.fromarray(label.astype(np.int32)).rotate(angle, Image.NEAREST)
  inner = slice(reach - margin, reach - margin + side)
  return np.asarray(image)[inner, inner], np.asarray(label)[inner, inner]


def _displacements(warp: np.ndarray, window: int) -> np.ndarray:
  """float64 [window, window, 2]: the displacements `warp` [G, G, 2] at G x G control points
  (the first and last on the window's edges) interpolated by cubic splines to every pixel."""
  g = warp.shape[0]
  # The spline is linear in the values and separable: row r of `weights` holds how much each
  # control point's value counts at pixel r along one axis.
  t = np.linspace(0, g - 1, window)
  weights = np.stack([ndimage.map_coordinates(basis, [t], order=3, mode='nearest')
                      for basis in np.eye(g)], -1)
  return np.stack([weights @ warp[..., c] @ weights.T for c in range(2)], -1)


def _warped(image: np.ndarray, label: np.ndarray, displacements: np.ndarray, margin: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """The inner window of `image`, `label` (grown by `margin` on every side): pixel (i, j) shows
  the grown window at (i, j) + `displacements`[i, j] (image bilinear, label nearest)."""
  window = displacements.shape[0]
  grid = np.mgrid[:window, :window].astype(np.float64) + margin
  points = grid + np.moveaxis(displacements, -1, 0)
  channels = [ndimage.map_coordinates(image[..., c].astype(np.float32), points, order=1)
              for c in range(image.shape[-1])]
  image = np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)
  return image, ndimage.map_coordinates(label, points, order=0)


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
  """Which example (in this process's shard) and which augmentation each step uses."""
  num_examples: int  # In this process's shard.
  seed: int
  batch_size: int  # Global.
  layout: Layout
  augment: bool
  jitter: float
  scale_range: tuple[float, float] = (1.0, 1.0)
  # How often each example of the shard occurs in one epoch (oversampling of rare kinds of
  # image); () = once each.
  repeats: tuple[int, ...] = ()
  invert_prob: float = 0.0
  grey_prob: float = 0.0
  channel_shuffle: bool = False
  stain_jitter: float = 0.0
  recolour_prob: float = 0.0
  touching_crop_prob: float = 0.0
  max_rotation: float = 0.0
  elastic: float = 0.0

  @classmethod
  def from_config(cls, config: Any, num_examples: int, layout: Layout,
                  repeats: tuple[int, ...] = ()) -> 'TrainSchedule':
    """The schedule of a shard of `num_examples` under `config`'s seed, batch and config.data."""
    data = config.data
    return cls(num_examples, config.seed, config.batch_size, layout, data.augment, data.jitter,
               tuple(data.scale_range), repeats, data.invert_prob, data.grey_prob,
               data.channel_shuffle, data.stain_jitter, data.recolour_prob,
               data.touching_crop_prob, data.max_rotation, data.elastic)

  def __post_init__(self):
    if self.num_examples <= 0:
      raise ValueError(
          f'Process {self.layout.process_index} of {self.layout.process_count} has no training '
          'examples: the training split is smaller than the number of processes.')
    if self.repeats and (len(self.repeats) != self.num_examples or min(self.repeats) < 1):
      raise ValueError(f'repeats must hold one count >= 1 for each of the {self.num_examples} '
                       f'examples, got {len(self.repeats)} counts.')

  def step(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Example indices int64 [b] into the shard and `augment_params` [b] of global step `step`."""
    b = self.layout.per_process_batch
    # An epoch is a permutation of `pool`: every example, each as often as `repeats` says.
    pool = (np.repeat(np.arange(self.num_examples), self.repeats) if self.repeats
            else np.arange(self.num_examples))
    local = step * b + np.arange(b, dtype=np.int64)
    epochs, offsets = np.divmod(local, len(pool))
    indices = np.empty(b, np.int64)
    for epoch in np.unique(epochs):
      rng = np.random.default_rng(
          [self.seed, _PERMUTATION_STREAM, self.layout.process_index, int(epoch)])
      mask = epochs == epoch
      indices[mask] = pool[rng.permutation(len(pool))[offsets[mask]]]
    positions = step * self.batch_size + self.layout.process_index * b + np.arange(b)
    return indices, augment_params(
        self.seed, positions, augment=self.augment, jitter=self.jitter,
        scale_range=self.scale_range, invert_prob=self.invert_prob, grey_prob=self.grey_prob,
        channel_shuffle=self.channel_shuffle, stain_jitter=self.stain_jitter,
        recolour_prob=self.recolour_prob, touching_crop_prob=self.touching_crop_prob,
        max_rotation=self.max_rotation, elastic=self.elastic)

  def iterate_from(self, start_step: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    return (self.step(s) for s in itertools.count(start_step))


def geometric(x: np.ndarray, flip_lr: bool, flip_ud: bool, rot90: int) -> np.ndarray:
  """The geometric augmentation of [S, S, ...] `x`: left-right flip, up-down flip, then rot90."""
  if flip_lr:
    x = x[:, ::-1]
  if flip_ud:
    x = x[::-1]
  return np.rot90(x, rot90)


def geometric_tables(size: int) -> np.ndarray:
  """int32 [16, size * size]: row flip_lr + 2 * flip_ud + 4 * rot90 holds, for every pixel of the
  transformed (flattened) image, the pixel of the original it comes from.

  This lets the tfds source apply exactly `augment`'s geometry as a single gather.
  """
  pixels = np.arange(size * size, dtype=np.int32).reshape(size, size)
  return np.stack([geometric(pixels, bool(code & 1), bool(code & 2), code >> 2).ravel()
                   for code in range(16)])


def to_device_layout(x: np.ndarray, local_devices: int) -> np.ndarray:
  """[local_devices * B, ...] -> [local_devices, B, ...]."""
  return x.reshape((local_devices, -1) + x.shape[1:])


class EvalBatches(Iterable[dict[str, np.ndarray]]):
  """One process's validation batches, padded to `num_batches` with weight-0 examples.

  Re-iterable: each iter() is one full pass. `ids` gives the example id at every slot, in the
  batches' layout ('' for padding), for tests and per-image reports.
  """

  def __init__(self, examples: Examples, layout: Layout, num_batches: int):
    self._examples = examples
    self._layout = layout
    self._num_batches = num_batches
    size = num_batches * layout.per_process_eval_batch
    if len(examples) > size:
      raise ValueError(f'{len(examples)} validation examples do not fit in {num_batches} batches.')
    # Index of the example at every slot; -1 for padding.
    self._slots = np.full(size, -1, np.int64)
    self._slots[:len(examples)] = np.arange(len(examples))

  def __len__(self) -> int:
    return self._num_batches

  @property
  def ids(self) -> np.ndarray:
    """str [num_batches, D, B_eval] ids; '' marks padding."""
    ids = np.append(self._examples.ids.astype(str), '')  # Slot -1 (padding) picks the ''.
    return ids[self._slots].reshape(self._num_batches, self._layout.local_devices, -1)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b = self._layout.per_process_eval_batch
    s = self._examples.images.shape[1:3]
    for i in range(self._num_batches):
      slots = self._slots[i * b:(i + 1) * b]
      valid = slots >= 0
      image = np.zeros((b,) + s + (3,), np.float32)
      label = np.zeros((b,) + s, np.int32)
      image[valid] = self._examples.images[slots[valid]] / np.float32(255)
      label[valid] = self._examples.labels[slots[valid]]
      yield {
          'image': to_device_layout(image, self._layout.local_devices),
          'label': to_device_layout(label, self._layout.local_devices),
          'weight': to_device_layout(valid.astype(np.float32), self._layout.local_devices),
      }


# --- The .npz format -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NpzData:
  """Contents of an exported .npz: both splits (all processes) at `image_size`."""
  train: Examples
  val: Examples
  image_size: int
  dataset: str
  val_fraction: float
  split: str = 'tail'  # config.data.split the splits were made by (files without it: 'tail').


def save_npz(path: str, data: NpzData) -> None:
  """Writes `data` to `path` atomically (a temporary file, then a rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)

  def write(tmp):
    with open(tmp, 'wb') as f:  # A file object: np.savez would append '.npz' to a name.
      np.savez_compressed(
          f,
          train_image=data.train.images, train_label=data.train.labels,
          train_id=data.train.ids.astype(str),
          val_image=data.val.images, val_label=data.val.labels, val_id=data.val.ids.astype(str),
          image_size=np.int64(data.image_size), dataset=np.str_(data.dataset),
          val_fraction=np.float64(data.val_fraction), split=np.str_(data.split))
  atomic.write_via(path, write)


def load_npz(path: str) -> NpzData:
  """Reads a file written by `save_npz`; errors name the path and how to (re)create it."""
  hint = f'Create it with: {EXPORT_HINT.format(path=path)}'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No .npz dataset at {path!r}. {hint}')
  try:
    with np.load(path, allow_pickle=False) as f:
      def split(prefix):
        examples = Examples(f[f'{prefix}_id'], f[f'{prefix}_image'], f[f'{prefix}_label'])
        n, s = len(examples), int(f['image_size'])
        if (examples.images.shape != (n, s, s, 3) or examples.images.dtype != np.uint8
            or examples.labels.shape != (n, s, s) or examples.labels.dtype != np.uint16):
          raise ValueError(f'{prefix}_image {examples.images.dtype}{examples.images.shape} / '
                           f'{prefix}_label {examples.labels.dtype}{examples.labels.shape} do not '
                           f'match {n} examples at image_size {s}')
        return examples
      return NpzData(split('train'), split('val'), int(f['image_size']), str(f['dataset']),
                     float(f['val_fraction']), str(f['split']) if 'split' in f else 'tail')
  except (OSError, ValueError, KeyError) as e:  # Not a zip, truncated, missing keys, bad shapes.
    raise ValueError(f'{path!r} is not a valid dataset .npz ({e}). {hint}') from e

"""Native-size prediction from a training checkpoint.

`load_variables` restores a checkpoint's parameters and BatchNorm statistics only, or their moving
average (no optimizer is built). A strategy (`Resize`, `Pad`, `Tile`: one interface, `split`)
turns an image of any size into fixed-shape network inputs and assembles their outputs;
`Predictor` batches the inputs of consecutive images, runs the network (pruned to a level) and
returns the probabilities of every head (the channels of the model's `LabelScheme`) plus the final
prediction, ensembled by the model's own `models.accurate_probability`. A model trained with size
normalisation (config.data.nucleus_diameter) is run twice on every image, the second time at the
scale that brings the nuclei found by the first to the trained size.
The model standardises each input, so in 'tile' mode the statistics are those of the tile.
"""

import collections
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from unetpp_jax import models
from unetpp_jax.data import contract, splits
from unetpp_jax.evaluation import instances
from unetpp_jax.heads import Heads
from unetpp_jax.label_scheme import LabelScheme
from unetpp_jax.workdir import Workdir, saved_entries

STRATEGIES = ('auto', 'resize', 'pad', 'tile')
MODES = models.PREDICTION_MODES


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How the network is run on native-size images (see `unetpp_jax.evaluation.evaluate`); the
  defaults are also the commands' (`inference_flags`)."""
  strategy: str = 'auto'
  mode: str | None = None  # 'accurate' | 'fast'; None = config.predict.mode.
  prune_level: int | None = None  # None: config.predict.head ('fast'), else the deepest head.
  flips: bool = True  # Average over the 4 flips (identity, left-right, up-down, both).
  # Also the transposed image: with flips, the 8 symmetries of the square (flips x rot90).
  transpose: bool = False
  # Test-time scales: the image is also resized by each factor and the probabilities, resized
  # back, are averaged (helps nuclei far from the training sizes); (1.0,) = native size only.
  scales: tuple[float, ...] = (1.0,)
  tile_size: int = 256
  tile_overlap: int = 64
  pad_multiple: int = 128
  batch_size: int = 8  # Inputs per network call ('resize' and 'tile').


# ----------------------------------------------------------------------------------------------
# Checkpoint.


def holds_average(workdir: str | os.PathLike[str], step: int) -> bool:
  """Whether checkpoint `step` of `workdir` holds a moving average of the weights."""
  return 'ema' in saved_entries(Workdir(workdir).checkpoints, step)


def load_variables(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                   step: int | None = None, average: bool = True) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) of checkpoint `step` (default: the newest) in workdir.

  Only these two entries of the saved train state are read (the optimizer state is not), into
  the structure of `models.create_model(config.model)`'s variables; with `average`, from their
  moving average where the checkpoint holds one (config.optimizer.ema_decay), as validation
  during training did.
  """
  size = config.data.image_size
  shapes = jax.eval_shape(models.create_model(config.model).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  like = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  run = Workdir(workdir)
  step = run.checkpoint_step(step)
  if average and holds_average(workdir, step):
    return run.restore_variables({'ema': like}, step)[0]['ema'], step
  return run.restore_variables(like, step)


def weights_name(workdir: str | os.PathLike[str], step: int, average: bool) -> str:
  """What `load_variables` reads, for the record: 'moving average' or 'trained'."""
  return 'moving average' if average and holds_average(workdir, step) else 'trained'


# ----------------------------------------------------------------------------------------------
# Strategies: image -> fixed-shape network inputs, and outputs -> image-size probabilities.
# Each `split` returns (inputs float32 in [0, 1], assemble(outputs) -> [P, H, W, c]).

Assemble = Callable[[Sequence[np.ndarray]], np.ndarray]


class PrepareError(Exception):
  """An image that its strategy could not turn into network inputs (say, out of memory while
  padding it); raised from the original error, with the example it came from (with size
  normalisation, not always the last one read). Any other error of `Predictor.predict` is the
  network's, on the first image yielded to it and not yet returned."""

  def __init__(self, message: str, example: dict[str, Any]):
    super().__init__(message)
    self.example = example


@dataclasses.dataclass(frozen=True)
class Resize:
  """The image resized to the training size (bilinear, antialiased, as the training pipeline);
  probabilities resized back (bilinear). One compiled shape, the scale the model was trained on."""
  name = 'resize'
  size: int

  def split(self, image: np.ndarray) -> tuple[list[np.ndarray], Assemble]:
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR)

    return [np.asarray(small, np.float32) / 255], lambda outputs: _resize_maps(outputs[0], height,
                                                                               width)


@dataclasses.dataclass(frozen=True)
class Pad:
  """The whole image at native resolution, reflect-padded at the bottom/right to a multiple."""
  name = 'pad'
  multiple: int

  def split(self, image: np.ndarray) -> tuple[list[np.ndarray], Assemble]:
    height, width = image.shape[:2]
    m = self.multiple
    padded = _reflect_pad(image.astype(np.float32) / 255, -(-height // m) * m, -(-width // m) * m)
    return [padded], lambda outputs: outputs[0][:, :height, :width]


@dataclasses.dataclass(frozen=True)
class Tile:
  """Fixed tiles overlapping by `overlap` pixels (small images reflect-padded), blended with
  weights that fall off linearly towards tile edges. One compiled shape, bounded memory."""
  name = 'tile'
  size: int
  overlap: int

  def split(self, image: np.ndarray) -> tuple[list[np.ndarray], Assemble]:
    height, width = image.shape[:2]
    size = self.size
    padded = _reflect_pad(image.astype(np.float32) / 255, max(height, size), max(width, size))
    corners = [(y, x0) for y in _tile_starts(padded.shape[0], size, self.overlap)
               for x0 in _tile_starts(padded.shape[1], size, self.overlap)]
    weight = _tile_weight(size, self.overlap)[None, :, :, None]

    def assemble(outputs):
      total = np.zeros((outputs[0].shape[0], *padded.shape[:2], outputs[0].shape[-1]), np.float32)
      norm = np.zeros(padded.shape[:2], np.float32)
      for (y, x0), out in zip(corners, outputs):
        total[:, y:y + size, x0:x0 + size] += out * weight
        norm[y:y + size, x0:x0 + size] += weight[0, :, :, 0]
      total /= norm[None, :, :, None]  # In place: the maps of a slide scan are large.
      return total[:, :height, :width]
    return [padded[y:y + size, x0:x0 + size] for y, x0 in corners], assemble


@dataclasses.dataclass(frozen=True)
class MultiScale:
  """`base` applied to the image resized by each of `scales` (bilinear); the probabilities are
  resized back to the image's size (bilinear) and averaged over the scales."""
  base: Resize | Pad | Tile
  scales: tuple[float, ...]

  @property
  def name(self) -> str:
    return self.base.name

  def split(self, image: np.ndarray) -> tuple[list[np.ndarray], Assemble]:
    height, width = image.shape[:2]
    inputs, parts = [], []  # parts: (first input, number of inputs, assemble) of each scale.
    for scale in self.scales:
      size = (max(1, round(width * scale)), max(1, round(height * scale)))
      scaled = image if size == (width, height) else np.asarray(
          Image.fromarray(image).resize(size, Image.BILINEAR))
      scale_inputs, assemble = self.base.split(scaled)
      parts.append((len(inputs), len(scale_inputs), assemble))
      inputs += scale_inputs

    def assemble_scales(outputs):
      return sum(_resize_maps(assemble(outputs[first:first + n]), height, width)
                 for first, n, assemble in parts) / len(parts)
    return inputs, assemble_scales


def create_strategy(config: ml_collections.ConfigDict, options: InferenceOptions,
                    level: int, magnification: float = 1.0) -> Resize | Pad | Tile | MultiScale:
  """The strategy named by options.strategy, over options.scales times `magnification`; 'auto'
  predicts at the scale the model was trained at: 'resize' after data.train_preprocess='resize',
  'pad' after 'crop'."""
  strategy = options.strategy
  if strategy == 'auto':
    strategy = 'resize' if config.data.train_preprocess == 'resize' else 'pad'
  if strategy not in STRATEGIES:
    raise ValueError(f'--strategy must be one of {STRATEGIES}, got {strategy!r}.')
  factor = 2**level
  for name, value in (('tile_size', options.tile_size), ('pad_multiple', options.pad_multiple)):
    if value <= 0 or value % factor:
      raise ValueError(f'--{name}={value} must be a positive multiple of 2**prune_level = '
                       f'{factor}.')
  if not 0 <= options.tile_overlap < options.tile_size:
    raise ValueError(f'--tile_overlap={options.tile_overlap} must be in [0, tile_size).')
  scales = tuple(float(s) for s in options.scales)
  if not scales or min(scales) <= 0:
    raise ValueError(f'--scales={",".join(map(str, scales))} must be positive factors.')
  if strategy == 'resize' and (scales != (1.0,) or config.data.nucleus_diameter):
    # Every input is resized to the training size: a rescaled image would reach the network
    # as it is, only blurred.
    what = (f'--scales={",".join(map(str, scales))}' if scales != (1.0,) else
            f'Size normalisation (data.nucleus_diameter={config.data.nucleus_diameter})')
    raise ValueError(f"{what} needs --strategy=pad or tile: 'resize' brings every image to the "
                     'training size.')
  scales = tuple(magnification * s for s in scales)
  if strategy == 'resize':
    base = Resize(config.data.image_size)
  elif strategy == 'pad':
    base = Pad(options.pad_multiple)
  else:
    base = Tile(options.tile_size, options.tile_overlap)
  return base if scales == (1.0,) else MultiScale(base, scales)


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 [P, h, w, c] maps resized to [P, height, width, c] (bilinear); unchanged if equal."""
  if maps.shape[1:3] == (height, width):
    return maps
  return np.stack([
      np.stack([np.asarray(Image.fromarray(channel.astype(np.float32), mode='F').resize(
          (width, height), Image.BILINEAR)) for channel in np.moveaxis(m, -1, 0)], -1)
      for m in maps])


def _reflect_pad(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pads at the bottom/right by mirroring (keeps the statistics that standardisation sees)."""
  return np.pad(x, ((0, height - x.shape[0]), (0, width - x.shape[1]), (0, 0)), mode='reflect')


def _tile_starts(length: int, size: int, overlap: int) -> list[int]:
  """Evenly spread starts of tiles covering [0, length) that overlap by at least `overlap`."""
  if length <= size:
    return [0]
  count = -(-(length - size) // (size - overlap)) + 1
  return [int(round(s)) for s in np.linspace(0, length - size, count)]


def _tile_weight(size: int, overlap: int) -> np.ndarray:
  """[size, size] blending weight: 1 inside, falling linearly over overlap/2 pixels to the edge."""
  ramp = max(overlap // 2, 1)
  i = np.arange(size)
  w = np.minimum(np.minimum(i + 1, size - i), ramp) / ramp
  return np.outer(w, w).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The predictor.


class Predictor:
  """Runs the network on fixed-shape batches: probabilities of every head plus the final one, or
  (`final_only`: one map to hold per image rather than one per head and the final) of the final
  one alone."""

  def __init__(self, config: ml_collections.ConfigDict, variables: Any,
               options: InferenceOptions, *, final_only: bool = False):
    self.model = models.create_model(config.model)
    self.variables = jax.device_put(variables)  # Once, not at every call of the network.
    self.options = options
    self.mode = options.mode or config.predict.mode
    if self.mode not in MODES:
      raise ValueError(f"--mode must be 'accurate' or 'fast', got {self.mode!r}.")
    levels = self.model.levels
    supervised = sorted(int(h) for h in Heads.from_config(config).supervised)
    default_level = config.predict.head if self.mode == 'fast' else max(supervised)
    self.level = default_level if options.prune_level is None else options.prune_level
    if options.batch_size < 1:
      raise ValueError(f'--batch_size={options.batch_size} must be at least 1.')
    if not 1 <= self.level <= levels:
      raise ValueError(f'--prune_level={self.level} must be in 1..{levels}.')
    if self.model.skips == 'plain' and self.level != levels:
      raise ValueError(f'--prune_level={self.level}: a {config.model.name} has only head {levels} '
                       'and cannot be pruned.')
    self.heads = self.model.output_heads(self.level)
    self.final_heads = ([self.level] if self.mode == 'fast'
                        else [h for h in supervised if h <= self.level] or [self.level])
    self.final_only = final_only
    self.names = ([] if final_only else [f'head{j}' for j in self.heads]) + [self.mode]
    self.scheme = LabelScheme.from_config(config)
    self.nucleus_diameter = float(config.data.nucleus_diameter)
    self._config = config
    self._strategy = create_strategy(config, options, self.level)
    self.strategy = self._strategy.name
    self.batch_size = 1 if self.strategy == 'pad' else options.batch_size
    self._forward = jax.jit(self._probabilities)

  def _probabilities(self, variables: Any, images: jax.Array) -> jax.Array:
    """images [B, h, w, 3] -> [P, B, h, w, c]: the c `scheme.channels` of heads 1..k (unless
    final_only), then of the final prediction, averaged over the test-time augmentations."""
    probs = self._flipped_probabilities(variables, images)
    if self.options.transpose:  # A transposed image's probabilities, transposed back.
      transposed = self._flipped_probabilities(variables, jnp.swapaxes(images, 1, 2))
      probs = (probs + jnp.swapaxes(transposed, 2, 3)) / 2
    return probs

  def _flipped_probabilities(self, variables: Any, images: jax.Array) -> jax.Array:
    """`_probabilities` without the transposition."""
    batch = images.shape[0]
    if self.options.flips:  # Identity, left-right, up-down, both; undone after the network.
      images = jnp.concatenate([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]])
    logits = self.model.apply(variables, images, prune_level=self.level)
    heads = [self.scheme.probabilities(head_logits) for head_logits in logits]
    # The final prediction is the model's own ensemble of the final heads, channel by channel.
    final = models.accurate_probability(logits, self.final_heads, self.heads,
                                        self.scheme.probabilities)
    probs = jnp.stack([final] if self.final_only else heads + [final])  # [P, n * B, h, w, c]
    if self.options.flips:  # The mean over flips commutes with the mean over heads.
      g = probs.reshape(probs.shape[0], 4, batch, *probs.shape[2:])
      probs = (g[:, 0] + g[:, 1, :, :, ::-1] + g[:, 2, :, ::-1] + g[:, 3, :, ::-1, ::-1]) / 4
    return probs

  def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities [P, n, h, w, c] of n same-shape inputs, padded to one fixed batch size."""
    batch = np.zeros((self.batch_size, *inputs[0].shape), np.float32)
    batch[:len(inputs)] = np.stack(inputs)
    return np.asarray(self._forward(self.variables, batch))[:, :len(inputs)]

  def magnification(self, image: np.ndarray, final: np.ndarray) -> float:
    """The size normalisation's factor for uint8 `image` [H, W, 3] whose final probabilities
    [H, W, c] at native scale are `final`: its instances (the scheme's default options) give the
    median nucleus diameter, which the factor brings to config.data.nucleus_diameter
    (`contract.size_factor`; 1 without nuclei or without size normalisation)."""
    options = instances.default_options(self.scheme).for_background(
        splits.bright_background(image))
    labels = instances.to_instances(*self.scheme.split(final), options)
    return contract.size_factor(contract.median_diameter(labels, options.min_size),
                                self.nucleus_diameter)

  def predict(self, examples: Iterable[dict[str, Any]]
              ) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yields (example, probabilities [P, H, W, c]) in input order.

    Inputs of consecutive images share batches, so small images do not each run a mostly empty
    batch. With size normalisation, the probabilities are those of the second pass, at
    `magnification` (resized back to the image's size).
    """
    first = self._predict(examples, self._strategy)
    if not self.nucleus_diameter:
      yield from first
      return
    for example, probs in first:
      factor = self.magnification(example['image'], probs[-1])
      if factor == 1.0:
        yield example, probs
      else:
        yield from self._predict([example], create_strategy(self._config, self.options,
                                                            self.level, factor))

  def _predict(self, examples: Iterable[dict[str, Any]], strategy: Resize | Pad | Tile | MultiScale
               ) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """`predict` with `strategy`, in one pass."""
    pending = collections.deque()  # [example, assemble, outputs (None until computed)]
    queue = []  # (entry, index of the input within its image, input)

    def flush():
      outputs = self.run([q[2] for q in queue])
      for (entry, index, _), out in zip(queue, np.moveaxis(outputs, 1, 0)):
        entry[2][index] = out
      queue.clear()

    for example in examples:
      try:
        inputs, assemble = strategy.split(example['image'])
      except Exception as e:  # Raised with earlier images still queued: say whose it is.
        raise PrepareError(f'{type(e).__name__}: {e}', example) from e
      entry = [example, assemble, [None] * len(inputs)]
      pending.append(entry)
      for index, x in enumerate(inputs):
        if queue and (len(queue) == self.batch_size or x.shape != queue[0][2].shape):
          flush()
        queue.append((entry, index, x))
      while pending and all(o is not None for o in pending[0][2]):
        done = pending.popleft()
        yield done[0], done[1](done[2])
    if queue:
      flush()
    for done in pending:
      yield done[0], done[1](done[2])

"""U-Net++ (Zhou et al., 2018/2019) in Flax linen: nested dense skips, one head per decoder level.

Node X(i, j) sits at resolution level i (0 = full resolution) and decoder column j. X(i, 0) is the
encoder; for j >= 1, X(i, j) = ConvBlock(concat(X(i, 0), ..., X(i, j-1), Up(X(i+1, j-1)))). Head j
is a 1x1 convolution on X(0, j), j = 1..L. With `prune_level=k` only the nodes with i + j <= k are
built, which is exactly the sub-network that head k depends on (UNet++ L^k in the paper). Every
module has an explicit name, so a pruned model reads the very same parameters as the full one.

The paper's baselines are the same class with `skips='plain'`: the U-Net keeps only the decoder
nodes X(i, L - i), each fed by the encoder node X(i, 0) alone, and has the single head L. The wide
U-Net is that U-Net with its filters scaled up until its parameter count matches the U-Net++
(`wide_unet_filters`).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from skimage import color

from unetpp_jax.data import splits


def standardize(images: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-image zero mean, unit variance: DSB2018 mixes dark fluorescence and bright brightfield."""
  mean = jnp.mean(images, axis=(-3, -2, -1), keepdims=True)
  std = jnp.std(images, axis=(-3, -2, -1), keepdims=True)
  return (images - mean) / (std + eps)


# How the network sees its input [B, H, W, 3] in [0, 1] (config.model.input_norm):
#   'standardize'   the RGB image, standardised per image;
#   'grey_invert'   one grey channel (the mean of R, G, B), inverted where the image's median grey
#                   exceeds 0.5 (a bright background: stained tissue, brightfield), then
#                   standardised: nuclei are then bright on a dark background in every kind of
#                   image, as in the fluorescence images that make up most of DSB2018;
#   'haematoxylin'  as 'grey_invert', but a bright-background image becomes its haematoxylin
#                   (nuclear stain) density instead of its inverted grey, so the eosin-pink stroma
#                   of H&E sections stays dark while nuclei light up. On a grey brightfield image
#                   it is the optical density, which like the inverted grey rises with darkness;
#   'rgb_haematoxylin'  four channels: 'standardize' followed by 'haematoxylin', so the network
#                   keeps the colours and also sees the nuclear stain;
#   'rgb_haematoxylin_clahe'  five: 'rgb_haematoxylin' followed by the 'grey_invert' view
#                   equalised by CLAHE (`clahe`): local contrast, which lifts nuclei that are
#                   dim or pale against their own surroundings.
# It is part of the model, so training and every inference path apply it identically.
INPUT_NORMS = (
    'standardize', 'grey_invert', 'haematoxylin', 'rgb_haematoxylin', 'rgb_haematoxylin_clahe'
)

# Optical density (R, G, B) -> haematoxylin density: colour deconvolution with Ruifrok & Johnston's
# stain vectors (skimage.color.rgb2hed).
_HAEMATOXYLIN_FROM_OD = np.asarray(color.hed_from_rgb[:, 0], np.float32)


def haematoxylin(images: jax.Array) -> jax.Array:
  """The haematoxylin density [..., H, W, 1] of float32 RGB `images` [..., H, W, 3] in [0, 1]."""
  optical_density = -jnp.log(jnp.maximum(images, 1 / 255))  # Clipped like an 8-bit camera's.
  return jnp.maximum(optical_density @ _HAEMATOXYLIN_FROM_OD, 0)[..., None]


def clahe(images: jax.Array, tile: int = 32, clip_limit: float = 0.01,
          nbins: int = 256) -> jax.Array:
  """Contrast-limited adaptive histogram equalisation of `images` [B, H, W] in [0, 1].

  skimage.exposure.equalize_adapthist's algorithm (Zuiderveld 1994), for a batch and inside jit:
  each `tile` x `tile` region's histogram is clipped at `clip_limit` times its pixel count and
  cumulated into a mapping; a pixel takes the bilinear blend of the mappings of the four nearest
  regions. Unlike skimage, the clipped excess is spread evenly over all bins in one pass, the bins
  span [0, 1] rather than each image's own range, and the regions are `tile` pixels wide (or the
  image's size, if smaller) rather than an eighth of the image: a training crop and a whole image
  are equalised over regions of the same size, and a dim image stays dim where it is uniform.
  """
  batch, height, width = images.shape
  tile_h, tile_w = min(tile, height), min(tile, width)
  bins = jnp.clip((images * nbins).astype(jnp.int32), 0, nbins - 1)
  # Histograms of the regions, the last ones reflect-padded to a whole tile.
  padded = jnp.pad(bins, ((0, 0), (0, -height % tile_h), (0, -width % tile_w)), mode='reflect')
  rows, cols = padded.shape[1] // tile_h, padded.shape[2] // tile_w
  row = np.arange(batch)[:, None, None] * rows + np.arange(padded.shape[1])[:, None] // tile_h
  region = row * cols + np.arange(padded.shape[2]) // tile_w  # [B, H', W'], one id per image.
  hist = jnp.zeros(batch * rows * cols * nbins).at[(region * nbins + padded).ravel()].add(1.0)
  hist = hist.reshape(batch, rows, cols, nbins)
  limit = max(clip_limit * tile_h * tile_w, 1.0)
  excess = jnp.sum(jnp.maximum(hist - limit, 0), axis=-1, keepdims=True)
  hist = jnp.minimum(hist, limit) + excess / nbins
  mappings = jnp.cumsum(hist, axis=-1) / (tile_h * tile_w)  # [B, rows, cols, nbins] in (0, 1].

  def neighbours(size, tile, count):
    """The two regions whose centres (k * tile + ceil(tile / 2), as skimage's) flank each pixel,
    and the weight of the second; pixels beyond the outer centres take the outer region alone."""
    position = (np.arange(size) - (tile + 1) // 2) / tile
    first = np.clip(np.floor(position), 0, count - 1).astype(np.int32)
    return first, np.minimum(first + 1, count - 1), np.clip(position - first, 0, 1)

  top, bottom, down = neighbours(height, tile_h, rows)
  left, right, across = neighbours(width, tile_w, cols)

  def mapped(region_rows, region_cols):
    """Each pixel's grey level through the mapping of the region at (its row, its column)."""
    b = np.arange(batch)[:, None, None]
    return mappings[b, region_rows[:, None], region_cols[None, :], bins]

  upper = mapped(top, left) * (1 - across) + mapped(top, right) * across
  lower = mapped(bottom, left) * (1 - across) + mapped(bottom, right) * across
  return upper * (1 - down[:, None]) + lower * down[:, None]


def _grey_and_bright(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The grey level [B, H, W, 1] of `images`, and whether each has a bright background."""
  grey = jnp.mean(images, axis=-1, keepdims=True)
  return grey, jnp.median(grey, axis=(-3, -2, -1), keepdims=True) > splits.BRIGHT_MEDIAN


def normalize_input(images: jax.Array, input_norm: str) -> jax.Array:
  """The network's view of float32 `images` [B, H, W, 3] in [0, 1] (see INPUT_NORMS)."""
  if input_norm == 'rgb_haematoxylin_clahe':
    grey, bright = _grey_and_bright(images)
    equalised = clahe(jnp.where(bright, 1.0 - grey, grey)[..., 0])[..., None]
    return jnp.concatenate(
        [normalize_input(images, 'rgb_haematoxylin'), standardize(equalised)], axis=-1)
  if input_norm == 'rgb_haematoxylin':
    return jnp.concatenate([standardize(images), normalize_input(images, 'haematoxylin')], axis=-1)
  if input_norm in ('grey_invert', 'haematoxylin'):
    grey, bright = _grey_and_bright(images)
    stain = 1.0 - grey if input_norm == 'grey_invert' else haematoxylin(images)
    images = jnp.where(bright, stain, grey)
  elif input_norm != 'standardize':
    raise ValueError(f'input_norm must be one of {INPUT_NORMS}, got {input_norm!r}.')
  return standardize(images)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, as a reshape and max.

  Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`; its gradient is an elementwise
  compare-and-select, where the reduce-window version's is a select-and-scatter that XLA CPU runs
  slowly.
  """
  n, h, w, c = x.shape
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


# GroupNorm's groups (model.norm='group', config.model.norm_groups): 8 by default; a layer whose
# width (e.g. a wide U-Net's) is not a multiple of them gets gcd(width, groups).
NORM_GROUPS = 8


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by an optional norm (`NORMS`), ReLU and dropout."""

  features: int
  norm: str = 'batch'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  norm_groups: int = NORM_GROUPS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for _ in range(2):
      # A bias before a norm is redundant: the norm's own offset absorbs it.
      x = nn.Conv(self.features, (3, 3), use_bias=self.norm == 'none', dtype=self.dtype)(x)
      if self.norm == 'group':
        x = nn.GroupNorm(num_groups=math.gcd(self.features, self.norm_groups), dtype=self.dtype)(x)
      elif self.norm == 'batch':
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            axis_name=self.bn_axis_name if train else None,
            dtype=self.dtype,
        )(x)
      x = nn.relu(x)
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class ConvTranspose2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` with the same parameters, as one matmul.

  Each input pixel maps to its own 2x2 output patch, so the layer is a [C -> 2*2*F] matmul followed
  by depth-to-space. XLA CPU runs the equivalent transposed convolution as an input-dilated
  convolution that was a third of the whole train step; as a matmul it costs almost nothing.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # lax.conv_transpose (transpose_kernel=False) puts kernel tap (1 - a, 1 - b) on output
    # offset (a, b) of each 2x2 patch, hence the flip.
    patches = jnp.einsum('nhwc,ijcf->nhiwjf', x, kernel[::-1, ::-1])
    n, h, _, w, _, f = patches.shape
    return patches.reshape(n, 2 * h, 2 * w, f) + bias


class UNetPlusPlus(nn.Module):
  """U-Net++ returning one logits map per decoder level.

  Attributes:
    filters: Channels per resolution level; L = len(filters) - 1 decoder levels / heads.
    num_classes: 1 = binary (sigmoid); >1 = softmax over classes.
    norm: One of NORMS.
    dropout_rate: Dropout after every convolution (0 = none).
    upsample: 'transpose' (learned 2x2 stride-2 conv) or 'bilinear'.
    skips: 'nested' (U-Net++) or 'plain' (U-Net: one decoder path and head L only).
    dtype: Compute dtype; parameters stay float32 and logits are returned as float32.
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged during training.
    input_norm: How the input is normalised (one of INPUT_NORMS).
    norm_groups: GroupNorm's groups per layer (norm='group').
  """

  filters: Sequence[int] = (32, 64, 128, 256, 512)
  num_classes: int = 1
  norm: str = 'batch'
  dropout_rate: float = 0.0
  upsample: str = 'transpose'
  skips: str = 'nested'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  input_norm: str = 'standardize'
  norm_groups: int = NORM_GROUPS

  @property
  def levels(self) -> int:
    return len(self.filters) - 1

  def output_heads(self, prune_level: int | None = None) -> tuple[int, ...]:
    """The heads (decoder levels j of X(0, j)) whose logits __call__ returns, in order."""
    k = self.levels if prune_level is None else prune_level
    return (k,) if self.skips == 'plain' else tuple(range(1, k + 1))

  @nn.compact
  def __call__(
      self, images: jax.Array, *, train: bool = False, prune_level: int | None = None
  ) -> tuple[jax.Array, ...]:
    """Maps images [B, H, W, C] in [0, 1] to logits [B, H, W, num_classes] of `output_heads(k)`.

    Args:
      images: Input batch; H and W must be multiples of 2**k.
      train: Training mode (batch statistics, dropout).
      prune_level: k in 1..L: compute only the nodes X(i, j) with i + j <= k and return heads
        1..k. None means k = L (the full network). A plain U-Net cannot be pruned.
    """
    k = self.levels if prune_level is None else prune_level
    if not 1 <= k <= self.levels:
      raise ValueError(f'prune_level must be in 1..{self.levels}, got {prune_level}.')
    if self.skips == 'plain' and k != self.levels:
      raise ValueError(f'A plain U-Net has only head {self.levels}; it cannot be pruned to '
                       f'level {k}.')
    factor = 2**k
    if images.shape[-3] % factor or images.shape[-2] % factor:
      raise ValueError(
          f'Image size {images.shape[-3]}x{images.shape[-2]} must be a multiple of {factor} '
          f'(2**prune_level) for the U-Net++ with {self.levels} levels.'
      )

    def block(i: int, j: int) -> ConvBlock:
      return ConvBlock(
          self.filters[i], norm=self.norm, dropout_rate=self.dropout_rate, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, norm_groups=self.norm_groups, name=f'X{i}_{j}',
      )

    x = normalize_input(images.astype(jnp.float32), self.input_norm).astype(self.dtype)
    nodes = {(0, 0): block(0, 0)(x, train)}
    for i in range(1, k + 1):
      pooled = max_pool_2x2(nodes[i - 1, 0])
      nodes[i, 0] = block(i, 0)(pooled, train)
    for j in range(1, k + 1):
      # U-Net: only the node on the way up from the deepest one, X(k - j, j), fed by X(k - j, 0).
      rows = [k - j] if self.skips == 'plain' else range(k + 1 - j)
      for i in rows:
        up = self._upsample(nodes[i + 1, j - 1], self.filters[i], name=f'up{i + 1}_{j - 1}')
        skips = [nodes[i, 0]] if self.skips == 'plain' else [nodes[i, m] for m in range(j)]
        nodes[i, j] = block(i, j)(jnp.concatenate([*skips, up], axis=-1), train)
    return tuple(
        nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name=f'head{j}')(nodes[0, j]).astype(
            jnp.float32
        )
        for j in self.output_heads(k)
    )

  def _upsample(self, x: jax.Array, features: int, name: str) -> jax.Array:
    if self.upsample == 'transpose':
      return ConvTranspose2x2(features, dtype=self.dtype, name=name)(x)
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), method='bilinear')


MODEL_NAMES = ('unetpp', 'unet', 'wide_unet')
# Choices of the config.model fields of the same names, and of config.predict.mode.
NORMS = ('batch', 'group', 'none')  # BatchNorm, GroupNorm (per image), or none.
UPSAMPLES = ('transpose', 'bilinear')
DTYPES = ('float32', 'bfloat16')
PREDICTION_MODES = ('accurate', 'fast')


def count_parameters(model: UNetPlusPlus, prune_level: int | None = None) -> int:
  """Parameters of the network pruned to `prune_level` (None: all of them), without allocating."""
  size = 2**model.levels
  init = functools.partial(model.init, prune_level=prune_level)
  shapes = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3),
                                                                         jnp.float32))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


@functools.lru_cache
def wide_unet_filters(filters: tuple[int, ...], **kwargs: Any) -> tuple[int, ...]:
  """U-Net filters, `filters` scaled by one factor, whose parameter count is closest to U-Net++'s.

  For the paper's (32, 64, 128, 256, 512) this gives (35, 69, 138, 276, 553): 9,038,041 parameters
  against U-Net++'s 9,045,924 (the paper's wide U-Net: 35..560 filters, 9.13M).

  Args:
    filters: The U-Net++ filters to match.
    **kwargs: Other UNetPlusPlus attributes (num_classes, norm, upsample), as the models use.
  """
  target = count_parameters(UNetPlusPlus(filters, **kwargs))
  scaled = lambda s: tuple(max(1, round(f * s)) for f in filters)
  count = lambda s: count_parameters(UNetPlusPlus(scaled(s), skips='plain', **kwargs))
  low, high = 1.0, 2.0
  while count(high) < target:
    high *= 2
  for _ in range(20):  # Parameters grow with the scale: bisect.
    mid = (low + high) / 2
    low, high = (mid, high) if count(mid) < target else (low, mid)
  return scaled(min((low, high), key=lambda s: abs(count(s) - target)))


def create_model(model_config: Any, bn_axis_name: str | None = None) -> UNetPlusPlus:
  """Builds the model described by `config.model` (name 'unetpp', 'unet' or 'wide_unet')."""
  if model_config.name not in MODEL_NAMES:
    raise ValueError(f'config.model.name must be one of {MODEL_NAMES}, got {model_config.name!r}.')
  filters = tuple(model_config.filters)
  if model_config.name == 'wide_unet':
    filters = wide_unet_filters(filters, num_classes=model_config.num_classes,
                                norm=model_config.norm, upsample=model_config.upsample)
  return UNetPlusPlus(
      filters=filters,
      skips='nested' if model_config.name == 'unetpp' else 'plain',
      num_classes=model_config.num_classes,
      norm=model_config.norm,
      dropout_rate=model_config.dropout_rate,
      upsample=model_config.upsample,
      dtype=jnp.dtype(model_config.dtype),
      bn_axis_name=bn_axis_name,
      input_norm=model_config.get('input_norm', 'standardize'),
      norm_groups=model_config.get('norm_groups', NORM_GROUPS),
  )


def foreground_probability(logits: jax.Array) -> jax.Array:
  """Probability that a pixel is nucleus: sigmoid for one class, 1 - p(background) for softmax."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits[..., 0])
  return 1.0 - jax.nn.softmax(logits, axis=-1)[..., 0]


def accurate_probability(
    logits: Sequence[jax.Array],
    heads: Sequence[int],
    output_heads: Sequence[int] | None = None,
    probability: Callable[[jax.Array], jax.Array] = foreground_probability,
) -> jax.Array:
  """The 'accurate' prediction: mean probability of `heads` (foreground by default).

  Args:
    logits: The model's output.
    heads: Heads to average.
    output_heads: The head of each entry of `logits` (`model.output_heads()`); None = 1..k.
    probability: One head's logits -> its probabilities; evaluation's hold p(boundary) too
      (`LabelScheme.probabilities`).
  """
  position = head_positions(output_heads, len(logits))
  return jnp.mean(jnp.stack([probability(logits[position[h]]) for h in heads]), axis=0)


def head_positions(output_heads: Sequence[int] | None, num_outputs: int) -> dict[int, int]:
  """{head: index in the model's output}; `output_heads` None means heads 1..num_outputs."""
  return {int(h): n for n, h in enumerate(output_heads or range(1, num_outputs + 1))}

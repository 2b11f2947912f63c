"""Segmentation metrics as global sums (clu), never as means of per-batch means.

For each prediction (head 1..k, then the 'accurate' ensemble) `SegmentationSums` accumulates, over
all pixels of all images seen, the intersection and both areas of the thresholded prediction and the
true foreground, plus the sum of per-image IoU and Dice. Hence:
  iou    = sum(intersection) / sum(union)            pooled over every pixel of the split
  dice   = 2 sum(intersection) / (sum(pred) + sum(true))
  iou_per_image, dice_per_image = mean over images of each image's own score, where an image with
  neither predicted nor true foreground scores 1 (a perfect empty prediction).
"""

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from unetpp_jax import models

THRESHOLD = 0.5  # Probability above which a pixel is predicted nucleus.


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 1.0)


@flax.struct.dataclass
class SegmentationSums(clu_metrics.Metric):
  """Sums over images of foreground statistics; arrays have one entry per prediction."""

  intersection: jax.Array
  predicted: jax.Array
  true: jax.Array
  image_iou: jax.Array
  image_dice: jax.Array
  images: jax.Array

  @classmethod
  def from_model_output(
      cls, *, probs: jax.Array, label: jax.Array, weight: jax.Array | None = None, **_
  ) -> 'SegmentationSums':
    """probs: [P, B, H, W] foreground probabilities of P predictions; label: [B, H, W];
    weight: [B]."""
    if weight is None:
      weight = jnp.ones(label.shape[:1], jnp.float32)
    pred = (probs > THRESHOLD).astype(jnp.float32)
    true = (label > 0).astype(jnp.float32)[None]
    inter = jnp.sum(pred * true, axis=(2, 3))  # [P, B]
    p_area = jnp.sum(pred, axis=(2, 3))
    t_area = jnp.sum(true, axis=(2, 3)) * jnp.ones_like(p_area)
    iou = _safe_ratio(inter, p_area + t_area - inter)
    dice = _safe_ratio(2 * inter, p_area + t_area)
    weighted = lambda x: jnp.sum(x * weight, axis=1)  # Padding examples (weight 0) drop out.
    return cls(
        intersection=weighted(inter),
        predicted=weighted(p_area),
        true=weighted(t_area),
        image_iou=weighted(iou),
        image_dice=weighted(dice),
        images=jnp.sum(weight),
    )

  def merge(self, other: 'SegmentationSums') -> 'SegmentationSums':
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> dict[str, jax.Array]:
    union = self.predicted + self.true - self.intersection
    return {
        'iou': _safe_ratio(self.intersection, union),
        'dice': _safe_ratio(2 * self.intersection, self.predicted + self.true),
        'iou_per_image': self.image_iou / jnp.maximum(self.images, 1),
        'dice_per_image': self.image_dice / jnp.maximum(self.images, 1),
    }


@flax.struct.dataclass
class WeightedMean(clu_metrics.Metric):
  """Example-weighted mean of a per-batch mean (scalar or array), e.g. the loss of each head."""

  total: jax.Array
  count: jax.Array

  @classmethod
  def from_output(cls, name: str) -> type['WeightedMean']:
    """The metric that averages model output `name`."""

    @flax.struct.dataclass
    class FromOutput(cls):

      @classmethod
      def from_model_output(cls, *, weight: jax.Array | None = None, **outputs) -> 'WeightedMean':
        count = jnp.float32(1.0) if weight is None else jnp.sum(weight)
        return cls(total=outputs[name] * count, count=count)

    return FromOutput

  def merge(self, other: 'WeightedMean') -> 'WeightedMean':
    return jax.tree.map(jnp.add, self, other)

  def compute(self) -> jax.Array:
    return self.total / jnp.maximum(self.count, 1e-12)


@flax.struct.dataclass
class SegmentationMetrics(clu_metrics.Collection):
  loss: WeightedMean.from_output('loss')
  head_loss: WeightedMean.from_output('head_losses')
  segmentation: SegmentationSums


def prediction_names(output_heads: Sequence[int]) -> list[str]:
  """Names of the predictions in SegmentationSums order: the model's heads, then the ensemble."""
  return [f'head{j}' for j in output_heads] + ['accurate']


def summarize(collection: SegmentationMetrics, prefix: str = '',
              output_heads: Sequence[int] | None = None) -> dict[str, float]:
  """Flat {name: float} for writers and logs, e.g. 'eval/iou/head4', 'eval/loss/head2'.

  Args:
    collection: Accumulated metrics.
    prefix: Prepended to every name.
    output_heads: The model's output heads (`model.output_heads()`); None = 1..k.
  """
  computed = jax.device_get(collection.compute())
  names = prediction_names(output_heads or range(1, len(computed['head_loss']) + 1))
  out = {f'{prefix}loss': float(computed['loss'])}
  out.update({f'{prefix}loss/{n}': float(v) for n, v in zip(names, computed['head_loss'])})
  for stat, values in computed['segmentation'].items():
    out.update({f'{prefix}{stat}/{n}': float(v) for n, v in zip(names, np.asarray(values))})
  return out


def from_outputs(
    *,
    logits: Sequence[jax.Array],
    label: jax.Array,
    loss: jax.Array,
    head_losses: jax.Array,
    heads: Sequence[int],
    output_heads: Sequence[int] | None = None,
    weight: jax.Array | None = None,
    axis_name: str | None = None,
) -> SegmentationMetrics:
  """The metrics of one batch; with `axis_name`, gathered over all devices (inside pmap).

  `heads` make the 'accurate' ensemble; `output_heads` name the entries of `logits` (None = 1..k).
  """
  probs = jnp.stack(
      [models.foreground_probability(l) for l in logits]
      + [models.accurate_probability(logits, heads, output_heads)]
  )
  kwargs = dict(probs=probs, label=label, loss=loss, head_losses=head_losses, weight=weight)
  if axis_name is None:
    return SegmentationMetrics.single_from_model_output(**kwargs)
  return SegmentationMetrics.gather_from_model_output(axis_name=axis_name, **kwargs)

"""One owner of the model's heads: which it outputs, which are supervised, how they are weighted
and what the predictions are called. Built once from the config; used by the loss, the metrics,
training, evaluation, the study and the benchmark."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax import losses, models
from unetpp_jax import metrics as metrics_lib
from unetpp_jax.label_scheme import LabelScheme


@dataclasses.dataclass(frozen=True)
class Heads:
  """The heads of one configured model.

  Attributes:
    output: the heads the full model returns, in output order (`model.output_heads()`).
    supervised: the heads whose losses are combined (config.loss.deep_supervision_heads); their
      mean probability is the 'accurate' prediction.
    weights: one loss weight per supervised head; empty = equal weights summing to 1.
    bce_weight, dice_weight: the terms of each head's loss (`losses.head_loss`).
    scheme: the classes, whose `target` the heads learn.
    class_weights, contact_weight, lovasz_weight: the per-class cross-entropy weights, the extra
      weight of the target's contact band and the Lovasz term's weight (`losses.head_loss`,
      `losses.deep_supervision_loss`).
  """
  output: tuple[int, ...]
  supervised: tuple[int, ...]
  weights: tuple[float, ...]
  bce_weight: float
  dice_weight: float
  scheme: LabelScheme = LabelScheme()
  class_weights: tuple[float, ...] = ()
  contact_weight: float = 1.0
  lovasz_weight: float = 0.0

  @classmethod
  def from_config(cls, config: Any) -> 'Heads':
    return cls(
        output=tuple(models.create_model(config.model).output_heads()),
        supervised=tuple(config.loss.deep_supervision_heads),
        weights=tuple(config.loss.head_weights),
        bce_weight=config.loss.bce_weight,
        dice_weight=config.loss.dice_weight,
        scheme=LabelScheme.from_config(config),
        class_weights=tuple(config.loss.get('class_weights', ())),
        contact_weight=config.loss.get('contact_weight', 1.0),
        lovasz_weight=config.loss.get('lovasz_weight', 0.0),
    )

  @property
  def prediction_names(self) -> list[str]:
    """The predictions in metrics order: every output head, then the 'accurate' ensemble."""
    return metrics_lib.prediction_names(self.output)

  @property
  def has_ensemble(self) -> bool:
    """Whether 'accurate' differs from a single head (more than one head is supervised)."""
    return len(self.supervised) > 1

  def loss(self, logits: Sequence[jax.Array], label: jax.Array,
           weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(total loss, per-head losses) of the model's output; see losses.deep_supervision_loss."""
    return losses.deep_supervision_loss(
        logits, self.scheme.target(label), weight, heads=self.supervised,
        head_weights=self.weights, bce_weight=self.bce_weight, dice_weight=self.dice_weight,
        output_heads=self.output, class_weights=self.class_weights,
        contact_mask=self.scheme.contact_band(label), contact_weight=self.contact_weight,
        lovasz_weight=self.lovasz_weight)

  def metrics(self, *, logits: Sequence[jax.Array], label: jax.Array, loss: jax.Array,
              head_losses: jax.Array, weight: jax.Array | None = None,
              axis_name: str | None = None) -> metrics_lib.SegmentationMetrics:
    """The metrics of one batch (see metrics.from_outputs)."""
    return metrics_lib.from_outputs(
        logits=logits, label=label, loss=loss, head_losses=head_losses, heads=self.supervised,
        output_heads=self.output, weight=weight, axis_name=axis_name)

  def zero_metrics(self) -> metrics_lib.SegmentationMetrics:
    """Zero sums shaped as `metrics` returns them (host numpy): the start of an accumulation.

    The sums do not depend on the batch's shape, so a traced 1x8x8 batch gives their shapes
    without tracing the network.
    """
    def batch_metrics(logits, label):
      loss, head_losses = self.loss(logits, label, jnp.ones(label.shape[:1], jnp.float32))
      return self.metrics(logits=logits, label=label, loss=loss, head_losses=head_losses)

    logits = [jax.ShapeDtypeStruct((1, 8, 8, self.scheme.num_classes), jnp.float32)] * len(
        self.output)
    shapes = jax.eval_shape(batch_metrics, logits, jax.ShapeDtypeStruct((1, 8, 8), jnp.int32))
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)

  def summarize(self, collection: metrics_lib.SegmentationMetrics, prefix: str = '') -> dict:
    """Flat {name: float} of accumulated metrics (see metrics.summarize)."""
    return metrics_lib.summarize(collection, prefix=prefix, output_heads=self.output)

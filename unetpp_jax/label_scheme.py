"""One owner of the label scheme: what the classes of a model's output mean.

1 class (sigmoid) or 2 (softmax) are nucleus vs background; 3 add a boundary class (background /
nucleus interior / boundary, see `losses.semantic_target`) whose probability can split touching
nuclei. Built once from the config, like `heads.Heads`: training takes its target here, prediction
its probability channels, and evaluation its default instance options, so no other module needs
to know which number of classes has a boundary.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax import losses, models

Array = jax.Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class LabelScheme:
  """The classes of one configured model.

  Attributes:
    num_classes: config.model.num_classes: 1 (sigmoid), 2 (softmax: background, nucleus) or 3
      (softmax: background, nucleus interior, boundary).
    contact_width: 3 classes: nucleus pixels within this many pixels of another nucleus join the
      boundary class (config.loss.contact_width; `losses.semantic_target`).
  """
  num_classes: int = 1
  contact_width: int = 0

  @classmethod
  def from_config(cls, config: Any) -> 'LabelScheme':
    return cls(num_classes=config.model.num_classes,
               contact_width=config.loss.get('contact_width', 0))

  @property
  def has_boundary(self) -> bool:
    """Whether the model predicts a boundary class."""
    return self.num_classes == 3

  @property
  def channels(self) -> tuple[str, ...]:
    """The channels of every probability map, in order (`probabilities`)."""
    return ('foreground', 'boundary') if self.has_boundary else ('foreground',)

  def target(self, label: jax.Array) -> jax.Array:
    """The class of each pixel [B, H, W] of an instance map [B, H, W]: what the loss trains."""
    return losses.semantic_target(label, self.num_classes, self.contact_width)

  def contact_band(self, label: jax.Array) -> jax.Array | None:
    """bool [B, H, W]: the target's contact band (`losses.contact_band`), which the loss may
    weigh more; None where the target has none (no boundary class, or contact_width 0)."""
    if not self.has_boundary or self.contact_width <= 0:
      return None
    return losses.contact_band(label, self.contact_width)

  def probabilities(self, logits: jax.Array) -> jax.Array:
    """[..., len(channels)] of logits [..., num_classes]: p(foreground) as the model's metrics
    define it (`models.foreground_probability`, boundary included), then p(boundary)."""
    channels = [models.foreground_probability(logits)]
    if self.has_boundary:
      channels.append(jax.nn.softmax(logits, axis=-1)[..., losses.BOUNDARY])
    return jnp.stack(channels, axis=-1)

  def split(self, probabilities: Array) -> tuple[Array, Array | None]:
    """(p(foreground), p(boundary) or None) of a map [..., len(channels)] of `probabilities`."""
    return probabilities[..., 0], probabilities[..., 1] if self.has_boundary else None

  @property
  def instance_defaults(self) -> dict[str, Any]:
    """The fields of `instances.InstanceOptions` that differ for this scheme's models (applied
    by `instances.default_options`).

    Chosen on the DSB2018 validation split (docs/results.md: "The paper's setting on a CPU" for 1
    class, "Every kind of image, on the grouped split" for 3; docs/evaluation.md lists them). For
    the recipe's 3-class CPU runs the distance watershed of p(foreground) beat the boundary
    markers and the winners' product seeds, dropping nuclei under 30 pixels beat 15 on every
    kind of image, a seed dynamic of a tenth of the median nucleus radius beat a fixed 0.5 or 1
    pixel, and dropping nuclei with a mean p(foreground) under 0.8 gained on tissue and
    brightfield. Fluorescence gained from threshold 0.7 over 0.6; bright-background images
    lost, and kept 0.6 with a seed dynamic of at least 1.5 pixels, which splits their large
    textured nuclei less. Each held for every model measured (python -m
    unetpp_jax.sweep_instances). Seeds in the predicted interior ('interior') gained on bright
    backgrounds for the five models they were chosen on, but not for two recipe seeds trained
    afterwards: the distance seeds stay.
    """
    if self.has_boundary:
      return {'seeds': 'distance', 'threshold': 0.7, 'min_size': 30, 'seed_h_per_radius': 0.1,
              'min_confidence': 0.8, 'bright': {'threshold': 0.6, 'seed_h': 1.5}}
    return {}

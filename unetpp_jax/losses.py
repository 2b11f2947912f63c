"""Per-head cross-entropy + soft Dice (+ Lovasz), the 3-class contact target, deep supervision.

Every per-image quantity is averaged over the images of the batch with example weights, so the loss
of a global batch split over N devices (then averaged with pmean) equals the loss of the whole batch
on one device.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from unetpp_jax import models

DICE_SMOOTH = 1.0  # As in the original UNet++ Keras code; keeps empty images finite.
BOUNDARY = 2  # The boundary class of the 3-class target (`semantic_target`).


def contact_band(label: jax.Array, contact_width: int) -> jax.Array:
  """bool [B, H, W]: nucleus pixels within contact_width pixels (Chebyshev) of another nucleus."""
  # Another instance within the window: the largest or the smallest nonzero id there differs.
  ids = label.astype(jnp.int32)
  window = (1, 2 * contact_width + 1, 2 * contact_width + 1)
  lowest = jnp.iinfo(jnp.int32).min

  def window_max(x):
    return jax.lax.reduce_window(x, lowest, jax.lax.max, window, (1, 1, 1), 'SAME')
  largest = window_max(ids)
  smallest = -window_max(jnp.where(ids > 0, -ids, lowest))
  return ((largest != ids) | (smallest != ids)) & (ids > 0)


def semantic_target(label: jax.Array, num_classes: int, contact_width: int = 0) -> jax.Array:
  """Class map [B, H, W] from an instance map: 0 background, 1 nucleus, 2 boundary (3 classes).

  With three classes, 'boundary' is every nucleus pixel whose 4-neighbour belongs to another
  instance or to the background (a 1-pixel rim around each nucleus), plus, with contact_width = r
  > 0, the `contact_band`: every nucleus pixel within r pixels (Chebyshev) of a pixel of another
  nucleus, a band about 2r pixels wide where nuclei touch or nearly touch, the class that
  separates them. The boundary stays inside the nuclei, so nucleus + boundary is exactly the union
  of the masks.
  """
  foreground = (label > 0).astype(jnp.int32)
  if num_classes <= 2:
    return foreground
  padded = jnp.pad(label, ((0, 0), (1, 1), (1, 1)), mode='edge')
  neighbours = [padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2],
                padded[:, 1:-1, 2:]]
  edge = jnp.any(jnp.stack([n != label for n in neighbours]), axis=0)
  if contact_width > 0:
    edge = edge | contact_band(label, contact_width)
  return jnp.where(edge & (label > 0), BOUNDARY, foreground)


def _weighted_mean(per_image: jax.Array, weight: jax.Array) -> jax.Array:
  return jnp.sum(per_image * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def lovasz(probs: jax.Array, onehot: jax.Array) -> jax.Array:
  """[B] Lovasz-softmax loss (Berman et al., CVPR 2018) of each image: the convex surrogate of
  1 - IoU per class, averaged over the classes present in the image.

  Args:
    probs: [B, H, W, C] class probabilities.
    onehot: [B, H, W, C] the target, one-hot.
  """
  b, c = probs.shape[0], probs.shape[-1]
  errors = jnp.abs(onehot - probs).reshape(b, -1, c).swapaxes(1, 2)  # [B, C, N]
  truth = onehot.reshape(b, -1, c).swapaxes(1, 2)
  order = jnp.argsort(-jax.lax.stop_gradient(errors), axis=-1)
  errors = jnp.take_along_axis(errors, order, axis=-1)
  truth = jnp.take_along_axis(truth, order, axis=-1)
  # The Lovasz extension's gradient: how 1 - IoU grows as the pixels join the prediction's
  # errors in decreasing order of error.
  total = jnp.sum(truth, axis=-1, keepdims=True)
  jaccard = 1.0 - (total - jnp.cumsum(truth, axis=-1)) / (total + jnp.cumsum(1 - truth, axis=-1))
  steps = jnp.concatenate([jaccard[..., :1], jnp.diff(jaccard, axis=-1)], axis=-1)
  per_class = jnp.sum(errors * jax.lax.stop_gradient(steps), axis=-1)  # [B, C]
  present = (total[..., 0] > 0).astype(per_class.dtype)
  return jnp.sum(per_class * present, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1.0)


def head_loss(
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array,
    *,
    bce_weight: float,
    dice_weight: float,
    class_weights: Sequence[float] = (),
    pixel_weight: jax.Array | None = None,
    lovasz_weight: float = 0.0,
) -> jax.Array:
  """bce_weight * cross-entropy + dice_weight * (1 - soft Dice) [+ lovasz_weight * Lovasz] for
  one head.

  Args:
    logits: [B, H, W, C]; C = 1 (sigmoid) or the number of classes (softmax).
    target: [B, H, W] integer classes.
    weight: [B] example weights (0 for padding).
    bce_weight: Weight of the pixel-mean cross-entropy.
    dice_weight: Weight of the soft Dice loss, computed per image (over the foreground classes
      when softmax) and averaged over images.
    class_weights: softmax only: each pixel's cross-entropy is weighted by its target class's
      weight (keeps a thin class such as the boundary from vanishing); () = all 1.
    pixel_weight: optional [B, H, W] factor of each pixel's cross-entropy, on top of
      class_weights (the contact band's weight, see `deep_supervision_loss`).
    lovasz_weight: Weight of the Lovasz loss (`lovasz`) over every class, background included;
      0 = none.
  """
  if logits.shape[-1] == 1:
    logits = logits[..., 0]
    ce = optax.sigmoid_binary_cross_entropy(logits, target.astype(logits.dtype))
    probs = jax.nn.sigmoid(logits)[..., None]
    onehot = target[..., None].astype(logits.dtype)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    if class_weights:
      ce = ce * jnp.asarray(class_weights, ce.dtype)[target]
    # Dice over the foreground classes only: background Dice is near 1 and would dilute it.
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)[..., 1:]
  if pixel_weight is not None:
    ce = ce * pixel_weight.astype(ce.dtype)
  intersection = jnp.sum(probs * onehot, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  dice = jnp.mean((2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH), axis=-1)
  per_image = bce_weight * jnp.mean(ce, axis=(1, 2)) + dice_weight * (1.0 - dice)
  if lovasz_weight:
    if logits.ndim == 3:  # Sigmoid: the foreground and background classes.
      probs = jnp.concatenate([1 - probs, probs], axis=-1)
      onehot = jnp.concatenate([1 - onehot, onehot], axis=-1)
    else:
      probs = jax.nn.softmax(logits, axis=-1)
      onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    per_image = per_image + lovasz_weight * lovasz(probs, onehot)
  return _weighted_mean(per_image, weight)


def deep_supervision_loss(
    logits: Sequence[jax.Array],
    target: jax.Array,
    weight: jax.Array,
    *,
    heads: Sequence[int],
    head_weights: Sequence[float],
    bce_weight: float,
    dice_weight: float,
    output_heads: Sequence[int] | None = None,
    class_weights: Sequence[float] = (),
    contact_mask: jax.Array | None = None,
    contact_weight: float = 1.0,
    lovasz_weight: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Weighted sum of the supervised heads' losses.

  Args:
    logits: Logits of heads 1..k (the model's output).
    target: [B, H, W] integer classes (`LabelScheme.target` of the instance map).
    weight: [B] example weights.
    heads: Supervised heads (1-based).
    head_weights: One weight per supervised head; empty = equal weights summing to 1.
    bce_weight: See `head_loss`.
    dice_weight: See `head_loss`.
    output_heads: The head of each entry of `logits` (`model.output_heads()`); None = 1..k.
    class_weights: See `head_loss`.
    contact_mask: Optional bool [B, H, W], the target's `contact_band`
      (`LabelScheme.contact_band`: 3 classes with contact_width > 0).
    contact_weight: Factor of the cross-entropy of the contact_mask pixels (the weight map of the
      U-Net paper, flat). The band is a few percent of the boundary pixels, most of which are the
      easy rims, so class_weights alone leave it unlearned.

  Returns:
    (total loss, per-head losses [k] of every returned head, supervised or not).
  """
  pixel_weight = None
  if contact_mask is not None and contact_weight != 1.0:
    pixel_weight = jnp.where(contact_mask, contact_weight, 1.0)
  per_head = jnp.stack([
      head_loss(l, target, weight, bce_weight=bce_weight, dice_weight=dice_weight,
                class_weights=class_weights, pixel_weight=pixel_weight,
                lovasz_weight=lovasz_weight) for l in logits
  ])
  if not head_weights:
    head_weights = [1.0 / len(heads)] * len(heads)
  position = models.head_positions(output_heads, len(logits))
  total = sum(w * per_head[position[h]] for h, w in zip(heads, head_weights))
  return total, per_head

"""Losses and metrics on hand-made cases with known answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetpp_jax import losses, metrics

LOSS = dict(bce_weight=1.0, dice_weight=1.0)


def test_semantic_target_boundary_class():
  label = np.zeros((1, 6, 6), np.int32)
  label[0, 1:5, 1:3] = 1  # two touching 4x2 nuclei
  label[0, 1:5, 3:5] = 2
  target = np.asarray(losses.semantic_target(jnp.asarray(label), 3))[0]
  assert target[0].tolist() == [0] * 6
  assert target[2].tolist() == [0, 2, 2, 2, 2, 0]  # every column touches background or the other
  np.testing.assert_array_equal(losses.semantic_target(jnp.asarray(label), 1)[0], label[0] > 0)
  wide = np.zeros((1, 7, 7), np.int32)
  wide[0, 1:6, 1:6] = 1
  inner = np.asarray(losses.semantic_target(jnp.asarray(wide), 3))[0]
  assert inner[3, 3] == 1 and inner[1, 3] == 2 and inner[0, 3] == 0


def test_head_loss_at_zero_logits():
  target = jnp.ones((1, 4, 4), jnp.int32)
  loss = losses.head_loss(jnp.zeros((1, 4, 4, 1)), target, jnp.ones(1), **LOSS)
  dice = (2 * 0.5 * 16 + 1) / (0.5 * 16 + 16 + 1)
  assert float(loss) == pytest.approx(math.log(2) + 1 - dice, rel=1e-5)
  bce_only = losses.head_loss(jnp.zeros((1, 4, 4, 1)), target, jnp.ones(1), bce_weight=1.0,
                              dice_weight=0.0)
  assert float(bce_only) == pytest.approx(math.log(2), rel=1e-5)


def test_perfect_and_inverted_predictions():
  label = np.zeros((2, 8, 8), np.int32)
  label[:, 2:6, 2:6] = 1
  target = jnp.asarray(label)
  perfect = jnp.where(target[..., None] > 0, 20.0, -20.0)
  assert float(losses.head_loss(perfect, target, jnp.ones(2), **LOSS)) < 1e-6
  inverted = -perfect
  # BCE ~ 20 per pixel, Dice ~ 0 (up to the smoothing term).
  assert float(losses.head_loss(inverted, target, jnp.ones(2), **LOSS)) > 20.0


def test_softmax_head_loss_uses_foreground_classes():
  label = np.zeros((1, 6, 6), np.int32)
  label[0, 1:5, 1:5] = 1
  target = losses.semantic_target(jnp.asarray(label), 3)
  perfect = 30.0 * jnp.asarray(np.eye(3)[np.asarray(target)])
  assert float(losses.head_loss(perfect, target, jnp.ones(1), **LOSS)) < 1e-6
  uniform = jnp.zeros((1, 6, 6, 3))
  assert float(losses.head_loss(uniform, target, jnp.ones(1), **LOSS)) > math.log(3)


def test_lovasz_is_one_minus_iou_of_hard_predictions():
  # At the vertices of the cube (hard predictions) the Lovasz extension equals the set function:
  # per image, 1 - IoU of each class present in the target, averaged over those classes.
  rng = np.random.default_rng(3)
  target = rng.integers(0, 3, (2, 6, 7))
  target[1][target[1] == 2] = 1  # Class 2 absent from image 1: left out of its mean.
  predicted = np.where(rng.random((2, 6, 7)) < 0.3, rng.integers(0, 3, (2, 6, 7)), target)
  onehot, hard = np.eye(3)[target], np.eye(3)[predicted]
  expected = []
  for t, p in zip(onehot, hard):
    present = t.sum(axis=(0, 1)) > 0
    iou = (t * p).sum(axis=(0, 1)) / np.maximum(np.maximum(t, p).sum(axis=(0, 1)), 1)
    expected.append(np.mean((1 - iou)[present]))
  np.testing.assert_allclose(losses.lovasz(jnp.asarray(hard), jnp.asarray(onehot)), expected,
                             rtol=1e-6)
  assert float(losses.lovasz(jnp.asarray(onehot), jnp.asarray(onehot)).max()) == 0.0


@pytest.mark.parametrize('classes', [1, 3])
def test_lovasz_weight_adds_the_lovasz_term(classes):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 8, 8, classes)), jnp.float32)
  target = jnp.asarray(rng.integers(0, max(classes, 2), (2, 8, 8)))
  base = losses.head_loss(logits, target, jnp.ones(2), **LOSS)
  with_lovasz = losses.head_loss(logits, target, jnp.ones(2), **LOSS, lovasz_weight=0.5)
  if classes == 1:
    p = jax.nn.sigmoid(logits)
    probs, onehot = jnp.concatenate([1 - p, p], -1), jax.nn.one_hot(target, 2)
  else:
    probs, onehot = jax.nn.softmax(logits), jax.nn.one_hot(target, 3)
  expected = base + 0.5 * jnp.mean(losses.lovasz(probs, onehot))
  assert float(with_lovasz) == pytest.approx(float(expected), rel=1e-6)
  # A step down its gradient lowers it.
  grad = jax.grad(lambda l: losses.head_loss(l, target, jnp.ones(2), bce_weight=0.0,
                                             dice_weight=0.0, lovasz_weight=1.0))(logits)
  stepped = losses.head_loss(logits - 0.5 * grad, target, jnp.ones(2), bce_weight=0.0,
                             dice_weight=0.0, lovasz_weight=1.0)
  assert float(stepped) < float(with_lovasz - base) / 0.5


def test_loss_ignores_padding_and_splits_over_devices():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  target = jnp.asarray(rng.integers(0, 2, (4, 8, 8)))
  whole = losses.head_loss(logits, target, jnp.ones(4), **LOSS)
  halves = [losses.head_loss(logits[s], target[s], jnp.ones(2), **LOSS) for s in (slice(0, 2),
                                                                                  slice(2, 4))]
  assert float(whole) == pytest.approx(float(sum(halves) / 2), rel=1e-6)
  padded = losses.head_loss(
      jnp.concatenate([logits, 5 * logits]), jnp.concatenate([target, 1 - target]),
      jnp.array([1.0] * 4 + [0.0] * 4), **LOSS,
  )
  assert float(padded) == pytest.approx(float(whole), rel=1e-6)


def test_deep_supervision_selects_and_weights_heads():
  rng = np.random.default_rng(1)
  logits = [jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32) for _ in range(3)]
  target = losses.semantic_target(jnp.asarray(rng.integers(0, 3, (2, 8, 8))), 1)
  kwargs = dict(weight=jnp.ones(2), **LOSS)
  total, per_head = losses.deep_supervision_loss(logits, target, heads=(3,), head_weights=(),
                                                 **kwargs)
  assert per_head.shape == (3,)
  assert float(total) == pytest.approx(float(per_head[2]))
  total, per_head = losses.deep_supervision_loss(logits, target, heads=(1, 2, 3), head_weights=(),
                                                 **kwargs)
  assert float(total) == pytest.approx(float(per_head.mean()), rel=1e-6)
  total, _ = losses.deep_supervision_loss(logits, target, heads=(1, 3), head_weights=(0.25, 2.0),
                                          **kwargs)
  assert float(total) == pytest.approx(float(0.25 * per_head[0] + 2.0 * per_head[2]), rel=1e-6)


def _logits_from_masks(masks):
  return [jnp.asarray(np.where(m, 10.0, -10.0)[..., None], jnp.float32) for m in masks]


def test_pooled_and_per_image_iou_differ_as_defined():
  label = np.zeros((2, 4, 4), np.int32)
  label[0, :, :2] = 1  # image 0: 8 true pixels
  label[1, 0, 0] = 1  # image 1: 1 true pixel
  pred = label > 0
  pred = pred.copy()
  pred[1, 0, 1] = True  # image 1: one false positive -> IoU 1/2
  m = metrics.from_outputs(
      logits=_logits_from_masks([pred]), label=jnp.asarray(label), loss=jnp.float32(0.0),
      head_losses=jnp.zeros(1), heads=(1,),
  )
  out = metrics.summarize(m)
  assert out['iou/head1'] == pytest.approx(9 / 10)  # pooled: 9 intersect / 10 union
  assert out['iou_per_image/head1'] == pytest.approx((1 + 0.5) / 2)
  assert out['dice/head1'] == pytest.approx(2 * 9 / (10 + 9))
  assert out['dice_per_image/head1'] == pytest.approx((1 + 2 / 3) / 2)
  assert out['iou/accurate'] == out['iou/head1']


def test_metrics_sum_over_batches_and_ignore_padding():
  rng = np.random.default_rng(2)
  label = rng.integers(0, 2, (6, 8, 8))
  label[5] = 0  # an empty image, predicted empty below
  preds = [rng.random((6, 8, 8)) > 0.5 for _ in range(2)]
  preds[0][5] = False
  preds[1][5] = False

  def collect(sl, weight=None):
    return metrics.from_outputs(
        logits=_logits_from_masks([p[sl] for p in preds]), label=jnp.asarray(label[sl]),
        loss=jnp.float32(1.0), head_losses=jnp.array([1.0, 2.0]), heads=(1, 2), weight=weight,
    )

  whole = metrics.summarize(collect(slice(0, 6)))
  merged = metrics.summarize(collect(slice(0, 2)).merge(collect(slice(2, 6))))
  assert whole == pytest.approx(merged)
  # Padding: a batch whose extra examples have weight 0 gives the same numbers.
  padded = metrics.from_outputs(
      logits=_logits_from_masks([np.concatenate([p, ~p]) for p in preds]),
      label=jnp.asarray(np.concatenate([label, label])), loss=jnp.float32(1.0),
      head_losses=jnp.array([1.0, 2.0]), heads=(1, 2),
      weight=jnp.asarray([1.0] * 6 + [0.0] * 6),
  )
  assert metrics.summarize(padded) == pytest.approx(whole)
  # Independent per-image IoU, with an empty/empty image scoring 1.
  ious = []
  for p, t in zip(preds[0], label > 0):
    union = (p | t).sum()
    ious.append(1.0 if union == 0 else (p & t).sum() / union)
  assert whole['iou_per_image/head1'] == pytest.approx(np.mean(ious), rel=1e-6)
  assert whole['loss/head2'] == pytest.approx(2.0)

"""The DSB2018 score on hand-made cases with known answers and against a plain implementation."""

import numpy as np
import pytest

from unetpp_jax.evaluation import official_metric as om


def _boxes(shape, *boxes):
  """Label map with object k+1 = boxes[k] = (y0, y1, x0, x1); later boxes overwrite earlier."""
  label = np.zeros(shape, np.int32)
  for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
    label[y0:y1, x0:x1] = k
  return label


def _score(true, pred):
  return om.evaluate_image(true, pred).score


TRUE = _boxes((40, 40), (2, 10, 2, 10), (20, 30, 5, 15), (5, 15, 25, 35))


def test_perfect_prediction_scores_one_whatever_the_ids():
  assert _score(TRUE, TRUE) == 1.0
  renumbered = np.where(TRUE > 0, 100 - 7 * TRUE, 0)  # Other, non-consecutive ids.
  assert _score(TRUE, renumbered) == 1.0


def test_empty_images():
  empty = np.zeros((8, 8), np.int32)
  assert _score(empty, empty) == 1.0  # Nothing to find, nothing found.
  assert _score(empty, _boxes((8, 8), (0, 2, 0, 2))) == 0.0
  assert _score(_boxes((8, 8), (0, 2, 0, 2)), empty) == 0.0
  result = om.evaluate_image(empty, empty)
  assert result.f1_50 == 1.0 and result.num_true == result.num_pred == 0


def test_missed_object():
  pred = np.where(TRUE == 3, 0, TRUE)  # 2 of 3 found exactly: TP 2, FN 1 at every threshold.
  assert _score(TRUE, pred) == pytest.approx(2 / 3)
  assert om.evaluate_image(TRUE, pred).f1_50 == pytest.approx(4 / 5)


def test_extra_object():
  pred = TRUE.copy()
  pred[32:38, 32:38] = 9  # TP 3, FP 1.
  assert _score(TRUE, pred) == pytest.approx(3 / 4)


def test_one_nucleus_split_in_two():
  true = _boxes((10, 10), (0, 10, 0, 10))
  halves = _boxes((10, 10), (0, 10, 0, 5), (0, 10, 5, 10))  # IoU exactly 0.5: not > 0.5.
  assert _score(true, halves) == 0.0
  uneven = _boxes((10, 10), (0, 10, 0, 7), (0, 10, 7, 10))  # IoU 0.7 and 0.3.
  # t = 0.50..0.65 (4 thresholds): TP 1, FP 1 -> 1/2; t >= 0.70: TP 0, FP 2, FN 1 -> 0.
  assert _score(true, uneven) == pytest.approx(4 * 0.5 / 10)


def test_two_nuclei_merged():
  true = _boxes((10, 10), (0, 10, 0, 6), (0, 10, 6, 10))
  merged = _boxes((10, 10), (0, 10, 0, 10))  # IoU 0.6 with the first, 0.4 with the second.
  # t = 0.50, 0.55: TP 1, FN 1 -> 1/2; t = 0.60 (IoU equal, not greater) and up: 0.
  result = om.evaluate_image(true, merged)
  np.testing.assert_array_equal(result.tp, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  assert result.score == pytest.approx(0.1)


def test_partial_overlap_counts_thresholds_below_the_iou():
  true = _boxes((10, 10), (0, 10, 0, 10))
  pred = _boxes((10, 10), (0, 10, 0, 8))  # IoU 0.8: matched at 0.50 .. 0.75 (6 thresholds).
  assert _score(true, pred) == pytest.approx(0.6)


def test_label_map_without_background():
  true = np.ones((4, 4), np.int32)
  assert _score(true, true * 5) == 1.0
  assert om.iou_matrix_counts(true, true)[2:] == (1, 1)


def test_summarize_means_over_images_and_pools_counts():
  perfect = om.evaluate_image(TRUE, TRUE)
  missed = om.evaluate_image(TRUE, np.where(TRUE == 3, 0, TRUE))
  summary = om.summarize([perfect, missed])
  assert summary['score'] == pytest.approx((1 + 2 / 3) / 2)
  assert summary['ap_per_threshold'] == pytest.approx([(1 + 2 / 3) / 2] * 10)
  assert summary['thresholds'] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
  assert summary['ap50'] == pytest.approx((1 + 2 / 3) / 2)
  assert summary['f1_50'] == pytest.approx((1 + 4 / 5) / 2)
  assert (summary['tp50'], summary['fp50'], summary['fn50']) == (5, 0, 1)
  assert summary['f1_50_pooled'] == pytest.approx(10 / 11)
  assert (summary['num_images'], summary['num_true'], summary['num_pred']) == (2, 6, 5)
  with pytest.raises(ValueError, match='No images'):
    om.summarize([])


def _reference_precisions(true, pred):
  """A straightforward version: a boolean mask per object, every pair's IoU as a float, and the
  matching as in Kaggle's example kernel (a true object is a TP if exactly one prediction matches
  it, a prediction is an FP if it matches nothing, a true object an FN if nothing matches it)."""
  true_ids = [i for i in np.unique(true) if i != 0]
  pred_ids = [i for i in np.unique(pred) if i != 0]
  iou = np.zeros((len(true_ids), len(pred_ids)))
  for a, i in enumerate(true_ids):
    for b, j in enumerate(pred_ids):
      t, p = true == i, pred == j
      iou[a, b] = np.sum(t & p) / np.sum(t | p)
  precisions = []
  for threshold in np.arange(0.5, 1.0, 0.05).round(2):
    matches = iou > threshold
    tp = np.sum(np.sum(matches, axis=1) == 1)
    fp = np.sum(np.sum(matches, axis=0) == 0)
    fn = np.sum(np.sum(matches, axis=1) == 0)
    precisions.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
  return np.array(precisions)


def _random_label_map(rng, shape, count):
  label = np.zeros(shape, np.int32)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  for k in range(1, count + 1):
    cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
    ry, rx = rng.uniform(2, 7, size=2)
    label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
  return label


def _perturb(rng, label):
  """Shifted, partly dropped, relabelled and with extra objects: a realistic prediction."""
  pred = np.roll(label, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
  ids = np.unique(pred)[1:]
  dropped = rng.choice(ids, size=len(ids) // 4, replace=False) if len(ids) else []
  pred[np.isin(pred, dropped)] = 0
  extra = _random_label_map(rng, label.shape, int(rng.integers(0, 4)))
  pred = np.where((extra > 0) & (pred == 0), extra + 1000, pred)
  return np.where(pred > 0, pred * 7 + 3, 0)


def test_matches_straightforward_implementation_on_random_label_maps():
  rng = np.random.default_rng(0)
  for trial in range(30):
    shape = tuple(int(s) for s in rng.integers(20, 48, size=2))
    true = _random_label_map(rng, shape, int(rng.integers(0, 12)))
    pred = _perturb(rng, true) if trial % 5 else _random_label_map(rng, shape, 6)
    np.testing.assert_allclose(om.evaluate_image(true, pred).precision,
                               _reference_precisions(true, pred), rtol=0, atol=1e-12)


def test_score_files_counts_missing_images_as_false_negatives(tmp_path):
  solution = tmp_path / 'solution.csv'
  solution.write_text('ImageId,EncodedPixels,Height,Width,Usage\n'
                      'a,1 4,4,4,Public\n'        # a: two objects, both predicted exactly.
                      'a,9 4,4,4,Public\n'
                      'b,1 2,4,4,Private\n'       # b: missing from the submission.
                      'c,,4,4,Private\n')         # c: no nuclei, predicted empty.
  submission = tmp_path / 'submission.csv'
  submission.write_text('ImageId,EncodedPixels\na,9 4\na,1 4\nc,\n')
  result = om.score_files(submission, solution)
  assert result['score'] == pytest.approx((1 + 0 + 1) / 3)
  assert result['ap_per_threshold'] == pytest.approx([2 / 3] * 10)
  assert (result['tp50'], result['fp50'], result['fn50']) == (2, 0, 1)
  assert result['num_images'] == 3 and result['missing_from_submission'] == ['b']

  submission.write_text('ImageId,EncodedPixels\na,1 4\nzzz,1 1\n')
  with pytest.raises(ValueError, match=f'{submission} has 1 ImageId.* not in {solution}: zzz'):
    om.score_files(submission, solution)
  submission.write_text('ImageId,EncodedPixels\na,1 4\na,4 2\n')
  with pytest.raises(ValueError, match=f'{submission}, line 3 .ImageId a.: the mask overlaps'):
    om.score_files(submission, solution)


def test_touching_recall_counts_touching_nuclei_found_as_their_own_instance():
  true = np.zeros((7, 12), np.int32)
  true[1:4, 1:4] = 5   # 5 and 8 share an edge; 8 and 9 share only a corner; 2 touches nothing.
  true[1:4, 4:7] = 8
  true[4:6, 7:9] = 9
  true[0, 10:12] = 2
  consecutive = np.searchsorted([0, 2, 5, 8, 9], true)  # Ids 0, 2, 5, 8, 9 -> 0..4.
  np.testing.assert_array_equal(om.touching(consecutive, 4), [False, True, True, True])
  merged = np.where(true == 8, 5, true)  # 5 and 8 predicted as one nucleus: both are lost.
  result = om.evaluate_image(true, merged)
  assert (result.touching_true, result.touching_found) == (3, 1)
  exact = om.evaluate_image(true, true)
  assert (exact.touching_true, exact.touching_found) == (3, 3)
  empty = om.evaluate_image(np.zeros((3, 3), int), np.zeros((3, 3), int))
  summary = om.summarize([result, exact, empty])
  assert (summary['touching_true'], summary['touching_found50']) == (6, 4)
  assert summary['touching_recall50'] == pytest.approx(4 / 6)  # Pooled: sums before dividing.

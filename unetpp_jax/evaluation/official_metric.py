"""The Data Science Bowl 2018 score: mean over images of the mean over IoU thresholds of
TP / (TP + FP + FN).

For one image with true objects T and predicted objects P (instance label maps, 0 = background) and
each threshold t in 0.50, 0.55, ..., 0.95, a predicted object matches a true object when their IoU
is strictly greater than t. Since t >= 0.5, an object matches at most one other (two disjoint
objects cannot both cover more than half of it), so the matching is unique without any assignment
problem:
  TP(t) = number of matched pairs, FP(t) = |P| - TP(t), FN(t) = |T| - TP(t),
  precision(t) = TP / (TP + FP + FN),   image score = mean over the 10 thresholds,
  dataset score = mean of the image scores (every image weighs the same, whatever its size).
IoUs are compared as integers (100 * intersection > t_percent * union), so an IoU exactly equal to a
threshold never matches, free of floating-point rounding.

Conventions (the Kaggle metric leaves them implicit):
  * An image with neither true nor predicted objects scores 1 at every threshold (nothing to find,
    nothing wrongly found); with objects on one side only it scores 0.
  * Label values need not be consecutive; each distinct nonzero value is one object, whatever its
    shape (a disconnected object stays one object).
  * AP at 0.5 (`ap50`) is the mean over images of precision(0.5); `f1_50` the mean over images of
    2 TP / (2 TP + FP + FN) at 0.5 (1 for an empty/empty image); `tp50`, `fp50`, `fn50` are summed
    over the dataset and `f1_50_pooled` is the F1 of those sums.

Not part of the official score, but what a contact-aware model is for: `touching_recall50` is the
fraction of true nuclei that touch another true nucleus (8-neighbourhood) and are found as their
own instance (a prediction with IoU > 0.5), pooled over the dataset (`touching_found50` /
`touching_true`). Merging two touching nuclei loses both.

`score_files` applies the metric to a Kaggle submission file and a solution file (see `rle` for the
formats); `python -m unetpp_jax.score` is its command line.
"""

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
from absl import logging

from unetpp_jax.evaluation import rle

THRESHOLD_PERCENTS = np.arange(50, 100, 5)  # 0.50, 0.55, ..., 0.95 as integer percentages.
THRESHOLDS = [round(float(p) / 100, 2) for p in THRESHOLD_PERCENTS]


def _consecutive(label: np.ndarray) -> tuple[np.ndarray, int]:
  """Label map renumbered 0..n (0 stays background) and the number n of objects."""
  values, inverse = np.unique(label, return_inverse=True)
  if values[0] != 0:  # No background: shift so that object ids start at 1.
    inverse = inverse + 1
  return inverse.reshape(-1), len(values) - int(values[0] == 0)


def iou_matrix_counts(true: np.ndarray, pred: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Intersections and unions [n_true, n_pred] of every pair of objects, as int64 counts.

  Computed from the contingency table of the two label maps (one bincount over all pixels).
  """
  if true.shape != pred.shape:
    raise ValueError(f'True and predicted label maps differ in shape: {true.shape} vs '
                     f'{pred.shape}.')
  t, n_true = _consecutive(true)
  p, n_pred = _consecutive(pred)
  table = np.bincount(t * (n_pred + 1) + p, minlength=(n_true + 1) * (n_pred + 1))
  table = table.reshape(n_true + 1, n_pred + 1).astype(np.int64)
  area_true, area_pred = table.sum(axis=1)[1:], table.sum(axis=0)[1:]
  intersection = table[1:, 1:]
  union = area_true[:, None] + area_pred[None, :] - intersection
  return intersection, union, n_true, n_pred


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """Matching counts of one image at each threshold (arrays of len(THRESHOLDS))."""
  num_true: int
  num_pred: int
  tp: np.ndarray
  touching_true: int = 0  # True objects touching another true object.
  touching_found: int = 0  # Those matched at IoU > 0.5.

  @property
  def fp(self) -> np.ndarray:
    return self.num_pred - self.tp

  @property
  def fn(self) -> np.ndarray:
    return self.num_true - self.tp

  @property
  def precision(self) -> np.ndarray:
    """TP / (TP + FP + FN) per threshold; 1 when the image has no objects on either side."""
    denominator = self.tp + self.fp + self.fn
    return np.where(denominator > 0, self.tp / np.maximum(denominator, 1), 1.0)

  @property
  def score(self) -> float:
    return float(np.mean(self.precision))

  @property
  def f1_50(self) -> float:
    denominator = 2 * self.tp[0] + self.fp[0] + self.fn[0]
    return float(2 * self.tp[0] / denominator) if denominator else 1.0


def touching(label: np.ndarray, num_objects: int) -> np.ndarray:
  """bool [num_objects]: which objects 1..num_objects of a consecutive label map [H, W] touch
  another object (share an edge or a corner with it)."""
  flags = np.zeros(num_objects + 1, bool)
  h, w = label.shape
  # Each pixel against its right, lower, lower-right and lower-left neighbours covers all 8.
  for a, b in ((label[:, :w - 1], label[:, 1:]), (label[:h - 1], label[1:]),
               (label[:h - 1, :w - 1], label[1:, 1:]), (label[:h - 1, 1:], label[1:, :w - 1])):
    contact = (a > 0) & (b > 0) & (a != b)
    flags[a[contact]] = flags[b[contact]] = True
  return flags[1:]


def evaluate_image(true: np.ndarray, pred: np.ndarray) -> ImageResult:
  """Matches the objects of two instance label maps [H, W] (0 = background)."""
  intersection, union, n_true, n_pred = iou_matrix_counts(true, pred)
  # IoU > t  <=>  100 * intersection > t% * union (exact in integers). Pairs with no overlap never
  # match, so only the nonzero entries matter.
  rows, cols = np.nonzero(intersection)
  inter, uni = intersection[rows, cols], union[rows, cols]
  tp = np.array([np.count_nonzero(100 * inter > p * uni) for p in THRESHOLD_PERCENTS])
  touches = touching(_consecutive(true)[0].reshape(true.shape), n_true)
  found = np.zeros(n_true, bool)
  found[rows[100 * inter > THRESHOLD_PERCENTS[0] * uni]] = True
  return ImageResult(n_true, n_pred, tp, int(touches.sum()), int((touches & found).sum()))


def summarize(results: Iterable[ImageResult]) -> dict[str, float | int | list[float]]:
  """Dataset metrics (see the module docstring) of per-image results."""
  results = list(results)
  if not results:
    raise ValueError('No images to score.')
  precision = np.stack([r.precision for r in results])  # [images, thresholds]
  tp = int(sum(r.tp[0] for r in results))
  fp = int(sum(r.fp[0] for r in results))
  fn = int(sum(r.fn[0] for r in results))
  touching_true = sum(r.touching_true for r in results)
  touching_found = sum(r.touching_found for r in results)
  return {
      'score': float(precision.mean()),
      'ap_per_threshold': [float(x) for x in precision.mean(axis=0)],
      'thresholds': THRESHOLDS,
      'ap50': float(precision[:, 0].mean()),
      'f1_50': float(np.mean([r.f1_50 for r in results])),
      'f1_50_pooled': 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
      'tp50': tp,
      'fp50': fp,
      'fn50': fn,
      'num_images': len(results),
      'num_true': int(sum(r.num_true for r in results)),
      'num_pred': int(sum(r.num_pred for r in results)),
      'touching_true': touching_true,
      'touching_found50': touching_found,
      'touching_recall50': touching_found / touching_true if touching_true else 1.0,
  }


def score_files(submission: str | os.PathLike[str], solution: str | os.PathLike[str]) -> dict:
  """The official metrics of a submission file against a solution file.

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: malformed file, or submission ids absent from the solution (named in the message).
  """
  truth = rle.read_csv(solution, require_shape=True)
  predicted = rle.read_csv(submission, require_shape=False)
  extra = sorted(set(predicted) - set(truth))
  if extra:
    raise ValueError(f'{submission} has {len(extra)} ImageId(s) that are not in {solution}: '
                     f'{rle.describe_ids(extra)}.')
  missing = sorted(set(truth) - set(predicted))
  if missing:
    logging.warning('%d solution image(s) missing from %s count as all false negatives: %s',
                    len(missing), submission, rle.describe_ids(missing))
  results = []
  for image_id, rows in truth.items():
    true = rows.label_map(solution)
    empty = rle.ImageRows(image_id, [], [], rows.shape)
    pred = predicted.get(image_id, empty).label_map(submission, rows.shape)
    results.append(evaluate_image(true, pred))
  return {**summarize(results), 'missing_from_submission': missing}

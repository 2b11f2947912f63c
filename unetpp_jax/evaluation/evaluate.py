r"""Evaluates a trained U-Net++ as the DSB2018 leaderboard does: full-size images, instances, score.

The library behind `python -m unetpp_jax.evaluate` (flags there). Loads the config and the
newest checkpoint (or `step`) of a training workdir (`unetpp_jax.workdir`), predicts every image
of `data` (a Kaggle-layout folder or zip, read by `unetpp_jax.data.release`) at its native size
(`predict`), turns the probabilities into nuclei (`instances`) and scores them
(`official_metric`). Labels come from the masks in `data`, or from a solution CSV (run-length
encoded, see `rle`), which then takes precedence. split='validation' keeps only the images that
training held out: the ids training recorded in the workdir (for older workdirs, the last
`data.val_fraction` of the TFDS builder's order, which prepares the dataset).

Native-size inference (`InferenceOptions.strategy`; every strategy compiles the network for very
few shapes; see `predict` and, for how they compare, docs/evaluation.md):
  resize  each image is resized to the training size (config.data.image_size, bilinear with
          antialiasing, as the training pipeline) and the probabilities are resized back
          (bilinear). One compiled shape; the nuclei have the scale the model was trained on.
  pad     the whole image at native resolution, reflect-padded at the bottom/right up to a
          multiple of `pad_multiple` (128: the 9 DSB2018 image sizes need 8 compiles); memory
          grows with the image.
  tile    fixed `tile_size` tiles with `tile_overlap` pixels of overlap (images smaller than a
          tile are reflect-padded), blended with weights that fall off linearly towards tile
          edges. One compiled shape and bounded memory, for images too large to pad.
  auto    (default) 'resize' for models trained with data.train_preprocess='resize', 'pad' for
          those trained on native-resolution crops ('crop'): the scale the model was trained at.

Predictions: heads 1..k of the network pruned to level k (`prune_level`; head j computed by the
pruned network equals head j of the full one, so head j's metrics are those of pruning level j in
'fast' mode), plus the final prediction: 'accurate' (mean probability of the supervised heads <= k)
or 'fast' (head k alone). `flips` averages the probabilities of the 4 flips of each input. Every
prediction gets semantic metrics (IoU and Dice of its foreground above the instance options'
threshold, which differs from training's 0.5 in `metrics`; pooled over all pixels and mean over
images) and the official score, from its own instances.

Outputs in `output` (written to a temporary folder beside it, renamed only once complete; an
existing `output` is replaced only if it is empty or an earlier evaluation, with a metrics.json):
  metrics.json    all metrics per prediction, plus the settings and checkpoint step.
  per_image.csv   per image (final prediction): id, size, object counts and matches at IoU 0.5,
                  IoU, Dice, official score.
  submission.csv  the final prediction's nuclei in Kaggle's format (scorable by
                  `python -m unetpp_jax.score`).
  overlays/*.png  a sample of images with predicted (green) and true (red) contours; also written
                  with the scalar metrics as TensorBoard events into `output`.
"""

import collections
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from skimage import segmentation

from unetpp_jax import cli, writers
from unetpp_jax.data import release, splits
from unetpp_jax.evaluation import instances, official_metric, rle
# Re-exported: callers of `evaluate` pass InferenceOptions and may predict or load themselves.
from unetpp_jax.evaluation.predict import (InferenceOptions, Predictor, load_variables,
                                           weights_name)
from unetpp_jax.workdir import Workdir

SPLITS = ('all', 'train', 'validation')


# ----------------------------------------------------------------------------------------------
# The training run: its config and its splits.


def load_config(workdir: str | os.PathLike[str],
                defaults: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The training run's config (`Workdir.read_config`; `defaults` fill fields it lacks)."""
  return Workdir(workdir).read_config(defaults)


def config_defaults() -> dict[str, Any]:
  """Values of config fields missing from an older run's config: configs/dsb_paper.py's.

  An installed package holds configs/ as `unetpp_jax.configs`; in a clone that is not installed,
  `configs` is the folder at the repository root (on the path when a command runs from there).
  """
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    from unetpp_jax.configs import dsb_paper
  except ModuleNotFoundError:
    from configs import dsb_paper
  return dsb_paper.get_config().to_dict()


def workdir_split_ids(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                      split: str) -> list[str]:
  """Ids of the run's 'validation' split as training recorded them in the workdir; for 'train',
  or workdirs of runs older than that record, from the TFDS builder (`split_ids`)."""
  recorded = Workdir(workdir).validation_ids() if split == 'validation' else None
  return split_ids(config, split) if recorded is None else recorded


# ----------------------------------------------------------------------------------------------
# Data: which images, and their labels.


def split_ids(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """Ids of the training run's 'train' or 'validation' split (the TFDS builder's order).

  Prepares the dataset if needed (and needs tensorflow); see `workdir_split_ids`.
  """
  cli.import_tensorflow_quietly()  # Without TensorFlow's start-up notices.
  from unetpp_jax.data import builders, tfds_source  # pylint: disable=g-import-not-at-top
  _, ids = tfds_source.read_split(builders.load_builder(config), config)
  return ids.val if split == 'validation' else ids.train


def select_ids(data: str | os.PathLike[str], wanted: Sequence[str] | None,
               solution: dict[str, rle.ImageRows] | None, solution_path: str | None
               ) -> list[str]:
  """The ids to evaluate, after checking that PATH, the split and the solution agree."""
  available = release.list_ids(data)
  ids = available
  if wanted is not None:
    missing = sorted(set(wanted) - set(available))
    if missing:
      raise ValueError(f'{data} lacks {len(missing)} image(s) of the requested split: '
                       f'{rle.describe_ids(missing)}.')
    ids = sorted(wanted)
  if solution is not None:
    unknown = sorted(set(solution) - set(available))
    if unknown:
      raise ValueError(f'{solution_path} has ImageIds with no image in {data}: '
                       f'{rle.describe_ids(unknown)}.')
    unlabelled = sorted(set(ids) - set(solution))
    if unlabelled:
      raise ValueError(f'{solution_path} has no rows for {len(unlabelled)} image(s) of {data}: '
                       f'{rle.describe_ids(unlabelled)} (an image without nuclei needs one row '
                       'with empty EncodedPixels).')
    for image_id in ids:  # Finds malformed rows now rather than after hours of inference.
      solution[image_id].label_map(solution_path)
  return ids


def _examples(data: str | os.PathLike[str], ids: Sequence[str],
              solution: dict[str, rle.ImageRows] | None, solution_path: str | None
              ) -> Iterator[dict[str, Any]]:
  for example in release.iter_examples(data, ids=set(ids)):
    if solution is not None:
      rows = solution[example['id']]
      shape = example['image'].shape[:2]
      if rows.shape != shape:
        raise ValueError(f'{solution_path}: ImageId {example["id"]} is {rows.shape[0]}x'
                         f'{rows.shape[1]} (Height x Width) but its image in {data} is '
                         f'{shape[0]}x{shape[1]}.')
      example['label'] = rows.label_map(solution_path)
    yield example


# ----------------------------------------------------------------------------------------------
# Metrics.


class Accumulator:
  """Semantic sums and official-metric results of one prediction over the whole set.

  The conventions of `metrics.SegmentationSums`, but on the host in Python integers: native-size
  images have too many pixels for float32 sums to stay exact.
  """

  def __init__(self):
    self.intersection = self.predicted = self.true = 0  # Python ints: exact for any set size.
    self.image_iou, self.image_dice, self.official = [], [], []

  def add(self, pred_mask: np.ndarray, true_mask: np.ndarray, pred_label: np.ndarray,
          true_label: np.ndarray) -> tuple[float, float, official_metric.ImageResult]:
    inter = int(np.count_nonzero(pred_mask & true_mask))
    p, t = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(true_mask))
    # As `metrics`: an image with neither predicted nor true foreground scores 1.
    iou = inter / (p + t - inter) if p + t else 1.0
    dice = 2 * inter / (p + t) if p + t else 1.0
    result = official_metric.evaluate_image(true_label, pred_label)
    self.intersection, self.predicted, self.true = (self.intersection + inter, self.predicted + p,
                                                    self.true + t)
    self.image_iou.append(iou)
    self.image_dice.append(dice)
    self.official.append(result)
    return iou, dice, result

  def summary(self) -> dict[str, Any]:
    union = self.predicted + self.true - self.intersection
    total = self.predicted + self.true
    return {
        'iou': self.intersection / union if union else 1.0,
        'dice': 2 * self.intersection / total if total else 1.0,
        'iou_per_image': float(np.mean(self.image_iou)),
        'dice_per_image': float(np.mean(self.image_dice)),
        **official_metric.summarize(self.official),
    }


def _kind_summary(rows: Sequence[tuple[float, float, official_metric.ImageResult]]
                  ) -> dict[str, Any]:
  """The official metric and mean per-image IoU / Dice of one kind of image's
  (iou, dice, result)."""
  return {**official_metric.summarize([r for _, _, r in rows]),
          'iou_per_image': float(np.mean([iou for iou, _, _ in rows])),
          'dice_per_image': float(np.mean([dice for _, dice, _ in rows]))}


def overlay(image: np.ndarray, true_label: np.ndarray, pred_label: np.ndarray) -> np.ndarray:
  """The image with true contours in red, predicted ones in green (yellow where they coincide)."""
  out = image.copy()
  true_edge = segmentation.find_boundaries(true_label, mode='inner')
  pred_edge = segmentation.find_boundaries(pred_label, mode='inner')
  out[true_edge] = (255, 0, 0)
  out[pred_edge] = (0, 255, 0)
  out[true_edge & pred_edge] = (255, 255, 0)
  return out


PER_IMAGE_COLUMNS = ('id', 'kind', 'height', 'width', 'num_true', 'num_pred', 'tp50', 'fp50',
                     'fn50', 'iou', 'dice', 'score')


# ----------------------------------------------------------------------------------------------
# The whole evaluation.


def evaluate(
    workdir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    solution: str | os.PathLike[str] | None = None,
    split: str = 'all',
    step: int | None = None,
    average: bool = True,
    inference: InferenceOptions = InferenceOptions(),
    instance_options: instances.InstanceOptions | None = None,
    num_overlays: int = 16,
    config_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Evaluates the checkpoint of `workdir` on the images of `data`; writes `output` (see module).

  Args:
    workdir: Training workdir (see `unetpp_jax.workdir`).
    data: Kaggle-layout folder or zip.
    output: Folder for the results; replaced only once everything has been written.
    solution: Optional solution CSV providing the labels instead of the masks in `data`.
    split: 'all' images of `data`, or only those of the training run's 'train'/'validation'.
    step: Checkpoint step; None = the newest.
    average: Predict with the moving average of the weights where the checkpoint holds one.
    inference: How the network runs on native-size images.
    instance_options: Probabilities -> instances; None = `instances.default_options` of the
      model's label scheme.
    num_overlays: Number of images (evenly spread over the sorted ids) drawn with contours.
    config_defaults: Values of config fields missing from an older run's config.

  Returns:
    The contents of metrics.json.

  Raises:
    FileNotFoundError, ValueError: bad inputs, with messages naming the file or image id.
  """
  start = time.time()
  if split not in SPLITS:
    raise ValueError(f'--split must be one of {SPLITS}, got {split!r}.')
  config = load_config(workdir, config_defaults)
  output = pathlib.Path(output).absolute()
  if output.is_dir() and any(output.iterdir()) and not (output / 'metrics.json').exists():
    raise FileExistsError(f'--output {output} holds files but no metrics.json: evaluate replaces '
                          'its output folder, and this is not an earlier evaluation. Name a new '
                          'or empty folder.')
  if not pathlib.Path(data).exists():
    raise FileNotFoundError(f'--data {data} does not exist.')
  # The checkpoint first: a workdir without one is the error to report, not its data's.
  variables, step = load_variables(workdir, config, step, average)
  # Named now: training may delete this checkpoint while the images are predicted.
  weights = weights_name(workdir, step, average)
  truth = rle.read_csv(solution, require_shape=True) if solution else None
  wanted = None if split == 'all' else workdir_split_ids(workdir, config, split)
  ids = select_ids(data, wanted, truth, solution)
  predictor = Predictor(config, variables, inference)
  if instance_options is None:
    instance_options = instances.default_options(predictor.scheme)
  logging.info('Evaluating step %d of %s on %d images of %s (%s, strategy %s).', step, workdir,
               len(ids), data, predictor.mode, predictor.strategy)

  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.incomplete-', dir=output.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output folder's mode.
  try:
    overlay_ids = {ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, num_overlays).round()
                                             .astype(int))} if num_overlays > 0 else set()
    (tmp / 'overlays').mkdir()
    writer = writers.create_default_writer(str(tmp))
    accumulators = {name: Accumulator() for name in predictor.names}
    by_kind = collections.defaultdict(list)  # kind -> the final prediction's (iou, dice, result).
    submission, per_image = [], []
    any_label = False
    for n, (example, probs) in enumerate(predictor.predict(_examples(data, ids, truth, solution))):
      true_label = example['label'].astype(np.int32)
      true_mask = true_label > 0
      any_label |= bool(true_mask.any())
      options = instance_options.for_background(splits.bright_background(example['image']))
      for name, p in zip(predictor.names, probs):
        foreground, boundary = predictor.scheme.split(p)
        pred_label = instances.to_instances(foreground, boundary, options)
        iou, dice, result = accumulators[name].add(
            foreground > options.threshold, true_mask, pred_label, true_label)
      # The loop leaves the final prediction's values in pred_label, iou, dice and result.
      kind = splits.image_kind(example['image'], true_label)
      by_kind[kind].append((iou, dice, result))
      submission.extend(rle.submission_rows(example['id'], pred_label))
      height, width = true_label.shape
      per_image.append((example['id'], kind, height, width, result.num_true, result.num_pred,
                        int(result.tp[0]), int(result.fp[0]), int(result.fn[0]),
                        f'{iou:.6f}', f'{dice:.6f}', f'{result.score:.6f}'))
      if example['id'] in overlay_ids:
        picture = overlay(example['image'], true_label, pred_label)
        Image.fromarray(picture).save(tmp / 'overlays' / f'{example["id"]}.png')
        writer.write_images(step, {f'overlay/{example["id"]}': picture[None]})
      if (n + 1) % 10 == 0:
        logging.info('%d/%d images, %.0f s.', n + 1, len(ids), time.time() - start)
    if not any_label:
      logging.warning('No image of %s has any true nucleus (no masks and no --solution?): the '
                      'metrics compare against empty labels.', data)

    results = {name: acc.summary() for name, acc in accumulators.items()}
    final = results[predictor.mode]
    report = {
        'score': final['score'], 'ap50': final['ap50'], 'f1_50': final['f1_50'],
        'iou': final['iou'], 'dice': final['dice'],
        'touching_recall50': final['touching_recall50'],
        'final_prediction': predictor.mode,
        'per_kind': {kind: _kind_summary(by_kind[kind]) for kind in splits.KINDS
                     if by_kind[kind]},
        'predictions': results,
        'num_images': len(ids),
        'workdir': str(workdir), 'checkpoint_step': step,
        'weights': weights, 'data': str(data),
        'solution': str(solution) if solution else None, 'split': split,
        'inference': {**dataclasses.asdict(inference), 'strategy': predictor.strategy,
                      'mode': predictor.mode, 'prune_level': predictor.level,
                      'final_heads': predictor.final_heads},
        'instances': dataclasses.asdict(instance_options),
        'seconds': round(time.time() - start, 1),
    }
    (tmp / 'metrics.json').write_text(json.dumps(report, indent=2) + '\n')
    rle.write_csv(tmp / 'submission.csv', submission)
    rle.write_csv(tmp / 'per_image.csv', per_image, header=PER_IMAGE_COLUMNS)
    writer.write_scalars(step, {
        f'{name}/{key}': value for name, values in results.items()
        for key, value in values.items() if isinstance(value, (int, float))})
    writer.close()
    _replace_dir(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
  """Renames `new` to `target`, replacing an existing `target` only after `new` is complete."""
  if target.exists():
    old = target.with_name(f'.{target.name}.old-{os.getpid()}')
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)
  else:
    new.rename(target)

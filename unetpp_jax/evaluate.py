r"""Evaluates a trained U-Net++ as the DSB2018 leaderboard does: full-size images, instances, score.

  python -m unetpp_jax.evaluate --workdir=W --data=PATH --output=DIR \
      [--solution=SOL.csv] [--split=all|train|validation] [--mode=accurate|fast] [--prune_level=k] \
      [--flips] [--strategy=auto|resize|pad|tile] [--step=N]

Loads W/config.json and the newest checkpoint in W/checkpoints (or --step), predicts every image of
PATH (a Kaggle-layout folder or zip, read by `datasets.kaggle`) at its native size, turns the
probabilities into nuclei (`instances`) and scores them (`official_metric`). Labels come from the
masks in PATH, or from --solution (a run-length-encoded CSV, see `rle`), which then takes
precedence.
--split=validation keeps only the images of the training run's validation split (the last
`data.val_fraction` of the TFDS builder's order, exactly the images that training held out).

Native-size inference (--strategy; every strategy compiles the network for very few shapes):
  resize  each image is resized to the training size (config.data.image_size, bilinear with
          antialiasing, as the training pipeline) and the probabilities are resized back
          (bilinear). One compiled shape; the nuclei have the scale the model was trained on.
  pad     the whole image at native resolution, reflect-padded at the bottom/right up to a
          multiple of --pad_multiple (128: the 9 DSB2018 image sizes need 8 compiles); memory
          grows with the image (about 3.3 GB resident for 1040x1388 with configs/dsb.py's model).
  tile    fixed --tile_size tiles with --tile_overlap pixels of overlap (images smaller than a
          tile are reflect-padded), blended with weights that fall off linearly towards tile
          edges. One compiled shape and bounded memory, for images too large to pad.
  auto    (default) 'resize' for models trained with data.train_preprocess='resize', 'pad' for
          those trained on native-resolution crops ('crop'). On the 20% DSB2018 validation split
          the configs/dsb.py model scores 0.433 with 'resize' against 0.358 with 'pad' (step 480;
          at native resolution its nuclei look 2.7x to 14x larger than in training). Early in
          training (step 160) the two were close (0.313 and 0.353), so the scale the model was
          trained at decides. See README.md.
The model standardises each input, so in 'tile' mode the statistics are those of the tile.

Predictions: heads 1..k of the network pruned to level k (--prune_level; head j computed by the
pruned network equals head j of the full one, so head j's metrics are those of pruning level j in
'fast' mode), plus the final prediction: 'accurate' (mean probability of the supervised heads <= k)
or 'fast' (head k alone). --flips averages the probabilities of the 4 flips of each input. Every
prediction gets semantic metrics (IoU and Dice, pooled over all pixels and mean over images, with
the conventions of `metrics`) and the official score, from its own instances.

Outputs in --output (written to a temporary folder beside it, renamed only once complete):
  metrics.json    all metrics per prediction, plus the settings and checkpoint step.
  per_image.csv   per image (final prediction): id, size, object counts and matches at IoU 0.5,
                  IoU, Dice, official score.
  submission.csv  the final prediction's nuclei in Kaggle's format (scorable by
                  `python -m unetpp_jax.score`).
  overlays/*.png  a sample of images with predicted (green) and true (red) contours; also written
                  with the scalar metrics as TensorBoard events into --output.
"""

import collections
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from clu import metric_writers
from PIL import Image
from skimage import segmentation

from configs import dsb as dsb_config
from unetpp_jax import instances, models, official_metric, rle, train
from unetpp_jax.datasets import kaggle

STRATEGIES = ('auto', 'resize', 'pad', 'tile')
SPLITS = ('all', 'train', 'validation')


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How the network is run on native-size images (see the module docstring)."""
  strategy: str = 'auto'
  mode: str | None = None  # 'accurate' | 'fast'; None = config.predict.mode.
  prune_level: int | None = None  # None: config.predict.head ('fast'), else the deepest head.
  flips: bool = False
  tile_size: int = 256
  tile_overlap: int = 64
  pad_multiple: int = 128
  batch_size: int = 8  # Inputs per network call ('resize' and 'tile').


# ----------------------------------------------------------------------------------------------
# Model loading.


def load_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The training config stored in workdir/config.json.

  Fields added to the configs after that run was started take their configs/dsb.py defaults.
  """
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: --workdir must be a training workdir '
                            '(python -m unetpp_jax.main writes config.json there).')
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
  return ml_collections.ConfigDict(_with_defaults(stored, dsb_config.get_config().to_dict()))


def _with_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  merged = dict(values)
  for key, default in defaults.items():
    if key not in merged:
      merged[key] = default
    elif isinstance(default, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], default)
  return merged


def load_variables(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                   step: int | None = None) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) of checkpoint `step` (default: the newest) in workdir."""
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise FileNotFoundError(f'No checkpoint in {directory}: train first (python -m '
                            'unetpp_jax.main) or pass the workdir of a trained model.')
  # Read-only: a training run may still be writing to (and pruning) this folder.
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    available = list(mngr.all_steps())
    step = mngr.latest_step() if step is None else step
    if step not in available:
      raise FileNotFoundError(f'No checkpoint of step {step} in {directory} (found '
                              f'{sorted(available)}).')
    model = models.create_model(config.model)
    template = train.create_train_state(config, jax.random.key(0), model)
    state = mngr.restore(step, args=ocp.args.StandardRestore(template))
  finally:
    mngr.close()
  return {'params': state.params, 'batch_stats': state.batch_stats}, int(step)


# ----------------------------------------------------------------------------------------------
# Native-size inference.


class Predictor:
  """Runs the network on fixed-shape batches: probabilities of every head plus the final one."""

  def __init__(self, config: ml_collections.ConfigDict, variables: Any,
               options: InferenceOptions):
    self.model = models.create_model(config.model)
    self.variables = variables
    self.options = options
    self.mode = options.mode or config.predict.mode
    if self.mode not in ('accurate', 'fast'):
      raise ValueError(f"--mode must be 'accurate' or 'fast', got {self.mode!r}.")
    levels = self.model.levels
    supervised = sorted(int(h) for h in config.loss.deep_supervision_heads)
    default_level = config.predict.head if self.mode == 'fast' else max(supervised)
    self.level = options.prune_level or default_level
    if not 1 <= self.level <= levels:
      raise ValueError(f'--prune_level={self.level} must be in 1..{levels}.')
    if self.model.skips == 'plain' and self.level != levels:
      raise ValueError(f'--prune_level={self.level}: a {config.model.name} has only head {levels} '
                       'and cannot be pruned.')
    self.heads = self.model.output_heads(self.level)
    self.final_heads = ([self.level] if self.mode == 'fast'
                        else [h for h in supervised if h <= self.level] or [self.level])
    self.names = [f'head{j}' for j in self.heads] + [self.mode]
    self.num_classes = config.model.num_classes
    self.train_size = config.data.image_size
    strategy = options.strategy
    if strategy == 'auto':  # Predict at the scale the model was trained at (see module doc).
      strategy = 'resize' if config.data.train_preprocess == 'resize' else 'pad'
    if strategy not in STRATEGIES:
      raise ValueError(f'--strategy must be one of {STRATEGIES}, got {strategy!r}.')
    self.strategy = strategy
    factor = 2**self.level
    for name, value in (('tile_size', options.tile_size), ('pad_multiple', options.pad_multiple)):
      if value <= 0 or value % factor:
        raise ValueError(f'--{name}={value} must be a positive multiple of 2**prune_level = '
                         f'{factor}.')
    if not 0 <= options.tile_overlap < options.tile_size:
      raise ValueError(f'--tile_overlap={options.tile_overlap} must be in [0, tile_size).')
    self.batch_size = 1 if self.strategy == 'pad' else options.batch_size
    self._forward = jax.jit(self._probabilities)

  @property
  def channels(self) -> int:
    """Channels of each prediction: foreground, plus boundary for 3-class models."""
    return 2 if self.num_classes == 3 else 1

  def _probabilities(self, variables: Any, images: jax.Array) -> jax.Array:
    """images [B, h, w, 3] -> [P, B, h, w, channels]: heads 1..k, then the final prediction."""
    batch = images.shape[0]
    if self.options.flips:  # Identity, left-right, up-down, both; undone after the network.
      images = jnp.concatenate([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]])
    logits = self.model.apply(variables, images, prune_level=self.level)
    heads = []
    for head_logits in logits:
      channels = [models.foreground_probability(head_logits)]
      if self.num_classes == 3:
        channels.append(jax.nn.softmax(head_logits, axis=-1)[..., 2])
      heads.append(jnp.stack(channels, axis=-1))
    probs = jnp.stack(heads)  # [k, n * B, h, w, c]
    if self.options.flips:
      g = probs.reshape(probs.shape[0], 4, batch, *probs.shape[2:])
      probs = (g[:, 0] + g[:, 1, :, :, ::-1] + g[:, 2, :, ::-1] + g[:, 3, :, ::-1, ::-1]) / 4
    position = models.head_positions(self.heads, len(self.heads))
    final = jnp.mean(probs[jnp.array([position[h] for h in self.final_heads])], axis=0)
    return jnp.concatenate([probs, final[None]])

  def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities [P, n, h, w, c] of n same-shape inputs, padded to one fixed batch size."""
    batch = np.zeros((self.batch_size, *inputs[0].shape), np.float32)
    batch[:len(inputs)] = np.stack(inputs)
    return np.asarray(self._forward(self.variables, batch))[:, :len(inputs)]

  # Each strategy splits an image into network inputs and assembles their outputs.

  def split(self, image: np.ndarray) -> tuple[list[np.ndarray], Any]:
    """Network inputs (float32 in [0, 1]) of a uint8 image [H, W, 3], and their assembler."""
    height, width = image.shape[:2]
    if self.strategy == 'resize':
      size = self.train_size
      small = Image.fromarray(image).resize((size, size), Image.BILINEAR)  # Antialiased.
      def assemble(outputs):
        return np.stack([
            np.stack([_resize_float(o, height, width) for o in np.moveaxis(pred, -1, 0)], -1)
            for pred in outputs[0]])
      return [np.asarray(small, np.float32) / 255], assemble

    x = image.astype(np.float32) / 255
    if self.strategy == 'pad':
      m = self.options.pad_multiple
      padded = _reflect_pad(x, -(-height // m) * m, -(-width // m) * m)
      return [padded], lambda outputs: outputs[0][:, :height, :width]

    size, overlap = self.options.tile_size, self.options.tile_overlap
    padded = _reflect_pad(x, max(height, size), max(width, size))
    corners = [(y, x0) for y in _tile_starts(padded.shape[0], size, overlap)
               for x0 in _tile_starts(padded.shape[1], size, overlap)]
    weight = _tile_weight(size, overlap)[None, :, :, None]

    def assemble_tiles(outputs):
      total = np.zeros((outputs[0].shape[0], *padded.shape[:2], outputs[0].shape[-1]), np.float32)
      norm = np.zeros(padded.shape[:2], np.float32)
      for (y, x0), out in zip(corners, outputs):
        total[:, y:y + size, x0:x0 + size] += out * weight
        norm[y:y + size, x0:x0 + size] += weight[0, :, :, 0]
      return (total / norm[None, :, :, None])[:, :height, :width]
    return [padded[y:y + size, x0:x0 + size] for y, x0 in corners], assemble_tiles

  def predict(self, examples: Iterable[dict[str, Any]]
              ) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yields (example, probabilities [P, H, W, c]) in input order.

    Inputs of consecutive images share batches, so small images do not each run a mostly empty
    batch.
    """
    pending = collections.deque()  # [example, assemble, outputs (None until computed)]
    queue = []  # (entry, index of the input within its image, input)

    def flush():
      outputs = self.run([q[2] for q in queue])
      for (entry, index, _), out in zip(queue, np.moveaxis(outputs, 1, 0)):
        entry[2][index] = out
      queue.clear()

    for example in examples:
      inputs, assemble = self.split(example['image'])
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


def _resize_float(x: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(x.astype(np.float32), mode='F').resize(
      (width, height), Image.BILINEAR))


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
# Data: which images, and their labels.


def split_ids(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """Ids of the training run's 'train' or 'validation' split (the TFDS builder's order)."""
  from unetpp_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  builder = datasets.load_builder(config)
  train_range, val_range = input_pipeline.split_ranges(builder, config.data.val_fraction)
  lo, hi = val_range if split == 'validation' else train_range
  return list(input_pipeline.read_encoded(builder, lo, hi).ids)


def select_ids(data: str | os.PathLike[str], wanted: Sequence[str] | None,
               solution: dict[str, rle.ImageRows] | None, solution_path: str | None
               ) -> list[str]:
  """The ids to evaluate, after checking that PATH, the split and the solution agree."""
  available = kaggle.list_ids(data)
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
                       f'{rle.describe_ids(unlabelled)} (an image without nuclei needs one row with '
                       'empty EncodedPixels).')
    for image_id in ids:  # Finds malformed rows now rather than after hours of inference.
      solution[image_id].label_map(solution_path)
  return ids


def _examples(data: str | os.PathLike[str], ids: Sequence[str],
              solution: dict[str, rle.ImageRows] | None, solution_path: str | None
              ) -> Iterator[dict[str, Any]]:
  wanted = set(ids)
  for example in kaggle.iter_examples(data):
    if example['id'] not in wanted:
      continue
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
  """Semantic sums and official-metric results of one prediction over the whole set."""

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


def overlay(image: np.ndarray, true_label: np.ndarray, pred_label: np.ndarray) -> np.ndarray:
  """The image with true contours in red, predicted ones in green (yellow where they coincide)."""
  out = image.copy()
  true_edge = segmentation.find_boundaries(true_label, mode='inner')
  pred_edge = segmentation.find_boundaries(pred_label, mode='inner')
  out[true_edge] = (255, 0, 0)
  out[pred_edge] = (0, 255, 0)
  out[true_edge & pred_edge] = (255, 255, 0)
  return out


PER_IMAGE_COLUMNS = ('id', 'height', 'width', 'num_true', 'num_pred', 'tp50', 'fp50', 'fn50',
                     'iou', 'dice', 'score')


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
    inference: InferenceOptions = InferenceOptions(),
    instance_options: instances.InstanceOptions | None = None,
    num_overlays: int = 16,
) -> dict[str, Any]:
  """Evaluates the checkpoint of `workdir` on the images of `data`; writes `output` (see module).

  Args:
    workdir: Training workdir (config.json, checkpoints/).
    data: Kaggle-layout folder or zip.
    output: Folder for the results; replaced only once everything has been written.
    solution: Optional solution CSV providing the labels instead of the masks in `data`.
    split: 'all' images of `data`, or only those of the training run's 'train'/'validation'.
    step: Checkpoint step; None = the newest.
    inference: How the network runs on native-size images.
    instance_options: Probabilities -> instances; None = defaults, with 'boundary' seeds for
      3-class models.
    num_overlays: Number of images (evenly spread over the sorted ids) drawn with contours.

  Returns:
    The contents of metrics.json.

  Raises:
    FileNotFoundError, ValueError: bad inputs, with messages naming the file or image id.
  """
  start = time.time()
  if split not in SPLITS:
    raise ValueError(f'--split must be one of {SPLITS}, got {split!r}.')
  config = load_config(workdir)
  if not pathlib.Path(data).exists():
    raise FileNotFoundError(f'--data {data} does not exist.')
  # The checkpoint first: a workdir without one is the error to report, not its data's.
  variables, step = load_variables(workdir, config, step)
  truth = rle.read_csv(solution, require_shape=True) if solution else None
  wanted = None if split == 'all' else split_ids(config, split)
  ids = select_ids(data, wanted, truth, solution)
  predictor = Predictor(config, variables, inference)
  if instance_options is None:
    seeds = 'boundary' if config.model.num_classes == 3 else 'distance'
    instance_options = instances.InstanceOptions(seeds=seeds)
  logging.info('Evaluating step %d of %s on %d images of %s (%s, strategy %s).', step, workdir,
               len(ids), data, predictor.mode, predictor.strategy)

  output = pathlib.Path(output).absolute()
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.incomplete-', dir=output.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output folder's mode.
  try:
    overlay_ids = {ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, num_overlays).round()
                                             .astype(int))} if num_overlays > 0 else set()
    (tmp / 'overlays').mkdir()
    writer = metric_writers.create_default_writer(str(tmp))
    accumulators = {name: Accumulator() for name in predictor.names}
    submission, per_image = [], []
    any_label = False
    for n, (example, probs) in enumerate(predictor.predict(_examples(data, ids, truth, solution))):
      true_label = example['label'].astype(np.int32)
      true_mask = true_label > 0
      any_label |= bool(true_mask.any())
      for name, p in zip(predictor.names, probs):
        pred_label = instances.to_instances(
            p[..., 0], p[..., 1] if predictor.channels == 2 else None, instance_options)
        iou, dice, result = accumulators[name].add(
            p[..., 0] > instance_options.threshold, true_mask, pred_label, true_label)
      # The loop leaves the final prediction's values in pred_label, iou, dice and result.
      submission.extend(rle.submission_rows(example['id'], pred_label))
      height, width = true_label.shape
      per_image.append((example['id'], height, width, result.num_true, result.num_pred,
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
        'final_prediction': predictor.mode,
        'predictions': results,
        'num_images': len(ids),
        'workdir': str(workdir), 'checkpoint_step': step, 'data': str(data),
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


# ----------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program: importing this module next to the other command
  lines (main, export_npz: --workdir, --output) must not clash with their flags."""
  flags.DEFINE_string('workdir', None, 'Training workdir: config.json and checkpoints/.')
  flags.DEFINE_string('data', None, 'Kaggle-layout folder or zip (<id>/images/<id>.png, '
                      'optional <id>/masks/*.png), e.g. stage1_train.zip.')
  flags.DEFINE_string('output', None, 'Output folder (replaced once complete).')
  flags.DEFINE_string('solution', None, 'Optional solution CSV (ImageId,EncodedPixels,Height,Width)'
                      ' with the labels; overrides the masks in --data.')
  flags.DEFINE_enum('split', 'all', SPLITS, "Images to use: all of --data, or only the training "
                    "run's train / validation split (ids from its TFDS builder).")
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_enum('strategy', 'auto', STRATEGIES, 'Native-size inference (see module doc).')
  flags.DEFINE_enum('mode', None, ['accurate', 'fast'], 'Final prediction; default '
                    'config.predict.mode.')
  flags.DEFINE_integer('prune_level', None, 'Network pruned to this level (heads 1..k); '
                       "default: config.predict.head for 'fast', the deepest supervised head "
                       "for 'accurate'.")
  flags.DEFINE_bool('flips', False, 'Average the probabilities over 4 flips (test-time '
                    'augmentation).')
  flags.DEFINE_integer('tile_size', 256, "Tile size of --strategy=tile.")
  flags.DEFINE_integer('tile_overlap', 64, 'Overlap of neighbouring tiles, in pixels.')
  flags.DEFINE_integer('pad_multiple', 128, 'Images are padded to a multiple of this '
                       '(--strategy=pad).')
  flags.DEFINE_integer('batch_size', 8, 'Inputs per network call (resize/tile strategies).')
  flags.DEFINE_enum('instances', 'watershed', instances.METHODS, 'Split touching nuclei by '
                    'watershed, or plain connected components.')
  flags.DEFINE_enum('seeds', 'auto', ('auto',) + instances.SEEDS, "Watershed seeds; auto = "
                    "'boundary' for 3-class models, else 'distance'.")
  flags.DEFINE_float('threshold', instances.InstanceOptions.threshold, 'Foreground probability '
                     'threshold.')
  flags.DEFINE_float('seed_h', instances.InstanceOptions.seed_h, "Minimum dynamic (pixels) of a "
                     "'distance' seed.")
  flags.DEFINE_integer('min_size', instances.InstanceOptions.min_size, 'Smallest nucleus kept, in '
                       'pixels.')
  flags.DEFINE_integer('num_overlays', 16, 'Images drawn with contours.')
  flags.mark_flags_as_required(['workdir', 'data', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    config = load_config(FLAGS.workdir)
    seeds = FLAGS.seeds
    if seeds == 'auto':
      seeds = 'boundary' if config.model.num_classes == 3 else 'distance'
    report = evaluate(
        FLAGS.workdir, FLAGS.data, FLAGS.output, solution=FLAGS.solution, split=FLAGS.split,
        step=FLAGS.step,
        inference=InferenceOptions(
            strategy=FLAGS.strategy, mode=FLAGS.mode, prune_level=FLAGS.prune_level,
            flips=FLAGS.flips, tile_size=FLAGS.tile_size, tile_overlap=FLAGS.tile_overlap,
            pad_multiple=FLAGS.pad_multiple, batch_size=FLAGS.batch_size),
        instance_options=instances.InstanceOptions(
            threshold=FLAGS.threshold, method=FLAGS.instances, seeds=seeds, seed_h=FLAGS.seed_h,
            min_size=FLAGS.min_size),
        num_overlays=FLAGS.num_overlays)
  except (OSError, ValueError) as e:
    sys.exit(f'Error: {e}')
  summary = {name: {k: round(v[k], 4) for k in ('iou', 'dice', 'iou_per_image', 'dice_per_image',
                                                 'score', 'ap50', 'f1_50')}
             for name, v in report['predictions'].items()}
  print(json.dumps({'output': FLAGS.output, 'checkpoint_step': report['checkpoint_step'],
                    'num_images': report['num_images'], 'seconds': report['seconds'],
                    **summary}, indent=2))


if __name__ == '__main__':
  _define_flags()
  app.run(main)

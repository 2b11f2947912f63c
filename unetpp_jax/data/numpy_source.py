"""The numpy source (config.data.source = 'npz:PATH'): an .npz written by `unetpp_jax.export_npz`.

Order and augmentation come from `contract.TrainSchedule`, as in the tfds source. Nothing here may
import tensorflow (directly or through another module): this source is for machines without it.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from unetpp_jax import data as sources
from unetpp_jax.data import contract, splits
from unetpp_jax.data.contract import Examples, Input, Layout, TrainSchedule

NAME = 'npz'  # Its name in the registry (unetpp_jax.data.SOURCES): 'npz:PATH'.


def augment(
    image: np.ndarray, label: np.ndarray, params: dict[str, Any], jitter: float
) -> tuple[np.ndarray, np.ndarray]:
  """Applies one example's `augment_params` to float32 image [S, S, 3] in [0, 1] and label [S, S].

  Geometric ops (left-right flip, up-down flip, rot90, in that order) act on image and label;
  the H&E drawing of fluorescence images (`contract.recolour`), colour ones (`contract.colour`),
  then photometric ones (brightness, contrast around the image mean, gamma, each followed by
  clipping to [0, 1]) on the image only. tfds_source implements the same ops in TensorFlow.
  """
  geometry = (bool(params['flip_lr']), bool(params['flip_ud']), int(params['rot90']))
  image, label = contract.geometric(image, *geometry), contract.geometric(label, *geometry)
  if params['recolour']:
    image = contract.recolour(image, label, params['recolour_nucleus'],
                              params['recolour_background'], params['recolour_eosin'])
  image = contract.colour(image, int(params['channels']), bool(params['grey']),
                          bool(params['invert']), params['haematoxylin'], params['eosin'])
  if jitter:  # Static: with jitter off the image stays bit-exact.
    image = np.clip(image + params['brightness'], 0, 1)
    mean = image.mean(dtype=np.float32)
    image = np.clip((image - mean) * params['contrast'] + mean, 0, 1)
    image = image ** params['gamma']
  return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label)


def _train_batches(
    examples: Examples, schedule: TrainSchedule, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  d = schedule.layout.local_devices
  for indices, params in schedule.iterate_from(start_step):
    images, labels = [], []
    for j, index in enumerate(indices):
      image, label = augment(examples.images[index] / np.float32(255), examples.labels[index],
                             {k: v[j] for k, v in params.items()}, schedule.jitter)
      images.append(image)
      labels.append(label)
    yield {'image': contract.to_device_layout(np.stack(images), d),
           'label': contract.to_device_layout(np.stack(labels).astype(np.int32), d)}



def create_input(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Input:
  """Input from the .npz named by config.data.source ('npz:PATH'); see the module docstring.

  Args:
    config: the experiment config (configs/dsb.py).
    start_step: global step of the first training batch.
    process_index: this process (default jax.process_index(); tests simulate others).
    process_count: number of processes (default jax.process_count()).
  """
  path = sources.source_argument(config, NAME)
  data = contract.load_npz(path)
  mismatches = [
      f'{name}: file {got!r}, config {want!r}'
      for name, got, want in (('image_size', data.image_size, config.data.image_size),
                              ('dataset', data.dataset, config.data.dataset),
                              ('val_fraction', data.val_fraction, config.data.val_fraction),
                              ('split', data.split, config.data.get('split', 'tail')))
      if got != want]
  if mismatches:
    raise ValueError(f'{path!r} was exported with a different config ({"; ".join(mismatches)}). '
                     f'Re-export it with: {contract.EXPORT_HINT.format(path=path)} and the same '
                     'overrides.')
  if config.data.train_preprocess != 'resize':
    raise ValueError(
        f"config.data.train_preprocess={config.data.train_preprocess!r}: an .npz holds resized "
        "images, so the npz source supports only 'resize'. For native-scale 'crop' training "
        "without TensorFlow use source='release:PATH' (the DSB2018 zip or folder itself), or "
        "source='tfds'.")
  if splits.oversampled(config):
    raise ValueError(
        f'config.data.repeats={dict(config.data.repeats)}: an .npz does not record kinds of '
        "image, so the npz source cannot oversample them; use source='tfds' or 'release:PATH'.")
  layout = Layout.create(config, process_index, process_count)
  train = data.train.slice(*layout.shard(len(data.train)))
  val = data.val.slice(*layout.shard(len(data.val)))
  schedule = TrainSchedule.from_config(config, len(train), layout)
  return Input(
      train_iter=_train_batches(train, schedule, start_step),
      eval_batches=contract.EvalBatches(val, layout, layout.num_eval_batches(len(data.val))),
      num_train=len(data.train),
      num_eval=len(data.val))

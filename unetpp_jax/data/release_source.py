"""The release source (config.data.source = 'release:PATH'): the Kaggle-layout zip or folder read
directly with the PIL reader (`release.py`), numpy only: no export step, no TensorFlow.

It reproduces the tfds source's split and batches exactly: examples are ordered as TFDS orders the
'dsb2018' builder's (by the md5 of 'train' + id, TFDS's stable shuffle), validation is the same
last `val_fraction`, and training windows come from the same `contract.crop` and
`numpy_source.augment` with the parameters of `contract.TrainSchedule`. Only
data.train_preprocess='crop' is supported (the 'resize' mode's antialiased resize is TensorFlow's;
for it, export an .npz once). Nothing here may import tensorflow.
"""

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from unetpp_jax import data as sources
from unetpp_jax.data import contract, numpy_source, release
from unetpp_jax.data.contract import Examples, Input, Layout, TrainSchedule

NAME = 'release'  # Its name in the registry (unetpp_jax.data.SOURCES): 'release:PATH'.


def tfds_order(ids: Sequence[str], split: str = 'train') -> list[str]:
  """`ids` in the order TFDS stores a split's examples: by the md5 of split name + key."""
  salt = hashlib.md5(split.encode())

  def key(example_id: str) -> int:
    digest = salt.copy()
    digest.update(example_id.encode())
    return int(digest.hexdigest(), 16)
  return sorted(ids, key=key)


def num_train_examples(num_examples: int, val_fraction: float) -> int:
  """Size of TFDS's 'train[:p%]' with p = round(100 * (1 - val_fraction)) (as tfds_source)."""
  p = round(100 * (1 - val_fraction))
  return int(round(p * num_examples / 100))


def _train_batches(images: list[np.ndarray], labels: list[np.ndarray], schedule: TrainSchedule,
                   size: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  d = schedule.layout.local_devices
  for indices, params in schedule.iterate_from(start_step):
    batch_images, batch_labels = [], []
    for j, index in enumerate(indices):
      p = {k: v[j] for k, v in params.items()}
      image, label = contract.crop(images[index], labels[index], size, p['crop_y'], p['crop_x'],
                                   p['zoom'])
      image, label = numpy_source.augment(image / np.float32(255), label, p, schedule.jitter)
      batch_images.append(image)
      batch_labels.append(label)
    yield {'image': contract.to_device_layout(np.stack(batch_images), d),
           'label': contract.to_device_layout(np.stack(batch_labels).astype(np.int32), d)}



def create_input(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Input:
  """Input from the release named by config.data.source ('release:PATH'); see the docstring.

  Args:
    config: the experiment config (configs/dsb.py).
    start_step: global step of the first training batch.
    process_index: this process (default jax.process_index(); tests simulate others).
    process_count: number of processes (default jax.process_count()).
  """
  path = sources.source_argument(config, NAME)
  if config.data.train_preprocess != 'crop':
    raise ValueError(
        f"config.data.train_preprocess={config.data.train_preprocess!r}: the release source "
        "supports only 'crop' (native resolution); for 'resize' use source='tfds', or an .npz "
        f"from: {contract.EXPORT_HINT.format(path='PATH')}.")
  layout = Layout.create(config, process_index, process_count)
  # Examples skipped as bad (on_bad_example='skip') are left out before ordering, as the TFDS
  # builder leaves them out of the prepared split.
  examples = {e['id']: e for e in release.iter_examples(
      path, on_bad_example=config.data.on_bad_example)}
  order = tfds_order(list(examples))
  num_train = num_train_examples(len(order), config.data.val_fraction)
  # This process's shard of each split, as in tfds_source.create_input.
  train_ids = [order[i] for i in range(*layout.shard(num_train))]
  val_lo, val_hi = layout.shard(len(order) - num_train)
  val_ids = order[num_train + val_lo:num_train + val_hi]
  size = config.data.image_size
  val = [contract.crop(examples[i]['image'], examples[i]['label'], size, 0.5, 0.5) for i in val_ids]
  val_examples = Examples(
      np.array(val_ids, dtype=str),
      np.stack([v[0] for v in val]) if val else np.zeros((0, size, size, 3), np.uint8),
      np.stack([v[1] for v in val]) if val else np.zeros((0, size, size), np.uint16))
  schedule = TrainSchedule(len(train_ids), config.seed, config.batch_size, layout,
                           config.data.augment, config.data.jitter,
                           tuple(config.data.get('scale_range', (1.0, 1.0))))
  return Input(
      train_iter=_train_batches([examples[i]['image'] for i in train_ids],
                                [examples[i]['label'] for i in train_ids], schedule, size,
                                start_step),
      eval_batches=contract.EvalBatches(val_examples, layout,
                                        layout.num_eval_batches(len(order) - num_train)),
      num_train=num_train,
      num_eval=len(order) - num_train)

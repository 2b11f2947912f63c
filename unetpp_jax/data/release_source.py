"""The release source (config.data.source = 'release:PATH'): the Kaggle-layout zip or folder read
directly with the PIL reader (`release.py`), numpy only: no export step, no TensorFlow.

It reproduces the tfds source's split and batches exactly: examples are ordered as TFDS orders the
'dsb2018' builder's (by the md5 of 'train' + id, TFDS's stable shuffle), the split is the same
(`splits.split_ids`), and training windows come from the same `contract.crop` and
`numpy_source.augment` with the parameters of `contract.TrainSchedule`. Only
data.train_preprocess='crop' is supported (the 'resize' mode's antialiased resize is TensorFlow's;
for it, export an .npz once). Nothing here may import tensorflow.
"""

import concurrent.futures
import hashlib
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from unetpp_jax import data as sources
from unetpp_jax.data import contract, numpy_source, release, splits
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


def _train_batches(images: list[np.ndarray], labels: list[np.ndarray], schedule: TrainSchedule,
                   size: int, start_step: int, nucleus_diameter: float
                   ) -> Iterator[dict[str, np.ndarray]]:
  d = schedule.layout.local_devices

  def window(index, p):
    image, label = contract.crop(images[index], labels[index], size, p['crop_y'], p['crop_x'],
                                 p['zoom'], nucleus_diameter,
                                 p['crop_pick'] if p['touching_crop'] else None, p['angle'],
                                 p['warp'])
    return numpy_source.augment(image / np.float32(255), label, p, schedule.jitter)

  # Numpy and Pillow release the GIL, so threads prepare a batch's windows in parallel (an
  # accelerator consumes far more of them per second than one core makes); map keeps the order.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for indices, params in schedule.iterate_from(start_step):
      windows = list(pool.map(window, indices,
                              [{k: v[j] for k, v in params.items()} for j in range(len(indices))]))
      yield {'image': contract.to_device_layout(np.stack([w[0] for w in windows]), d),
             'label': contract.to_device_layout(
                 np.stack([w[1] for w in windows]).astype(np.int32), d)}



def create_input(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Input:
  """Input from the release named by config.data.source ('release:PATH'); see the docstring.
  The arguments are those of every source (`numpy_source.create_input`)."""
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
  split = splits.split_ids(config, tfds_order(list(examples)), _fingerprint(path),
                           lambda: examples.values())
  # This process's shard of each split, as in tfds_source.create_input.
  train_lo, train_hi = layout.shard(len(split.train))
  train_ids = split.train[train_lo:train_hi]
  val_ids = split.val[slice(*layout.shard(len(split.val)))]
  size, nucleus_diameter = config.data.image_size, config.data.nucleus_diameter
  val = [contract.crop(examples[i]['image'], examples[i]['label'], size, 0.5, 0.5,
                       nucleus_diameter=nucleus_diameter) for i in val_ids]
  val_examples = Examples(
      np.array(val_ids, dtype=str),
      np.stack([v[0] for v in val]) if val else np.zeros((0, size, size, 3), np.uint8),
      np.stack([v[1] for v in val]) if val else np.zeros((0, size, size), np.uint16))
  schedule = TrainSchedule.from_config(config, len(train_ids), layout,
                                       splits.train_repeats(config, train_ids, split.info))
  return Input(
      train_iter=_train_batches([examples[i]['image'] for i in train_ids],
                                [examples[i]['label'] for i in train_ids], schedule, size,
                                start_step, nucleus_diameter),
      eval_batches=contract.EvalBatches(val_examples, layout,
                                        layout.num_eval_batches(len(split.val))),
      num_train=len(split.train),
      num_eval=len(split.val))


def _fingerprint(path: str) -> str:
  """What identifies the release's pixels and labels beside their ids (see `splits.describe`):
  the zip's size, or the total size of the folder's files (masks edited in place change it)."""
  if os.path.isfile(path):
    size = os.path.getsize(path)
  else:
    size = sum(f.stat().st_size for f in pathlib.Path(path).rglob('*') if f.is_file())
  return f'release:{os.path.basename(os.path.normpath(path))}:{size}'


"""tf.data input pipeline over a TFDS builder ('dsb2018' or 'synthetic_nuclei').

Each process reads every encoded example (PNG bytes: tens of MB for DSB2018), splits them
(`splits.split_ids`: whole mosaics stratified by kind of image, or the stored order's tail) and
keeps its own contiguous shard of the training and validation splits in memory; validation, and
training in 'resize' mode, are decoded and preprocessed once and then served from memory. Which
example and which augmentation every step uses comes from `contract.TrainSchedule`, a pure function
of (config.seed, step), so this source and the numpy one share the same order and augmentation
parameters, and resuming at a step starts the stream there without decoding anything skipped.
"""

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from unetpp_jax.data import builders, contract, splits

PREPROCESS_MODES = contract.PREPROCESS_MODES


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
  """Examples as TFDS stores them: ids str [N], PNG images and PNG-16 labels (bytes [N])."""
  ids: np.ndarray
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, ids: Sequence[str]) -> 'EncodedExamples':
    """The examples with these ids, in this order."""
    position = {image_id: n for n, image_id in enumerate(self.ids)}
    rows = np.array([position[i] for i in ids], np.int64)
    return EncodedExamples(self.ids[rows], self.images[rows], self.labels[rows])


def read_encoded(builder: tfds.core.DatasetBuilder, lo: int, hi: int) -> EncodedExamples:
  """Examples [lo, hi) of 'train', in TFDS's deterministic order, without decoding them."""
  rows = []
  if hi > lo:
    ds = builder.as_dataset(
        split=f'train[{lo}:{hi}]', shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()})
    rows = list(ds.as_numpy_iterator())
  # Object arrays: a fixed-width bytes array would pad every PNG to the largest one.
  images, labels = (np.array([row[key] for row in rows], dtype=object)
                    for key in ('image', 'label'))
  return EncodedExamples(np.array([row['id'].decode() for row in rows], dtype=str), images, labels)


def _decode(image_png: tf.Tensor, label_png: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """uint8 [H, W, 3] image and uint16 [H, W, 1] label."""
  image = tf.io.decode_image(image_png, channels=3, expand_animations=False)
  return image, tf.io.decode_png(label_png, channels=1, dtype=tf.uint16)


def _resize(image: tf.Tensor, label: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Image bilinear with antialiasing (back to uint8), label nearest-neighbour."""
  image = tf.image.resize(image, [size, size], 'bilinear', antialias=True)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return image, tf.image.resize(label, [size, size], 'nearest')


def _crop(image: tf.Tensor, label: tf.Tensor, size: int, fy: Any, fx: Any, zoom: Any = 1.0,
          nucleus_diameter: float = 0.0, touching_crop: Any = False, pick: Any = 0.0,
          angle: Any = 0.0, warp: Any = None) -> tuple[tf.Tensor, tf.Tensor]:
  """`contract.crop` (the one crop every source shares), as a tf.data op; `pick` applies where
  `touching_crop`."""
  image, label = tf.numpy_function(
      lambda i, l, y, x, z, t, p, a, w: contract.crop(i, l[..., 0], size, y, x, z,
                                                      nucleus_diameter, p if t else None, a, w),
      [image, label, fy, fx, zoom, touching_crop, pick, angle,
       tf.zeros([contract.WARP_GRID] * 2 + [2]) if warp is None else warp],
      [tf.uint8, tf.uint16],
      stateful=False)
  return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label, [size, size])[..., None]


def _median_grey(images: tf.Tensor) -> tf.Tensor:
  """[N] median over pixels of the grey (channel mean) of float32 `images` [N, S, S, 3], as
  np.median computes it."""
  grey = tf.sort(tf.reshape((images[..., 0] + images[..., 1] + images[..., 2]) / 3,
                            [tf.shape(images)[0], -1]), axis=1)
  pixels = grey.shape[1]
  return (grey[:, (pixels - 1) // 2] + grey[:, pixels // 2]) / 2


def augment(images: tf.Tensor, labels: tf.Tensor, params: dict[str, tf.Tensor], jitter: float,
            stain_jitter: float = 0.0, recolour_prob: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
  """Batched TensorFlow twin of `numpy_source.augment`.

  Args:
    images: float32 [N, S, S, 3] in [0, 1].
    labels: [N, S, S, 1].
    params: `contract.augment_params` of the N examples ([N] each).
    jitter: photometric jitter strength (0 = off).
    stain_jitter: the stain augmentation's strength (0 = off: its factors are then all 1).
    recolour_prob: the probability of `contract.recolour` (0 = off: 'recolour' is then all
      False).

  Returns:
    The augmented images and labels.
  """
  def per_example(name):  # [N] -> [N, 1, 1, 1], to broadcast over pixels.
    return tf.reshape(params[name], [-1, 1, 1, 1])

  # The geometry as one gather of pixels (much faster than flips and rotations in tf.data).
  code = (tf.cast(params['flip_lr'], tf.int32) + 2 * tf.cast(params['flip_ud'], tf.int32)
          + 4 * params['rot90'])
  sources = tf.gather(tf.constant(contract.geometric_tables(images.shape[1])), code)

  def gather_pixels(x):
    flat = tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])
    return tf.reshape(tf.gather(flat, sources, batch_dims=1), tf.shape(x))
  images, labels = gather_pixels(images), gather_pixels(labels)
  if recolour_prob:  # `contract.recolour`, per example; static, as 'recolour' is then all False.
    grey = (images[..., 0] + images[..., 1] + images[..., 2]) / 3
    nuclei = tf.cast(labels[..., 0] > 0, tf.float32)
    count = tf.reduce_sum(nuclei, axis=[1, 2], keepdims=True)
    reference = tf.where(count > 0, tf.reduce_sum(grey * nuclei, axis=[1, 2], keepdims=True)
                         / tf.maximum(count, 1), 1.0)
    signal = tf.minimum(grey / tf.maximum(reference, 1 / 255), 1.5)
    nucleus, background = (tf.reshape(params[k], [-1, 1, 1]) for k in ('recolour_nucleus',
                                                                        'recolour_background'))
    densities = tf.stack([background + (nucleus - background) * signal,
                          tf.reshape(params['recolour_eosin'], [-1, 1, 1])
                          * tf.maximum(1 - signal, 0), tf.zeros_like(grey)], -1)
    drawn = tf.clip_by_value(tf.exp(-tf.einsum('nhwd,dc->nhwc', densities,
                                               contract.RGB_FROM_HED)), 0, 1)
    changed = params['recolour'] & (_median_grey(images) <= splits.BRIGHT_MEDIAN)
    images = tf.where(tf.reshape(changed, [-1, 1, 1, 1]), drawn, images)
  # `contract.stain`, per example; static, as with the factors all 1 it is a no-op.
  if stain_jitter:
    median = _median_grey(images)
    factors = tf.stack([params['haematoxylin'], params['eosin'], tf.ones_like(params['eosin'])], 1)
    densities = tf.einsum('nhwc,cd->nhwd', -tf.math.log(tf.maximum(images, 1 / 255)),
                          contract.HED_FROM_RGB) * factors[:, None, None, :]
    stained = tf.clip_by_value(tf.exp(-tf.einsum('nhwd,dc->nhwc', densities,
                                                 contract.RGB_FROM_HED)), 0, 1)
    grey = (images[..., 0] + images[..., 1] + images[..., 2]) / 3  # `splits.is_grey`, per example.
    deviation = tf.reduce_mean(tf.abs(images - grey[..., None]), axis=[1, 2, 3]) * 255
    changed = ((median > splits.BRIGHT_MEDIAN) & (deviation > splits.GREY_DEVIATION)
               & ((params['haematoxylin'] != 1) | (params['eosin'] != 1)))
    images = tf.where(tf.reshape(changed, [-1, 1, 1, 1]), stained, images)
  # The colour ops of `contract.colour`, per example.
  images = tf.gather(images, tf.gather(contract.CHANNEL_ORDERS, params['channels']), axis=3,
                     batch_dims=1)
  grey = (images[..., 0] + images[..., 1] + images[..., 2]) / 3
  images = tf.where(per_example('grey'), tf.repeat(grey[..., None], 3, axis=-1), images)
  images = tf.where(per_example('invert'), 1 - images, images)
  if jitter:  # Static: with jitter off the image stays bit-exact.
    images = tf.clip_by_value(images + per_example('brightness'), 0, 1)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = tf.clip_by_value((images - mean) * per_example('contrast') + mean, 0, 1)
    images = tf.pow(images, per_example('gamma'))
  return images, labels


def preprocess(examples: EncodedExamples, mode: str, size: int, nucleus_diameter: float = 0.0
               ) -> contract.Examples:
  """Decodes and resizes (mode 'resize') or centre-crops ('crop', with `contract.crop`'s size
  normalisation) every example, in memory."""
  def fn(image_png, label_png):
    image, label = _decode(image_png, label_png)
    if mode == 'resize':
      image, label = _resize(image, label, size)
    else:
      image, label = _crop(image, label, size, 0.5, 0.5, nucleus_diameter=nucleus_diameter)
    return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label[..., 0], [size, size])

  images = np.zeros((0, size, size, 3), np.uint8)
  labels = np.zeros((0, size, size), np.uint16)
  if len(examples):
    ds = tf.data.Dataset.from_tensor_slices((examples.images, examples.labels))
    batches = list(ds.map(fn, tf.data.AUTOTUNE, deterministic=True).batch(256)
                   .as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
  return contract.Examples(examples.ids, images, labels)


def train_dataset(
    examples: EncodedExamples | contract.Examples,
    schedule: contract.TrainSchedule,
    *,
    size: int,
    start_step: int = 0,
    nucleus_diameter: float = 0.0,
) -> tf.data.Dataset:
  """Training batches from global step `start_step` on (infinite).

  Args:
    examples: this process's training shard: preprocessed (served as they are: 'resize' mode) or
      encoded (decoded and randomly cropped at native resolution every time: 'crop' mode).
    schedule: order and augmentation parameters of every step.
    size: image size S.
    start_step: global step of the first batch.
    nucleus_diameter: config.data.nucleus_diameter ('crop' mode; 0 = native scale).

  Returns:
    A dataset of {'image': float32 [D, B, S, S, 3], 'label': int32 [D, B, S, S]}.
  """
  b, d = schedule.layout.per_process_batch, schedule.layout.local_devices
  _, params = schedule.step(0)  # Only for the dtypes.
  signature = (tf.TensorSpec([b], tf.int64),
               {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in params.items()})
  ds = tf.data.Dataset.from_generator(lambda: schedule.iterate_from(start_step),
                                      output_signature=signature)
  images, labels = tf.constant(examples.images), tf.constant(examples.labels)
  if isinstance(examples, contract.Examples):
    ds = ds.map(lambda index, params: (tf.gather(images, index),
                                       tf.gather(labels, index)[..., None], params))
  else:
    def decode_and_crop(index, params):
      image, label = _decode(tf.gather(images, index), tf.gather(labels, index))
      return (*_crop(image, label, size, params['crop_y'], params['crop_x'], params['zoom'],
                     nucleus_diameter, params['touching_crop'], params['crop_pick'],
                     params['angle'], params['warp']), params)
    ds = ds.unbatch().map(decode_and_crop, tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)

  def augment_batch(image, label, params):
    image, label = augment(tf.cast(image, tf.float32) / 255, label, params, schedule.jitter,
                           schedule.stain_jitter, schedule.recolour_prob)
    return {'image': tf.reshape(image, [d, b // d, size, size, 3]),
            'label': tf.reshape(tf.cast(label, tf.int32), [d, b // d, size, size])}
  ds = ds.map(augment_batch, tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def create_input_from_examples(
    config: Any,
    train: EncodedExamples,
    val: EncodedExamples,
    *,
    num_train: int,
    num_eval: int,
    layout: contract.Layout,
    start_step: int = 0,
    repeats: tuple[int, ...] = (),
) -> contract.Input:
  """Input over this process's shards `train` and `val` of splits of num_train / num_eval;
  `repeats`: `contract.TrainSchedule.repeats` of `train`."""
  mode, size = config.data.train_preprocess, config.data.image_size
  nucleus_diameter = config.data.nucleus_diameter
  if mode not in PREPROCESS_MODES:
    raise ValueError(f'config.data.train_preprocess={mode!r} is not one of {PREPROCESS_MODES}.')
  schedule = contract.TrainSchedule.from_config(config, len(train), layout, repeats)
  source = preprocess(train, mode, size) if mode == 'resize' else train
  return contract.Input(
      train_iter=train_dataset(source, schedule, size=size, start_step=start_step,
                               nucleus_diameter=nucleus_diameter).as_numpy_iterator(),
      eval_batches=contract.EvalBatches(preprocess(val, mode, size, nucleus_diameter), layout,
                                              layout.num_eval_batches(num_eval)),
      num_train=num_train,
      num_eval=num_eval)


def create_input(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> contract.Input:
  """Input for config.data.source = 'tfds' (see contract.Input for the contract).

  Args:
    config: the experiment config (configs/dsb.py).
    start_step: global step of the first training batch.
    process_index: this process (default jax.process_index(); tests simulate others).
    process_count: number of processes (default jax.process_count()).
  """
  if config.data.source != 'tfds':
    raise ValueError(f"config.data.source={config.data.source!r}: this source reads 'tfds'; "
                     "'npz:PATH' is read by numpy_source.")
  layout = contract.Layout.create(config, process_index, process_count)
  builder = builders.load_builder(config, check_data_folder=True)
  everything, split = read_split(builder, config)
  # This process's shard of each split, contiguous in the split's order.
  train_ids, val_ids = (ids[slice(*layout.shard(len(ids)))] for ids in (split.train, split.val))
  return create_input_from_examples(
      config, everything.take(train_ids), everything.take(val_ids), num_train=len(split.train),
      num_eval=len(split.val), layout=layout, start_step=start_step,
      repeats=splits.train_repeats(config, train_ids, split.info))


def read_split(builder: tfds.core.DatasetBuilder, config: Any
               ) -> tuple[EncodedExamples, splits.Split]:
  """All examples of 'train' (encoded) and their split into training and validation ids."""
  everything = read_encoded(builder, 0, builder.info.splits['train'].num_examples)

  def decoded():
    for image_id, image, label in zip(everything.ids, everything.images, everything.labels):
      yield {'id': image_id, 'image': np.asarray(Image.open(io.BytesIO(image)).convert('RGB')),
             'label': np.asarray(Image.open(io.BytesIO(label)))}
  return everything, splits.split_ids(config, list(everything.ids), builder.info.full_name,
                                      decoded)


def export_npz(config: Any, output: str) -> contract.NpzData:
  """Reads both splits of config.data.dataset, resizes them and writes `output` atomically.

  The file (see `contract.save_npz`) is what the numpy source ('npz:PATH') reads.
  """
  builder = builders.load_builder(config, check_data_folder=True)
  size = config.data.image_size
  everything, split = read_split(builder, config)
  train, val = (preprocess(everything.take(ids), 'resize', size)
                for ids in (split.train, split.val))
  data = contract.NpzData(train, val, size, config.data.dataset, config.data.val_fraction,
                          config.data.get('split', 'tail'))
  contract.save_npz(output, data)
  return data

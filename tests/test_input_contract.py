"""Tests of the training/validation input contract, for the tf.data and the .npz pipelines."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic
from unetpp_jax import data as data_sources
from unetpp_jax.data import builders
from unetpp_jax.data import tfds_source
from unetpp_jax.data import contract, numpy_source

D = 2  # Local devices (tests/conftest.py).
S = 64  # configs/synthetic.py image size.


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A prepared synthetic_nuclei data_dir, its exported .npz and the validation ids."""
  root = tmp_path_factory.mktemp('data')
  config = synthetic.get_config()
  # Sizes below are the tail's: 192 / 48 (the grouped split: test_splits).
  config.data.split = 'tail'
  config.data.tfds_data_dir = str(root / 'tfds')
  builder = builders.load_builder(config)
  npz = str(root / 'synthetic.npz')
  tfds_source.export_npz(config, npz)
  _, split = tfds_source.read_split(builder, config)
  return {'tfds_data_dir': config.data.tfds_data_dir, 'npz': npz, 'val_ids': split.val}


def _config(data, source='tfds', **overrides):
  config = synthetic.get_config()
  config.data.split = 'tail'
  config.data.tfds_data_dir = data['tfds_data_dir']
  config.data.source = 'tfds' if source == 'tfds' else f'npz:{data["npz"]}'
  config.update_from_flattened_dict(overrides)
  return config


def _create(config, **kwargs):
  return data_sources.create_input(config, **kwargs)  # The source named by config.data.source.


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _hash(image):
  """Identifies an un-augmented example from its float image."""
  return hashlib.sha1(np.round(image * 255).astype(np.uint8).tobytes()).hexdigest()


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


PIPELINES = [('tfds', 'resize'), ('tfds', 'crop'), ('npz', 'resize')]


@pytest.mark.parametrize('source,preprocess', PIPELINES)
def test_batch_contract(data, source, preprocess):
  config = _config(data, source, **{'data.train_preprocess': preprocess})
  inp = _create(config)
  assert (inp.num_train, inp.num_eval) == (192, 48)

  for batch in _take(inp.train_iter, 3):
    assert batch.keys() == {'image', 'label'}
    assert batch['image'].dtype == np.float32 and batch['image'].shape == (D, 4, S, S, 3)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (D, 4, S, S)
    assert 0 <= batch['image'].min() and batch['image'].max() <= 1
    assert batch['label'].min() == 0 and batch['label'].max() > 0

  batches = list(inp.eval_batches)
  assert len(batches) == len(inp.eval_batches) == 3  # 48 examples, 16 per batch.
  weights = np.stack([b['weight'] for b in batches])
  assert weights.dtype == np.float32 and weights.shape == (3, D, 8) and weights.sum() == 48
  for batch in batches:
    assert batch['image'].dtype == np.float32 and batch['image'].shape == (D, 8, S, S, 3)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (D, 8, S, S)
  # Re-iterable: a second pass gives the same batches.
  _assert_batches_equal(batches, list(inp.eval_batches))
  ids = inp.eval_batches.ids
  assert sorted(ids.ravel()) == sorted(data['val_ids'])


@pytest.mark.parametrize('source', ['tfds', 'npz'])
@pytest.mark.parametrize('process_count', [2, 5])
def test_eval_covers_each_example_once_over_processes(data, source, process_count):
  # Per process: 2 devices x 1 (pc=5: 48 -> shards of 9 or 10) or 2 x 5 (pc=2: 2 x 24).
  eval_batch_size = D * process_count * (1 if process_count == 5 else 5)
  config = _config(data, source, batch_size=D * process_count, eval_batch_size=eval_batch_size)
  ids, lengths = [], set()
  for p in range(process_count):
    batches = _create(config, process_index=p, process_count=process_count).eval_batches
    lengths.add(len(batches))
    weight = np.stack([b['weight'] for b in batches])
    slot_ids = batches.ids
    assert weight.shape == slot_ids.shape
    np.testing.assert_array_equal(weight, slot_ids != '')  # Padding: weight 0 and no id.
    for batch, valid in zip(batches, weight > 0):
      assert not batch['image'][~valid].any() and not batch['label'][~valid].any()
    ids.extend(slot_ids[weight > 0])
  assert len(lengths) == 1  # Same number of batches on every process.
  assert sorted(ids) == sorted(data['val_ids'])


@pytest.mark.parametrize('source', ['tfds', 'npz'])
def test_train_shards_are_disjoint_and_complete(data, source):
  # Without augmentation, each process's first epoch is a permutation of its shard; the shards
  # together are the training split.
  process_count = 5  # 192 -> shards of 38 or 39; 4 examples per process and step.
  config = _config(data, source, batch_size=2 * D * process_count,
                   eval_batch_size=D * process_count, **{'data.augment': False, 'data.jitter': 0.0})
  reference = _create(_config(data, source, **{'data.augment': False, 'data.jitter': 0.0}))
  all_train = {_hash(image) for batch in _take(reference.train_iter, 24)  # One epoch: 24 x 8.
               for image in batch['image'].reshape(-1, S, S, 3)}
  assert len(all_train) == 192

  seen = []
  for p in range(process_count):
    shard = 192 * (p + 1) // process_count - 192 * p // process_count
    inp = _create(config, process_index=p, process_count=process_count)
    images = np.concatenate([b['image'].reshape(-1, S, S, 3) for b in _take(inp.train_iter, 10)])
    epoch = [_hash(image) for image in images[:shard]]
    assert len(set(epoch)) == shard  # No repeats within an epoch.
    assert _hash(images[shard]) in epoch  # The next epoch starts over the same shard.
    seen.extend(epoch)
  assert len(seen) == len(set(seen)) == 192 and set(seen) == all_train


@pytest.mark.parametrize('source,preprocess', PIPELINES)
def test_determinism_and_exact_resume(data, source, preprocess):
  config = _config(data, source, **{'data.train_preprocess': preprocess})
  stream = _take(_create(config).train_iter, 27)  # 24 steps per epoch: crosses an epoch.
  _assert_batches_equal(stream[:3], _take(_create(config).train_iter, 3))
  _assert_batches_equal(stream[22:], _take(_create(config, start_step=22).train_iter, 5))

  config.seed = 1
  other = next(_create(config).train_iter)
  assert not np.array_equal(other['image'], stream[0]['image'])
  assert not np.array_equal(other['label'], stream[0]['label'])


@pytest.mark.parametrize('colour', [{}, {'data.recolour_prob': 0.5, 'data.stain_jitter': 1.0}])
def test_tfds_and_npz_pipelines_agree(data, colour):
  tfds_input = _create(_config(data, 'tfds', **colour), start_step=3)
  npz_input = _create(_config(data, 'npz', **colour), start_step=3)
  plain_input = _create(_config(data, 'npz'), start_step=3)
  bright = bright_plain = 0  # Drawn as sections, fluorescence images have bright backgrounds.
  for _ in range(5):
    a, b = next(tfds_input.train_iter), next(npz_input.train_iter)
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)  # Jitter in tf vs numpy.
    bright += np.sum(np.median(b['image'].mean(-1), axis=(-2, -1)) > 0.5)
    bright_plain += np.sum(np.median(next(plain_input.train_iter)['image'].mean(-1),
                                     axis=(-2, -1)) > 0.5)
  assert (bright > bright_plain) == bool(colour)
  _assert_batches_equal(list(tfds_input.eval_batches), list(npz_input.eval_batches))
  np.testing.assert_array_equal(tfds_input.eval_batches.ids, npz_input.eval_batches.ids)


def _label_coded_examples(sizes, seed=0):
  """Examples whose red channel is a function of the label: (7 * label) % 256."""
  rng = np.random.default_rng(seed)
  examples = []
  for h, w in sizes:
    label = np.zeros((h, w), np.uint16)
    for i in range(1, 8):  # Random rectangles: asymmetric, so flips/rotations change the image.
      y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
      label[y:y + rng.integers(3, 20), x:x + rng.integers(3, 30)] = i * 40
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[..., 0] = (7 * label.astype(np.int64)) % 256
    examples.append((image, label))
  return examples


@pytest.mark.parametrize('preprocess', ['resize', 'crop'])
def test_augmentation_keeps_image_and_label_aligned(preprocess):
  config = synthetic.get_config()
  config.data.jitter = 0.0
  layout = contract.Layout.create(config)
  if preprocess == 'resize':  # Already at S x S: served as they are.
    pairs = _label_coded_examples([(S, S)] * 6)
    examples = contract.Examples(np.array([str(i) for i in range(6)]),
                                       np.stack([p[0] for p in pairs]),
                                       np.stack([p[1] for p in pairs]))
  else:  # Native sizes, some smaller than S (padded).
    pairs = _label_coded_examples([(80, 100), (50, 70), (64, 64), (130, 40), (90, 90), (70, 66)])
    examples = tfds_source.EncodedExamples(
        np.array([str(i) for i in range(6)]),
        np.array([tf.io.encode_png(image).numpy() for image, _ in pairs], object),
        np.array([tf.io.encode_png(label[..., None]).numpy() for _, label in pairs], object))
  schedule = contract.TrainSchedule(6, 0, config.batch_size, layout, True, 0.0)
  batches = _take(tfds_source.train_dataset(examples, schedule, size=S).as_numpy_iterator(), 6)
  images = np.concatenate([b['image'].reshape(-1, S, S, 3) for b in batches])
  labels = np.concatenate([b['label'].reshape(-1, S, S) for b in batches])
  red = np.round(images[..., 0] * 255).astype(np.int64)
  np.testing.assert_array_equal(red, (7 * labels) % 256)
  assert labels.max() > 0

  # The geometric augmentation did happen, as the numpy twin computes it.
  indices, params = zip(*(schedule.step(k) for k in range(6)))
  params = {k: np.concatenate([p[k] for p in params]) for k in params[0]}
  assert len({(a, b, c) for a, b, c in zip(params['flip_lr'], params['flip_ud'],
                                           params['rot90'])}) >= 4
  if preprocess == 'resize':
    for j, index in enumerate(np.concatenate(indices)):
      expected = numpy_source.augment(examples.images[index] / np.float32(255),
                                        examples.labels[index],
                                        {k: v[j] for k, v in params.items()}, 0.0)
      np.testing.assert_array_equal(images[j], expected[0])
      np.testing.assert_array_equal(labels[j], expected[1])


def test_tf_augment_matches_numpy_augment():
  rng = np.random.default_rng(0)
  images = rng.random((16, 12, 12, 3), dtype=np.float32)
  labels = rng.integers(0, 5, (16, 12, 12)).astype(np.int32)
  params = contract.augment_params(3, np.arange(16), augment=True, jitter=0.3)
  got_images, got_labels = tfds_source.augment(tf.constant(images),
                                                  tf.constant(labels[..., None]), params, 0.3)
  assert len({(a, b, c) for a, b, c in zip(params['flip_lr'], params['flip_ud'],
                                           params['rot90'])}) >= 6
  for j in range(16):
    want_image, want_label = numpy_source.augment(
        images[j], labels[j], {k: v[j] for k, v in params.items()}, 0.3)
    np.testing.assert_allclose(got_images[j].numpy(), want_image, atol=1e-5)
    np.testing.assert_array_equal(got_labels[j, ..., 0].numpy(), want_label)
    assert not np.allclose(want_image, images[j])  # Jitter changed it.


def test_tf_colour_augment_matches_numpy_colour_augment():
  rng = np.random.default_rng(1)
  images = rng.random((24, 8, 8, 3), dtype=np.float32)
  labels = rng.integers(0, 5, (24, 8, 8)).astype(np.int32)
  params = contract.augment_params(5, np.arange(24), augment=True, jitter=0.0, invert_prob=0.5,
                                   grey_prob=0.5, channel_shuffle=True)
  assert params['invert'].any() and not params['invert'].all()
  assert params['grey'].any() and not params['grey'].all()
  assert len(set(params['channels'].tolist())) >= 4
  got_images, _ = tfds_source.augment(tf.constant(images), tf.constant(labels[..., None]),
                                      params, 0.0)
  for j in range(24):
    want_image, _ = numpy_source.augment(images[j], labels[j],
                                         {k: v[j] for k, v in params.items()}, 0.0)
    np.testing.assert_allclose(got_images[j].numpy(), want_image, atol=1e-6)


def test_tf_stain_augment_matches_numpy_stain_augment():
  rng = np.random.default_rng(2)
  images = rng.random((12, 10, 10, 3), dtype=np.float32)
  images[:8] = 0.45 + 0.55 * images[:8]  # Bright backgrounds in colour: stained.
  images[6:8] = images[6:8].mean(-1, keepdims=True)  # Bright and grey (brightfield): left alone,
  images[8:] *= 0.4  # as are dark ones.
  labels = rng.integers(0, 5, (12, 10, 10)).astype(np.int32)
  params = contract.augment_params(7, np.arange(12), augment=True, jitter=0.1, stain_jitter=1.0,
                                   channel_shuffle=True)
  got_images, _ = tfds_source.augment(tf.constant(images), tf.constant(labels[..., None]),
                                      params, 0.1, 1.0)
  plain = {k: v.copy() for k, v in params.items()}
  plain['haematoxylin'][:] = plain['eosin'][:] = 1
  for j in range(12):
    want_image, _ = numpy_source.augment(images[j], labels[j],
                                         {k: v[j] for k, v in params.items()}, 0.1)
    unstained, _ = numpy_source.augment(images[j], labels[j],
                                        {k: v[j] for k, v in plain.items()}, 0.1)
    np.testing.assert_allclose(got_images[j].numpy(), want_image, atol=1e-5)
    assert np.array_equal(want_image, unstained) == (j >= 6)


def test_tf_recolour_matches_numpy_recolour():
  rng = np.random.default_rng(4)
  images = (0.3 * rng.random((12, 10, 10, 3)) ** 4).astype(np.float32)  # Dark backgrounds,
  images[9:] = 0.5 + 0.5 * images[9:]  # but for three bright ones (left alone).
  labels = rng.integers(0, 3, (12, 10, 10)).astype(np.int32) * (rng.random((12, 10, 10)) < 0.3)
  labels[0] = 0  # One crop without nuclei.
  images = np.where(labels[..., None] > 0, images + 0.4, images).astype(np.float32)
  params = contract.augment_params(5, np.arange(12), augment=True, jitter=0.1, stain_jitter=1.0,
                                   recolour_prob=0.8)
  params['recolour'][:] = True
  params['recolour'][5] = False
  got_images, _ = tfds_source.augment(tf.constant(images), tf.constant(labels[..., None]),
                                      params, 0.1, 1.0, 0.8)
  kept = {k: v.copy() for k, v in params.items()}
  kept['recolour'][:] = False
  for j in range(12):
    want_image, _ = numpy_source.augment(images[j], labels[j],
                                         {k: v[j] for k, v in params.items()}, 0.1)
    np.testing.assert_allclose(got_images[j].numpy(), want_image, atol=1e-5)
    if j >= 9:  # Bright backgrounds: as without recolouring.
      np.testing.assert_array_equal(
          want_image, numpy_source.augment(images[j], labels[j],
                                           {k: v[j] for k, v in kept.items()}, 0.1)[0])
    else:  # Drawn as a section (a bright background) unless its draw said no.
      assert (np.median(want_image.mean(-1)) > 0.5) == (j != 5), j


@pytest.mark.parametrize('source', ['tfds', 'npz'])
def test_inverting_every_image_inverts_the_batches(data, source):
  plain = _take(_create(_config(data, source, **{'data.jitter': 0.0})).train_iter, 2)
  inverted = _take(_create(_config(data, source, **{'data.jitter': 0.0,
                                                    'data.invert_prob': 1.0})).train_iter, 2)
  for a, b in zip(plain, inverted):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_allclose(b['image'], 1 - a['image'], atol=1e-6)


def test_create_input_rejects_other_sources():
  config = synthetic.get_config()
  config.data.source = 'npz:/tmp/x.npz'
  with pytest.raises(ValueError, match='numpy_source'):
    tfds_source.create_input(config)

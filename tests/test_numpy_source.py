"""Tests of the .npz format, export_npz and the numpy-only pipeline's own logic."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic
from unetpp_jax.data import contract, numpy_source

REPO = pathlib.Path(__file__).resolve().parents[1]
S = 16


def _fake_data(n_train=10, n_val=5, seed=0):
  """Examples whose red channel is (7 * label) % 256, in an NpzData matching `_config`."""
  rng = np.random.default_rng(seed)
  def examples(n, prefix):
    labels = rng.integers(0, 40, (n, S, S)).astype(np.uint16)
    images = rng.integers(0, 256, (n, S, S, 3)).astype(np.uint8)
    images[..., 0] = (7 * labels.astype(np.int64)) % 256
    return contract.Examples(np.array([f'{prefix}{i}' for i in range(n)]), images, labels)
  return contract.NpzData(examples(n_train, 'train'), examples(n_val, 'val'), S,
                                'synthetic_nuclei', 0.2, 'grouped')


def _config(path, **data_overrides):
  config = synthetic.get_config()
  config.data.source = f'npz:{path}'
  config.data.image_size = S
  config.batch_size = 4
  config.eval_batch_size = 4
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


@pytest.fixture
def npz(tmp_path):
  path = str(tmp_path / 'fake.npz')
  contract.save_npz(path, _fake_data())
  return path


def test_save_load_round_trip(npz):
  data, loaded = _fake_data(), contract.load_npz(npz)
  assert (loaded.image_size, loaded.dataset, loaded.val_fraction) == (S, 'synthetic_nuclei', 0.2)
  for split in ('train', 'val'):
    want, got = getattr(data, split), getattr(loaded, split)
    for field in ('ids', 'images', 'labels'):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
      assert getattr(got, field).dtype.kind == getattr(want, field).dtype.kind


def test_train_batches_keep_image_and_label_aligned(npz):
  inp = numpy_source.create_input(_config(npz, jitter=0.0))
  assert (inp.num_train, inp.num_eval) == (10, 5)
  for batch in [next(inp.train_iter) for _ in range(8)]:
    assert batch['image'].dtype == np.float32 and batch['image'].shape == (2, 2, S, S, 3)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (2, 2, S, S)
    red = np.round(batch['image'][..., 0] * 255).astype(np.int64)
    np.testing.assert_array_equal(red, (7 * batch['label']) % 256)


def test_jitter_stays_in_range_and_changes_images(npz):
  plain = next(numpy_source.create_input(_config(npz, jitter=0.0)).train_iter)
  jittered = next(numpy_source.create_input(_config(npz, jitter=0.5)).train_iter)
  np.testing.assert_array_equal(plain['label'], jittered['label'])  # Same order and geometry.
  assert 0 <= jittered['image'].min() and jittered['image'].max() <= 1
  assert np.abs(jittered['image'] - plain['image']).mean() > 0.01


def test_schedule_epochs_are_permutations_of_the_shard():
  config = _config('unused')
  layouts = [contract.Layout.create(config, p, 2) for p in range(2)]
  schedules = [contract.TrainSchedule(7, 0, 4, layout, True, 0.1) for layout in layouts]
  steps = [[s.step(k) for k in range(14)] for s in schedules]  # 14 x 2 = 28 = 4 epochs of 7.
  for process_steps in steps:
    order = np.concatenate([indices for indices, _ in process_steps]).reshape(4, 7)
    for epoch in order:
      assert sorted(epoch) == list(range(7))
    assert len({tuple(epoch) for epoch in order}) > 1  # Reshuffled every epoch.
  # Every slot of the global stream has its own augmentation.
  brightness = [np.concatenate([params['brightness'] for _, params in process_steps])
                for process_steps in steps]
  assert len(set(np.concatenate(brightness).tolist())) == 56


def test_augment_params_switches_are_independent():
  positions = np.arange(50)
  both = contract.augment_params(0, positions, augment=True, jitter=0.2)
  geometric = contract.augment_params(0, positions, augment=True, jitter=0.0)
  photometric = contract.augment_params(0, positions, augment=False, jitter=0.2)
  for key in ('flip_lr', 'flip_ud', 'rot90'):
    np.testing.assert_array_equal(both[key], geometric[key])
    assert not photometric[key].any()
  for key in ('brightness', 'contrast', 'gamma'):
    np.testing.assert_array_equal(both[key], photometric[key])
  assert (geometric['brightness'] == 0).all() and (geometric['contrast'] == 1).all()
  assert set(both['rot90'].tolist()) == {0, 1, 2, 3}
  assert (np.abs(both['brightness']) <= 0.2).all() and (np.abs(both['contrast'] - 1) <= 0.2).all()


def test_colour_params_leave_the_other_params_unchanged():
  positions = np.arange(400)
  off = contract.augment_params(0, positions, augment=True, jitter=0.1, scale_range=(0.5, 2.0))
  on = contract.augment_params(0, positions, augment=True, jitter=0.1, scale_range=(0.5, 2.0),
                               invert_prob=0.25, grey_prob=0.5, channel_shuffle=True)
  for key in off:
    if key not in ('channels', 'grey', 'invert'):
      np.testing.assert_array_equal(on[key], off[key], err_msg=key)
  assert not (off['invert'].any() or off['grey'].any() or off['channels'].any())
  assert 0.18 < on['invert'].mean() < 0.32 and 0.42 < on['grey'].mean() < 0.58
  assert set(on['channels'].tolist()) == set(range(6))


def test_colour_ops():
  rng = np.random.default_rng(0)
  image = rng.random((4, 5, 3), dtype=np.float32)
  np.testing.assert_array_equal(contract.colour(image, 0, False, False), image)
  np.testing.assert_allclose(contract.colour(image, 0, False, True), 1 - image)
  grey = contract.colour(image, 0, True, False)
  np.testing.assert_allclose(grey[..., 1], image.mean(-1), rtol=1e-6)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  orders = {tuple(contract.colour(image, c, False, False)[0, 0]) for c in range(6)}
  assert len(orders) == 6  # Six different orders of the three channels.
  assert sorted(contract.colour(image, 3, False, False)[1, 2]) == sorted(image[1, 2])


def _params_off_and_on(changed, base, option):
  """`augment_params` of 400 positions under `base`, without and with `option`; asserts that the
  option changes no parameter but those named in `changed`."""
  positions = np.arange(400)
  off = contract.augment_params(0, positions, augment=True, jitter=0.1, **base)
  on = contract.augment_params(0, positions, augment=True, jitter=0.1, **base, **option)
  for key in off:
    if key not in changed:
      np.testing.assert_array_equal(on[key], off[key], err_msg=key)
  return off, on


def test_stain_params_are_log_uniform_and_leave_the_other_params_unchanged():
  off, on = _params_off_and_on(('haematoxylin', 'eosin'), {'invert_prob': 0.5},
                               {'stain_jitter': 1.0})
  for key in ('haematoxylin', 'eosin'):
    assert (off[key] == 1).all()
    log = np.log(on[key])
    assert -1 <= log.min() < -0.9 and 0.9 < log.max() <= 1 and abs(log.mean()) < 0.1
  assert abs(np.corrcoef(np.log(on['haematoxylin']), np.log(on['eosin']))[0, 1]) < 0.15


def _he_section(densities):
  """float32 RGB of haematoxylin / eosin / DAB densities [..., 3] (Beer-Lambert)."""
  return np.exp(-(np.asarray(densities, np.float32) @ contract.RGB_FROM_HED)).astype(np.float32)


def test_stain_scales_each_stain_density_of_bright_images_only():
  rng = np.random.default_rng(0)
  densities = np.zeros((16, 16, 3), np.float32)
  densities[..., 0] = rng.uniform(0.0, 0.3, (16, 16))  # Haematoxylin: light cytoplasm,
  densities[4:8, 4:8, 0] = 0.6  # a nucleus,
  densities[..., 1] = rng.uniform(0.0, 0.2, (16, 16))  # and eosin everywhere,
  densities[10:, :, 1] = 0.5  # strongly in a band of stroma.
  densities[0, :] = 0  # A row of white background.
  section = _he_section(densities)
  assert np.median(section.mean(-1)) > 0.5  # Bright background: the stain applies.

  stained = contract.stain(section, 0.5, 2.0)
  got = -np.log(np.maximum(stained, 1 / 255)) @ contract.HED_FROM_RGB
  np.testing.assert_allclose(got, densities * [0.5, 2.0, 1.0], atol=2e-3)
  np.testing.assert_allclose(stained[0], 1.0, atol=1e-5)  # White stays white.
  assert contract.stain(section, 1.0, 1.0) is section  # Factors of 1: untouched.
  # The stain augmentation reaches the network through `colour`, before the other colour ops.
  np.testing.assert_array_equal(contract.colour(section, 0, False, True, 0.5, 2.0), 1 - stained)

  fluorescence = (0.8 * rng.random((16, 16, 3)) ** 8).astype(np.float32)  # Dark background.
  assert contract.stain(fluorescence, 0.5, 2.0) is fluorescence
  # Brightfield: bright but grey. Its stain densities scaled, it would turn green or purple.
  brightfield = np.repeat(section.mean(-1, keepdims=True), 3, axis=-1)
  assert np.abs(contract.stain(brightfield + [0.0, 0.02, 0.0], 0.5, 2.0)
                - brightfield).max() > 0.05  # A tint of 5 levels is colour: stained.
  assert contract.stain(brightfield, 0.5, 2.0) is brightfield


def test_stain_leaves_the_networks_haematoxylin_channel_as_it_was():
  """Per image standardised, the 'haematoxylin' input does not see either stain's factor: with
  `stain` the network learns to read it rather than the colours of the sections it trained on."""
  from unetpp_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  densities = np.stack([rng.uniform(0, 0.8, (32, 32)), rng.uniform(0, 0.5, (32, 32)),
                        np.zeros((32, 32))], -1)
  section = _he_section(densities)
  want = np.asarray(models.normalize_input(section[None], 'haematoxylin'))
  for factors in ((0.4, 1.0), (1.0, 3.0), (2.5, 0.3)):
    stained = contract.stain(section, *factors)
    assert np.abs(stained - section).max() > 0.05
    got = np.asarray(models.normalize_input(stained[None], 'haematoxylin'))
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_recolour_params_leave_the_other_params_unchanged():
  off, on = _params_off_and_on(('recolour',), {'stain_jitter': 1.0}, {'recolour_prob': 0.25})
  assert not off['recolour'].any() and 0.2 < on['recolour'].mean() < 0.3
  for key, (lo, hi) in (('recolour_nucleus', contract.RECOLOUR_NUCLEUS),
                        ('recolour_background', contract.RECOLOUR_BACKGROUND),
                        ('recolour_eosin', contract.RECOLOUR_EOSIN)):
    margin = 0.05 * (hi - lo)  # 400 uniform draws come this close to either end.
    assert lo <= on[key].min() < lo + margin and hi - margin < on[key].max() < hi


def test_touching_crop_params_leave_the_other_params_unchanged():
  off, on = _params_off_and_on(('touching_crop',), {'recolour_prob': 0.25},
                               {'touching_crop_prob': 0.25})
  assert not off['touching_crop'].any() and 0.18 < on['touching_crop'].mean() < 0.32
  assert 0 <= on['crop_pick'].min() < 0.05 and 0.95 < on['crop_pick'].max() < 1


def test_recolour_draws_fluorescence_as_an_h_and_e_section():
  rng = np.random.default_rng(3)
  image = np.full((32, 32, 3), 0.04, np.float32)  # Dark background,
  label = np.zeros((32, 32), np.int32)
  image[4:12, 4:12], label[4:12, 4:12] = 0.3, 1  # a dim nucleus
  image[20:28, 16:28], label[20:28, 16:28] = 0.6, 2  # and a bright one.
  image += rng.uniform(-0.01, 0.01, image.shape).astype(np.float32)

  drawn = contract.recolour(image, label, nucleus=1.5, background=0.2, eosin=0.6)
  assert drawn.dtype == np.float32 and drawn.shape == image.shape
  assert np.median(drawn.mean(-1)) > 0.5  # A bright background now, as sections have.
  densities = -np.log(np.maximum(drawn, 1 / 255)) @ contract.HED_FROM_RGB
  # Haematoxylin rises with the fluorescence, relative to the nuclei's mean grey: from `background`
  # at 0 to `nucleus` at that mean.
  reference = (64 * 0.3 + 96 * 0.6) / 160
  for where, grey in (((6, 6), 0.3), ((24, 20), 0.6), ((16, 2), 0.04)):
    np.testing.assert_allclose(densities[where][0], 0.2 + 1.3 * grey / reference, atol=0.03)
  # Eosin outside nuclei, none in the bright nucleus; no DAB.
  np.testing.assert_allclose(densities[16, 2, 1], 0.6 * (1 - 0.04 / reference), atol=0.03)
  assert abs(densities[24, 20, 1]) < 0.01 and np.abs(densities[..., 2]).max() < 0.01
  # Without nuclei the grey is read against white: a background-only crop stays background.
  empty = contract.recolour(image[12:20, 12:20], np.zeros((8, 8), np.int32), 1.5, 0.2, 0.6)
  h = (-np.log(np.maximum(empty, 1 / 255)) @ contract.HED_FROM_RGB)[..., 0]
  assert h.max() < 0.3
  section = 1 - image  # A bright background: left as it is.
  assert contract.recolour(section, label, 1.5, 0.2, 0.6) is section


def test_schedule_from_config_draws_the_configured_colour_params():
  config = _config('unused', invert_prob=1.0, grey_prob=0.0, channel_shuffle=True)
  layout = contract.Layout(0, 1, 1, 4, 4)
  schedule = contract.TrainSchedule.from_config(config, 10, layout)
  _, params = schedule.step(3)
  assert params['invert'].all() and not params['grey'].any()
  assert (params['haematoxylin'] == 1).all()  # Stain augmentation off by default.
  config.data.stain_jitter = 0.5
  schedule = contract.TrainSchedule.from_config(config, 10, layout)
  _, params = schedule.step(3)
  assert schedule.stain_jitter == 0.5 and (params['eosin'] != 1).all()
  assert not params['recolour'].any()
  config.data.recolour_prob = 1.0
  _, params = contract.TrainSchedule.from_config(config, 10, layout).step(3)
  assert params['recolour'].all() and not params['touching_crop'].any()
  config.data.touching_crop_prob = 1.0
  _, params = contract.TrainSchedule.from_config(config, 10, layout).step(3)
  assert params['touching_crop'].all()
  assert not params['angle'].any() and not params['warp'].any()
  config.data.max_rotation, config.data.elastic = 30.0, 3.0
  _, params = contract.TrainSchedule.from_config(config, 10, layout).step(3)
  assert params['angle'].all() and params['warp'].shape == (4, contract.WARP_GRID,
                                                             contract.WARP_GRID, 2)
  assert params['warp'].all()
  assert schedule.jitter == config.data.jitter and schedule.seed == config.seed


def test_layout_validates_batch_sizes():
  config = _config('unused')
  config.batch_size = 6  # 2 processes x 2 local devices = 4 devices.
  with pytest.raises(ValueError, match=r'batch_size=6 .* 4\)'):
    contract.Layout.create(config, 0, 2)
  config.batch_size, config.eval_batch_size = 8, 2
  with pytest.raises(ValueError, match='eval_batch_size=2'):
    contract.Layout.create(config, 0, 2)
  config.eval_batch_size = 8
  with pytest.raises(ValueError, match='process_index 2'):
    contract.Layout.create(config, 2, 2)
  layout = contract.Layout.create(config, 1, 2)
  assert (layout.per_process_batch, layout.per_device_batch, layout.per_process_eval_batch) == (
      4, 2, 4)


def test_missing_or_invalid_npz_errors_name_the_path(tmp_path, npz):
  missing = str(tmp_path / 'missing.npz')
  with pytest.raises(FileNotFoundError, match=re.escape(missing) + '.*unetpp_jax.export_npz'):
    numpy_source.create_input(_config(missing))

  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match=re.escape(str(garbage)) + '.*unetpp_jax.export_npz'):
    numpy_source.create_input(_config(garbage))

  incomplete = str(tmp_path / 'incomplete.npz')
  with np.load(npz) as f:
    np.savez(incomplete, **{k: f[k] for k in f.files if k != 'val_label'})
  with pytest.raises(ValueError, match=re.escape(incomplete) + '.*val_label'):
    numpy_source.create_input(_config(incomplete))

  with pytest.raises(ValueError, match=r'image_size: file 16, config 32.*Re-export'):
    numpy_source.create_input(_config(npz, image_size=32))
  with pytest.raises(ValueError, match="only 'resize'.*source='release:PATH'"):
    numpy_source.create_input(_config(npz, train_preprocess='crop'))
  with pytest.raises(ValueError, match="needs 'npz:PATH'"):
    numpy_source.create_input(_config(npz, source='tfds'))


def test_save_npz_is_atomic(npz, monkeypatch):
  before = pathlib.Path(npz).read_bytes()

  def fail(file, **arrays):
    file.write(b'partial')
    raise OSError('disk full')
  monkeypatch.setattr(np, 'savez_compressed', fail)
  with pytest.raises(OSError, match='disk full'):
    contract.save_npz(npz, _fake_data(seed=1))
  assert pathlib.Path(npz).read_bytes() == before
  assert os.listdir(os.path.dirname(npz)) == ['fake.npz']  # No temporary file left behind.


def test_runs_without_tensorflow(npz):
  code = f"""
import sys
sys.modules['tensorflow'] = None  # Any import of it now fails.
sys.modules['tensorflow_datasets'] = None
from configs import synthetic
config = synthetic.get_config()
config.data.source, config.data.image_size = 'npz:{npz}', {S}
from unetpp_jax.data import numpy_source
batch = next(numpy_source.create_input(config).train_iter)
evals = list(numpy_source.create_input(config).eval_batches)
print(batch['image'].shape, sum(b['weight'].sum() for b in evals))
"""
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split('\n')[-2] == f'(2, 4, {S}, {S}, 3) 5.0'


def test_export_npz_cli_round_trip(tmp_path):
  output = tmp_path / 'out' / 'synthetic32.npz'
  result = subprocess.run(
      [sys.executable, '-m', 'unetpp_jax.export_npz', '--config=configs/synthetic.py',
       f'--config.data.tfds_data_dir={tmp_path / "tfds"}', '--config.data.image_size=32',
       '--config.data.val_fraction=0.25', f'--output={output}'],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert os.listdir(output.parent) == [output.name]
  with np.load(output) as f:
    assert set(f.files) == {'train_image', 'train_label', 'train_id', 'val_image', 'val_label',
                            'val_id', 'image_size', 'dataset', 'val_fraction', 'split'}
  data = contract.load_npz(str(output))
  assert (data.image_size, data.dataset, data.val_fraction, data.split) == (
      32, 'synthetic_nuclei', 0.25, 'grouped')
  # 25% of each kind of image, rounded up per kind (at most 4 kinds).
  assert len(data.train) + len(data.val) == 240 and 60 <= len(data.val) <= 63
  assert data.train.images.shape[1:] == (32, 32, 3) and data.val.labels.shape[1:] == (32, 32)
  assert data.train.images.dtype == np.uint8 and data.val.labels.dtype == np.uint16
  ids = np.concatenate([data.train.ids, data.val.ids])
  assert len(set(ids)) == 240 and all(i.startswith('synthetic_0_') for i in ids)
  assert data.train.labels.max() > 0 and data.train.images.std() > 10

  config = _config(output, image_size=32, val_fraction=0.25)
  config.data.dataset = 'synthetic_nuclei'
  batch = next(numpy_source.create_input(config).train_iter)
  assert batch['image'].shape == (2, 2, 32, 32, 3)


def test_registry_accepts_each_source_with_its_argument_only():
  from unetpp_jax import data  # pylint: disable=g-import-not-at-top
  assert data.source_error('tfds') is None and data.source_error('npz:/x.npz') is None
  assert data.source_error('release:/x.zip') is None
  for bad in ('npz:', 'npz', 'tfds:x', 'csv:x', '', 'release'):
    assert data.source_error(bad) == (f"config.data.source={bad!r} must be 'tfds' or 'npz:PATH' "
                                      "or 'release:PATH'.")
    config = synthetic.get_config()
    config.data.source = bad
    with pytest.raises(ValueError, match='must be'):
      data.create_input(config)

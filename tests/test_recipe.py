"""The DSB2018 recipe's pieces: contact-aware targets, native-scale crops with zoom in every source
(equal batches, exact resume), the release source."""

import io
import json
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import dsb, dsb_cpu, synthetic
from unetpp_jax import config_validation, losses
from unetpp_jax import data as data_sources
from unetpp_jax.data import contract, release_source, splits
from unetpp_jax.heads import Heads
from unetpp_jax.label_scheme import LabelScheme

S = 64  # configs/synthetic.py image size.


def _touching_pair():
  """Two 8x7 nuclei sharing a vertical edge, plus a separate one 1 px away from the second."""
  label = np.zeros((1, 14, 24), np.int32)
  label[0, 2:10, 1:8] = 1
  label[0, 2:10, 8:15] = 2
  label[0, 2:10, 16:23] = 3  # Column 15 is a 1-pixel background gap.
  return label


def test_contact_band_lies_between_touching_nuclei_and_splits_interiors():
  label = _touching_pair()
  target = np.asarray(losses.semantic_target(jnp.asarray(label), 3, contact_width=2))[0]
  assert set(np.unique(target)) == {0, 1, 2}
  np.testing.assert_array_equal(target > 0, label[0] > 0)  # Boundary stays inside nuclei.
  # Where 1 meets 2: two columns on each side of the contact line are boundary on every row.
  assert (target[2:10, 6:10] == 2).all()
  # A near-contact across a 1-pixel gap gets a band too: with width 3, the pixels within 3 px of
  # the other nucleus (columns 13-14 and 16-17), not just the rims (14 and 16).
  wider = np.asarray(losses.semantic_target(jnp.asarray(label), 3, contact_width=3))[0]
  assert (wider[2:10, 13:15] == 2).all() and (wider[2:10, 16:18] == 2).all()
  assert (target[3:9, 13] == 1).all()
  # Away from other nuclei only the 1-pixel rim is boundary: the far sides keep their interior.
  assert (target[3:9, 2] == 1).all() and (target[3:9, 21] == 1).all()
  # The interiors are separate components, one inside each nucleus.
  interiors, count = ndimage.label(target == 1)
  assert count == 3
  for k in range(1, 4):
    assert len(np.unique(label[0][interiors == k])) == 1
  # Without the band (contact_width 0) interiors 1 and 2 are separated only by their 1-px rims.
  rim = np.asarray(losses.semantic_target(jnp.asarray(label), 3))[0]
  assert (rim[3:9, 6] == 1).all() and ((target == 2).sum() > (rim == 2).sum())
  # An image without nuclei and a nucleus covering the whole image are valid.
  assert not np.asarray(losses.semantic_target(jnp.zeros((1, 5, 5), jnp.int32), 3, 2)).any()
  full = np.asarray(losses.semantic_target(jnp.ones((1, 5, 5), jnp.int32), 3, 2))[0]
  assert (full == 1).all()  # No other instance and no background: all interior.


def test_class_weights_weigh_the_boundary_pixels():
  label = _touching_pair()
  target = losses.semantic_target(jnp.asarray(label), 3, contact_width=2)
  logits = jnp.zeros(label.shape + (3,))  # Uniform prediction.
  kwargs = dict(bce_weight=1.0, dice_weight=0.0)
  plain = float(losses.head_loss(logits, target, jnp.ones(1), **kwargs))
  weighted = float(losses.head_loss(logits, target, jnp.ones(1), class_weights=(1.0, 1.0, 3.0),
                                    **kwargs))
  fraction = float(np.mean(np.asarray(target) == 2))
  np.testing.assert_allclose(weighted, plain * (1 + 2 * fraction), rtol=1e-5)


def test_contact_weight_weighs_only_the_contact_band():
  label = jnp.asarray(_touching_pair())
  band = np.asarray(losses.contact_band(label, 2))[0]
  # The band: two columns each side of the 1|2 contact, one each side of the 1-pixel gap.
  assert band[2:10, 6:10].all() and band[2:10, 14].all() and band[2:10, 16].all()
  assert band.sum() == 8 * 6 and not band[0].any()
  logits = [jnp.zeros(label.shape + (3,))]  # Uniform prediction: every pixel's CE is log 3.
  kwargs = dict(output=(1,), supervised=(1,), weights=(), bce_weight=1.0, dice_weight=0.0)
  three = dict(scheme=LabelScheme(num_classes=3, contact_width=2), class_weights=(1.0, 1.0, 3.0),
               **kwargs)
  weighted, _ = Heads(contact_weight=10.0, **three).loss(logits, label, jnp.ones(1))
  plain, _ = Heads(**three).loss(logits, label, jnp.ones(1))
  # Band pixels are boundary (class weight 3): their share of the CE grows by 3 * (10 - 1).
  np.testing.assert_allclose(float(weighted), float(plain) + np.log(3) * 27 * band.mean(),
                             rtol=1e-5)
  one_class, _ = Heads(scheme=LabelScheme(num_classes=1, contact_width=2), contact_weight=10.0,
                       **kwargs).loss([logits[0][..., :1]], label, jnp.ones(1))
  np.testing.assert_allclose(float(one_class), np.log(2), rtol=1e-5)  # 1 class: no band.


def test_recipe_configs_validate_and_bad_fields_are_named():
  for module in (dsb, dsb_cpu):
    config = module.get_config()
    config_validation.validate(config)
    assert config.data.train_preprocess == 'crop' and config.model.num_classes == 3
  for field, value, message in [
      ('data.image_size', 120, 'config.data.image_size=120'),
      ('loss.class_weights', (1.0, 2.0), 'config.loss.class_weights'),
      ('data.scale_range', (1.5, 1.0), 'config.data.scale_range'),
      ('loss.contact_width', -1, 'config.loss.contact_width'),
      ('loss.lovasz_weight', -1.0, 'lovasz_weight must be >= 0'),
      ('data.nucleus_diameter', -4.0, 'config.data.nucleus_diameter=-4.0 must be a size'),
      ('data.touching_crop_prob', 1.5, 'config.data.touching_crop_prob=1.5 must be in [0, 1]'),
      ('data.max_rotation', 270.0, 'config.data.max_rotation=270.0 must be an angle'),
      ('data.elastic', -2.0, 'config.data.elastic=-2.0 must be a length'),
      ('seed', -1, 'config.seed=-1 must be an integer >= 0'),
  ]:
    config = dsb_cpu.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
      config_validation.validate(config)
  config = dsb_cpu.get_config()
  config.loss.lovasz_weight = 0.5
  assert Heads.from_config(config).lovasz_weight == 0.5  # What the train step's loss adds.
  config.data.train_preprocess = 'resize'
  with pytest.raises(ValueError, match='config.data.scale_range'):
    config_validation.validate(config)
  config.data.scale_range, config.data.nucleus_diameter = (1.0, 1.0), 16.0
  with pytest.raises(ValueError, match="nucleus_diameter=16.0 zooms native-resolution crops"):
    config_validation.validate(config)
  config.data.nucleus_diameter, config.data.touching_crop_prob = 0.0, 0.5
  with pytest.raises(ValueError, match="touching_crop_prob=0.5 places native-resolution crops"):
    config_validation.validate(config)
  config.data.touching_crop_prob, config.data.max_rotation = 0.0, 30.0
  with pytest.raises(ValueError, match="max_rotation=30.0 rotates native-resolution crops"):
    config_validation.validate(config)
  config.data.max_rotation, config.data.elastic = 0.0, 3.0
  with pytest.raises(ValueError, match="elastic=3.0 deforms native-resolution crops"):
    config_validation.validate(config)


def _coded(height, width, seed):
  """uint8 image whose red channel is (7 * label) % 256, with blocky labels, and the label."""
  rng = np.random.default_rng(seed)
  label = np.zeros((height, width), np.uint16)
  for i in range(1, 7):
    y, x = rng.integers(0, height - 3), rng.integers(0, width - 3)
    label[y:y + rng.integers(6, 30), x:x + rng.integers(6, 30)] = i * 30
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  image[..., 0] = (7 * label.astype(np.int64)) % 256
  return image, label


@pytest.mark.parametrize('shape', [(90, 120), (40, 50), (64, 64), (130, 30)])
@pytest.mark.parametrize('zoom', [1.0, 0.8, 1.3])
def test_crop_keeps_image_and_label_aligned(shape, zoom):
  image, label = _coded(*shape, seed=shape[0])
  for fy, fx in [(0.0, 0.0), (0.99, 0.3), (0.5, 0.5)]:
    got_image, got_label = contract.crop(image, label, S, fy, fx, zoom)
    assert got_image.shape == (S, S, 3) and got_label.shape == (S, S)
    assert got_label.dtype == np.uint16 and got_image.dtype == np.uint8
    red = got_image[..., 0].astype(np.int64)
    if zoom == 1.0:  # A plain (reflect-padded) window: exact.
      np.testing.assert_array_equal(red, (7 * got_label.astype(np.int64)) % 256)
    else:  # Bilinear image, nearest label: equal wherever the label is locally constant.
      same = ndimage.minimum_filter(got_label, 3) == ndimage.maximum_filter(got_label, 3)
      assert same.mean() > 0.5
      np.testing.assert_allclose(red[same], ((7 * got_label.astype(np.int64)) % 256)[same],
                                 atol=1)
  # Reflection: a 40x50 image seen whole in the top-left corner of the window.
  if shape == (40, 50) and zoom == 1.0:
    got_image, got_label = contract.crop(image, label, S, 0.0, 0.0)
    np.testing.assert_array_equal(got_image[:40, :50], image)
    np.testing.assert_array_equal(got_label[40:48, :50], label[::-1][:8])


def _grid_of_squares(side, spacing=10, size=200):
  """uint16 [size, size] label of side x side squares every `spacing` pixels, and one large
  40x40 square (the median, not the mean, sets an image's nucleus size)."""
  label = np.zeros((size, size), np.uint16)
  for n, (y, x) in enumerate([(y, x) for y in range(2, size - side, spacing)
                              for x in range(2, size - side, spacing)]):
    label[y:y + side, x:x + side] = n + 1
  label[150:190, 150:190] = label.max() + 1
  return label


def test_median_diameter_and_size_factor():
  label = _grid_of_squares(6)
  assert contract.median_diameter(label) == pytest.approx(2 * np.sqrt(36 / np.pi))
  assert contract.median_diameter(label, min_size=37) == pytest.approx(2 * np.sqrt(1600 / np.pi))
  assert contract.median_diameter(np.zeros((9, 9), np.uint16)) == 0.0
  assert contract.size_factor(8.0, 16.0) == 2.0
  assert contract.size_factor(100.0, 16.0) == 1 / contract.MAX_SIZE_FACTOR  # Clipped.
  assert contract.size_factor(0.0, 16.0) == contract.size_factor(8.0, 0.0) == 1.0  # Nothing to do.


@pytest.mark.parametrize('side', [4, 6])
def test_size_normalised_crops_show_nuclei_at_the_set_diameter(side):
  label = _grid_of_squares(side)
  image = np.repeat((label > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
  target = 2 * 2 * np.sqrt(side * side / np.pi)  # Twice the squares' diameter.
  for fy, fx in [(0.0, 0.0), (0.3, 0.6), (0.9, 0.2)]:
    _, got = contract.crop(image, label, S, fy, fx, zoom=1.0, nucleus_diameter=target)
    areas = np.bincount(got.ravel())[1:]
    # Squares magnified 2x: (2 side)^2 pixels each, less where the window cuts one.
    assert areas.max() == (2 * side)**2 and (areas == (2 * side)**2).sum() >= 2
    # The random zoom applies on top, and the normalised crop is the plain crop at the product.
    for zoom in (0.8, 1.25):
      np.testing.assert_array_equal(
          contract.crop(image, label, S, fy, fx, zoom, nucleus_diameter=target)[1],
          contract.crop(image, label, S, fy, fx, zoom * 2.0)[1])


def test_touching_marks_the_pixels_where_nuclei_meet():
  got = contract.touching(_touching_pair()[0])
  want = np.zeros((14, 24), bool)
  want[2:10, 7:9] = True  # Columns 7 and 8 meet; nucleus 3 is 1 px away and touches nothing.
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('zoom', [1.0, 0.8, 1.3])
def test_touching_crops_are_centred_where_nuclei_touch(zoom):
  label = np.zeros((300, 260), np.uint16)
  label[20:40, 20:40] = 1  # Alone.
  label[200:230, 150:170], label[200:230, 170:190] = 2, 3  # Touching along x = 169 | 170.
  label[280:300, 240:260] = 4  # Alone, in the corner.
  rows, cols = np.mgrid[:300, :260]  # The image says where each pixel comes from.
  image = np.stack([rows // 2, cols, label * 50], -1).astype(np.uint8)
  centres = set()
  for pick in np.linspace(0, 0.999, 25):
    got_image, got_label = contract.crop(image, label, S, 0.9, 0.0, zoom, pick=pick)
    c = S // 2
    if zoom == 1.0:  # The window's centre is a pixel where 2 and 3 meet.
      y, x = 2 * int(got_image[c, c, 0]), int(got_image[c, c, 1])
      assert 200 <= y < 230 and x in (169, 170)
      centres.add((y, x))
      assert contract.touching(got_label)[c, c]
    else:  # Resized: the contact is still at the centre, within a pixel or two.
      assert contract.touching(got_label)[c - 2:c + 3, c - 2:c + 3].any()
  assert zoom != 1.0 or len(centres) > 10  # Picks spread along the contact.
  # Without touching nuclei, on a nucleus (as near the corner as the image allows); without
  # nuclei, the plain crop.
  lone = np.where(label == 4, label, 0)
  for pick in (0.0, 0.5, 0.99):
    assert contract.crop(image, lone, S, 0.0, 0.0, pick=pick)[1][S - 1, S - 1] == 4
  empty = np.zeros_like(label)
  for a, b in zip(contract.crop(image, empty, S, 0.3, 0.6, pick=0.5),
                  contract.crop(image, empty, S, 0.3, 0.6)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('zoom', [1.0, 0.8])
def test_rotated_crops_turn_the_window_about_its_centre(zoom):
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (150, 110, 3)).astype(np.uint8)  # No pixel is 0.
  label = rng.integers(1, 40, (150, 110)).astype(np.uint16)
  for fy, fx in ((0.3, 0.6), (0.0, 0.0), (1.0, 1.0)):  # Inside, and at two corners.
    plain = contract.crop(image, label, S, fy, fx, zoom)
    # A quarter turn is np.rot90 of the unrotated window: up to a 1e-3 degree, taken by the
    # general path, labels exactly and the image within the bilinear weights' rounding (once
    # more when the window is then resized).
    turned = contract.crop(image, label, S, fy, fx, zoom, angle=90.001)
    np.testing.assert_array_equal(turned[1], np.rot90(plain[1]))
    rounding = 1 if zoom == 1 else 2
    assert np.abs(turned[0].astype(int) - np.rot90(plain[0]).astype(int)).max() <= rounding
    # At any angle the corners past the image see it mirrored, never a fill of 0; labels are
    # ids of the source.
    rotated_image, rotated_label = contract.crop(image, label, S, fy, fx, zoom, angle=-37.0)
    assert rotated_image.min() > 0 and rotated_label.min() > 0
    assert set(np.unique(rotated_label)) <= set(np.unique(label))
  # A bar along x through the window's centre, turned by 45 degrees, lies on the diagonal.
  bar = np.zeros((200, 200), np.uint16)
  bar[97:103, 40:160] = 7
  stripe = np.where(bar[..., None] > 0, 200, 50).astype(np.uint8).repeat(3, -1)
  got_image, got_label = contract.crop(stripe, bar, S, 0.5, 0.5, angle=45.0)
  c = S // 2
  for d in (-20, -10, 10, 20):  # Counter-clockwise: the right end goes up.
    assert got_label[c - d, c + d] == 7 and got_label[c + d, c + d] == 0
    assert got_image[c - d, c + d, 0] > 150 and got_image[c + d, c + d, 0] < 80


def test_rotation_is_drawn_with_the_other_augmentation_parameters():
  positions = np.arange(400)
  off = contract.augment_params(0, positions, augment=True, jitter=0.1, touching_crop_prob=0.5)
  on = contract.augment_params(0, positions, augment=True, jitter=0.1, touching_crop_prob=0.5,
                               max_rotation=30.0)
  assert (off['angle'] == 0).all()
  assert -30 <= on['angle'].min() < -28 and 28 < on['angle'].max() <= 30
  for key in off.keys() - {'angle'}:
    np.testing.assert_array_equal(on[key], off[key], err_msg=key)


def _warp(dy, dx):
  return np.broadcast_to(np.float32([dy, dx]), (contract.WARP_GRID, contract.WARP_GRID, 2))


def test_elastic_crops_show_the_source_displaced_smoothly():
  rows, cols = np.mgrid[:200, :180]
  image = np.stack([rows, cols, np.full_like(rows, 9)], -1).astype(np.uint8)  # Where it comes from.
  label = (1 + rows // 10 * 18 + cols // 10).astype(np.uint16)  # Squares of 10x10.
  plain = contract.crop(image, label, S, 0.0, 0.0)
  for warp in (_warp(0, 0), _warp(1e-9, 0)):  # Skipped, or taken through a grown window.
    for a, b in zip(contract.crop(image, label, S, 0.0, 0.0, warp=warp), plain):
      np.testing.assert_array_equal(a, b)  # (Almost) no displacement: the plain crop.
  # An even displacement moves the window: 3 rows down, 2 columns right of the source (in pixels
  # of the crop: twice as many source pixels in a crop zoomed out 2x).
  for zoom, step in ((1.0, 1), (0.5, 2)):
    moved = contract.crop(image, label, S, 0.0, 0.0, zoom, warp=_warp(3, 2))
    want = contract.crop(image[3 * step:, 2 * step:], label[3 * step:, 2 * step:], S, 0.0, 0.0,
                         zoom)
    np.testing.assert_array_equal(moved[1], want[1])
    np.testing.assert_array_equal(moved[0], want[0])
  # Half a pixel: the image between two rows (bilinear; rows 2 grey levels apart).
  steep = 2 * image[:100]
  centred = contract.crop(steep, label[:100], S, 0.0, 0.0)[0][..., 0].astype(int)
  half = contract.crop(steep, label[:100], S, 0.0, 0.0, warp=_warp(0.5, 0))[0][..., 0]
  np.testing.assert_array_equal(half, centred + 1)
  # Random displacements: at the control points on the window's corners each pixel shows the
  # source that far away; in between they vary smoothly; past the image's edges, the image
  # mirrored (no fill), with or without rotation.
  warp = np.random.default_rng(0).normal(0, 3, (contract.WARP_GRID, contract.WARP_GRID, 2))
  y, x = 54, 46  # `crop`'s offsets for fy, fx = 0.4, 0.4 in a 200 x 180 image.
  got, _ = contract.crop(image, label, S, 0.4, 0.4, warp=warp)
  for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    source = np.array([y + (i % S), x + (j % S)]) + warp[i, j]
    assert np.abs(got[i, j, :2] - source).max() <= 0.5 + 1e-6  # The linear ramps, rounded.
  flow = got[..., :2] - (np.stack(np.mgrid[:S, :S], -1) + [y, x])
  assert np.abs(flow).max() > 3 and np.abs(np.diff(flow, axis=0)).max() <= 2
  for fy, fx, angle in ((0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 30.0)):
    warped_image, warped_label = contract.crop(image, label, S, fy, fx, 0.8, angle=angle,
                                               warp=4 * warp)
    assert (warped_image[..., 2] == 9).all() and warped_label.min() > 0
    assert set(np.unique(warped_label)) <= set(np.unique(label))


def test_elastic_warp_is_drawn_with_the_other_augmentation_parameters():
  positions = np.arange(400)
  off = contract.augment_params(0, positions, augment=True, jitter=0.1, max_rotation=30.0)
  on = contract.augment_params(0, positions, augment=True, jitter=0.1, max_rotation=30.0,
                               elastic=3.0)
  assert off['warp'].shape == (400, contract.WARP_GRID, contract.WARP_GRID, 2)
  assert not off['warp'].any()
  assert 2.9 < on['warp'].std() < 3.1 and abs(on['warp'].mean()) < 0.1
  assert np.abs(on['warp'][:, 0] - on['warp'][:, 1]).mean() > 2  # Independent at each point.
  for key in off.keys() - {'warp'}:
    np.testing.assert_array_equal(on[key], off[key], err_msg=key)


def test_zoom_is_drawn_with_the_other_augmentation_parameters():
  positions = np.arange(64)
  off = contract.augment_params(0, positions, augment=True, jitter=0.1)
  on = contract.augment_params(0, positions, augment=True, jitter=0.1, scale_range=(0.5, 2.0))
  assert (off['zoom'] == 1).all()
  assert 0.5 <= on['zoom'].min() < 0.7 and 1.4 < on['zoom'].max() <= 2.0
  for key in off:  # Switching the zoom on changes nothing else.
    if key != 'zoom':
      np.testing.assert_array_equal(off[key], on[key])


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.fixture(scope='module')
def release_zip(tmp_path_factory):
  """A small Kaggle-layout zip: 20 images of several sizes (some smaller than a crop), one without
  masks, touching rectangles as nuclei."""
  root = tmp_path_factory.mktemp('release')
  path = root / 'stage1_train.zip'
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(path, 'w') as z:
    for i in range(20):
      h, w = [(80, 100), (40, 56), (64, 64), (120, 70)][i % 4]
      image_id = f'{i:03d}abc'
      z.writestr(f'{image_id}/images/{image_id}.png',
                 _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
      for k in range(0 if i == 7 else 4):
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        mask[y:y + 12, x:x + 10] = 255
        z.writestr(f'{image_id}/masks/m{k}.png', _png(mask))
  return path


def _release_config(tmp_path, release_zip, source):
  config = synthetic.get_config()
  config.data.dataset = 'dsb2018'
  config.data.manual_dir = str(release_zip.parent)
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.train_preprocess = 'crop'
  config.data.scale_range = (0.7, 1.4)
  config.data.source = 'tfds' if source == 'tfds' else f'release:{release_zip}'
  return config


@pytest.mark.parametrize('split', ['tail', 'grouped'])
def test_release_source_matches_tfds_and_resumes_exactly(tmp_path_factory, release_zip, split,
                                                         monkeypatch):
  monkeypatch.setenv('UNETPP_JAX_SPLIT_CACHE', str(tmp_path_factory.mktemp('split_cache')))
  tmp_path = tmp_path_factory.mktemp('tfds')

  def config_of(source):
    config = _release_config(tmp_path, release_zip, source)
    config.data.split = split
    if split == 'grouped':  # Oversampling and size normalisation too: both sources must agree.
      config.data.repeats.update({'tissue': 2, 'brightfield': 3, 'fluorescence_crowded': 2})
      config.data.nucleus_diameter = 20.0
      config.data.touching_crop_prob = 0.5
      config.data.max_rotation = 30.0
      config.data.elastic = 3.0
    return config
  tfds_input = data_sources.create_input(config_of('tfds'), start_step=2)
  config = config_of('release')
  release_input = data_sources.create_input(config, start_step=2)
  if split == 'tail':
    assert (release_input.num_train, release_input.num_eval) == (16, 4)
  else:  # Each kind's share, rounded up, so at least the tail's 4.
    assert release_input.num_train + release_input.num_eval == 20
    assert release_input.num_eval >= 4
  stream = [next(release_input.train_iter) for _ in range(4)]
  for batch in stream:
    other = next(tfds_input.train_iter)
    np.testing.assert_array_equal(batch['label'], other['label'])
    np.testing.assert_allclose(batch['image'], other['image'], atol=1e-5)  # Jitter: tf vs numpy.
  assert any((b['label'] > 0).any() for b in stream)
  np.testing.assert_array_equal(release_input.eval_batches.ids, tfds_input.eval_batches.ids)
  for a, b in zip(release_input.eval_batches, tfds_input.eval_batches):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Exact resume: a source started at step 4 continues the stream started at step 2.
  resumed = data_sources.create_input(config, start_step=4)
  for want in stream[2:]:
    got = next(resumed.train_iter)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_release_source_needs_crop_and_a_path(release_zip):
  config = synthetic.get_config()
  config.data.source = f'release:{release_zip}'
  with pytest.raises(ValueError, match="train_preprocess='resize'"):
    data_sources.create_input(config)
  config.data.source = 'release'
  with pytest.raises(ValueError, match="'release:PATH'"):
    data_sources.create_input(config)


def test_tfds_order_and_split_sizes():
  ids = [f'{i:02d}' for i in range(10)]
  assert sorted(release_source.tfds_order(ids)) == ids and release_source.tfds_order(ids) != ids
  assert splits.num_train_examples(670, 0.2) == 536
  assert splits.num_train_examples(240, 0.2) == 192


def test_runs_recorded_before_the_recipe_fields_resume_without_a_config_change():
  from configs import dsb_paper  # pylint: disable=g-import-not-at-top
  config = dsb_paper.get_config()
  stored = json.loads(config.to_json_best_effort())  # As config.json holds it.
  for section, field in (('data', 'scale_range'), ('loss', 'contact_width'),
                         ('loss', 'class_weights')):
    del stored[section][field]
  assert config_validation.config_changes(stored, config) == []
  config.loss.contact_width = 2  # A real change is still reported.
  assert config_validation.config_changes(stored, config) == [
      'loss.contact_width: 0 -> 2']  # Absent means what those runs did: 0.

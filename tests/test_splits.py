"""Tests of the validation split: kinds of image, mosaic groups, the grouped split, oversampling,
and the model's input normalisation that makes the kinds look alike."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import color, data, exposure, transform

from configs import dsb, dsb_paper
from unetpp_jax import models
from unetpp_jax.data import contract, splits


def _fluorescence(size=(256, 256), seed=0, nuclei=20):
  """A dark image with `nuclei` bright blobs over smooth texture, and their label map."""
  rng = np.random.default_rng(seed)
  h, w = size
  background = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 8)
  grey = 12 + 40 * (background - background.min()) / np.ptp(background)
  label = np.zeros((h, w), np.uint16)
  yy, xx = np.mgrid[:h, :w]
  for k in range(1, nuclei + 1):
    cy, cx = rng.integers(4, h - 4), rng.integers(4, w - 4)
    disk = (yy - cy)**2 + (xx - cx)**2 < rng.integers(4, 30)
    label[disk & (label == 0)] = k
  grey = grey + 150 * (label > 0) + rng.normal(0, 2, (h, w))
  image = np.clip(grey, 0, 255).astype(np.uint8)
  return np.repeat(image[..., None], 3, axis=-1), label


def test_kinds_from_image_statistics():
  image, label = _fluorescence(nuclei=10)
  assert splits.image_kind(image, label) == 'fluorescence_sparse'
  crowded_image, crowded = _fluorescence(nuclei=200)
  assert len(np.unique(crowded[crowded > 0])) >= splits.CROWDED_NUCLEI
  assert splits.image_kind(crowded_image, crowded) == 'fluorescence_crowded'
  brightfield = 255 - image
  assert splits.image_kind(brightfield, label) == 'brightfield'
  tissue = brightfield.copy()
  tissue[..., 1] = tissue[..., 1] // 2  # Purple-pink: green suppressed.
  assert splits.image_kind(tissue, label) == 'tissue'


def test_a_mosaic_cut_into_four_tiles_is_one_group_and_unrelated_images_are_not():
  original, _ = _fluorescence((512, 512), seed=1, nuclei=60)
  tiles = {'t00': original[:256, :256], 't01': original[:256, 256:],
           't10': original[256:, :256], 't11': original[256:, 256:]}
  others = {f'other{i}': _fluorescence((256, 256), seed=10 + i)[0] for i in range(6)}
  groups = splits.mosaic_groups({**tiles, **others})
  assert {groups[t] for t in tiles} == {'t00'}
  assert sorted(groups[o] for o in others) == sorted(others)  # Each on its own.
  # A black, flat border matches any other black border: it must not join images.
  flat = {f'flat{i}': np.zeros((64, 64, 3), np.uint8) for i in range(3)}
  groups = splits.mosaic_groups(flat)
  assert sorted(groups.values()) == sorted(flat)


def _info(groups_by_kind):
  """{id: ImageInfo} for {kind: [group sizes]}."""
  info = {}
  for kind, sizes in groups_by_kind.items():
    for g, size in enumerate(sizes):
      for t in range(size):
        info[f'{kind}-{g:03d}-{t}'] = splits.ImageInfo(kind, f'{kind}-{g:03d}-0')
  return info


def test_grouped_split_keeps_groups_whole_and_every_kind_at_least_its_share():
  info = _info({'fluorescence_sparse': [4] * 60 + [1] * 100, 'fluorescence_crowded': [4] * 20,
                'tissue': [2] * 30 + [1] * 20, 'brightfield': [1] * 9})
  train, val = splits.grouped_split(info, 0.2)
  assert sorted(train + val) == sorted(info) and not set(train) & set(val)
  train_groups = {info[i].group for i in train}
  assert not any(info[i].group in train_groups for i in val)  # No tile's sibling in training.
  data_counts = collections.Counter(v.kind for v in info.values())
  val_counts = splits.kind_counts(val, info)
  for kind in splits.KINDS:
    assert val_counts[kind] >= 0.2 * data_counts[kind]
    assert val_counts[kind] / len(val) >= data_counts[kind] / len(info) - 0.02
  # Depends on the ids only: the same split again, and in any input order.
  assert splits.grouped_split(dict(reversed(list(info.items()))), 0.2) == (train, val)


def test_a_group_of_two_kinds_is_split_alike_in_any_input_order():
  info = _info({'fluorescence_sparse': [1] * 40, 'fluorescence_crowded': [1] * 10})
  for g in range(12):  # Mosaics whose two tiles are of two kinds: a tie for the group's kind.
    info[f'mixed-{g:02d}-a'] = splits.ImageInfo('fluorescence_sparse', f'mixed-{g:02d}-a')
    info[f'mixed-{g:02d}-b'] = splits.ImageInfo('fluorescence_crowded', f'mixed-{g:02d}-a')
  ids = sorted(info)
  splits_seen = {tuple(map(tuple, splits.grouped_split({i: info[i] for i in order}, 0.2)))
                 for order in (ids, ids[::-1], ids[1::2] + ids[::2])}
  assert len(splits_seen) == 1


def test_describe_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('UNETPP_JAX_SPLIT_CACHE', str(tmp_path))
  image, label = _fluorescence()
  examples = [{'id': 'a', 'image': image, 'label': label},
              {'id': 'b', 'image': 255 - image, 'label': label}]
  calls = []

  def produce():
    calls.append(1)
    return examples
  first = splits.describe(['a', 'b'], 'test', produce)
  assert first == {'a': splits.ImageInfo('fluorescence_sparse', 'a'),
                   'b': splits.ImageInfo('brightfield', 'b')}
  assert splits.describe(['a', 'b'], 'test', produce) == first and len(calls) == 1
  splits.describe(['a', 'b'], 'other data', produce)  # Another fingerprint: computed anew.
  assert len(calls) == 2


def test_a_release_folder_with_edited_masks_is_described_anew(tmp_path):
  from unetpp_jax.data import release_source  # pylint: disable=g-import-not-at-top
  masks = tmp_path / 'stage1_train' / 'a' / 'masks'
  masks.mkdir(parents=True)
  fingerprint = release_source._fingerprint  # pylint: disable=protected-access
  (masks / '1.png').write_bytes(b'x' * 100)
  before = fingerprint(str(tmp_path / 'stage1_train'))
  (masks / '1.png').write_bytes(b'x' * 120)  # A corrected label, saved in place.
  after = fingerprint(str(tmp_path / 'stage1_train/'))
  assert before != after and after.startswith('release:stage1_train:')


def test_oversampling_repeats_examples_per_epoch_and_keeps_the_stream_a_pure_function():
  config = dsb.get_config()
  config.data.repeats.update({'tissue': 2, 'brightfield': 3})
  info = {'f': splits.ImageInfo('fluorescence_sparse', 'f'), 't': splits.ImageInfo('tissue', 't'),
          'b': splits.ImageInfo('brightfield', 'b')}
  repeats = splits.train_repeats(config, ['f', 't', 'b'], info)
  assert repeats == (1, config.data.repeats.tissue, config.data.repeats.brightfield) == (1, 2, 3)
  assert splits.train_repeats(dsb_paper.get_config(), ['f', 't', 'b'], info) == ()  # All 1.
  layout = contract.Layout(0, 1, 1, 6, 6)
  schedule = contract.TrainSchedule(3, 0, 6, layout, True, 0.0, repeats=repeats)
  epoch = schedule.step(0)[0]  # One epoch is exactly one batch of 6 here.
  assert collections.Counter(epoch.tolist()) == {0: 1, 1: 2, 2: 3}
  # A pure function of the step: a new schedule resuming at step 5 draws the same batch.
  resumed = contract.TrainSchedule(3, 0, 6, layout, True, 0.0, repeats=repeats).iterate_from(5)
  np.testing.assert_array_equal(next(resumed)[0], schedule.step(5)[0])
  # Without repeats the stream is what it always was (exact resume of older runs).
  plain = contract.TrainSchedule(3, 0, 6, layout, True, 0.0)
  assert sorted(plain.step(0)[0].tolist()) == [0, 0, 1, 1, 2, 2]
  with pytest.raises(ValueError, match='repeats'):
    contract.TrainSchedule(3, 0, 6, layout, True, 0.0, repeats=(1, 2))


def test_grey_invert_makes_bright_background_images_look_like_fluorescence():
  image, _ = _fluorescence((64, 64))
  dark = jnp.asarray(image[None] / 255, jnp.float32)
  bright = 1.0 - dark  # The same scene on a bright background, nuclei dark.
  coloured = bright * jnp.array([1.0, 0.6, 0.9])  # Stained-tissue-like tint.
  norm = lambda x: models.normalize_input(x, 'grey_invert')
  assert norm(dark).shape == (1, 64, 64, 1)
  np.testing.assert_allclose(norm(bright), norm(dark), atol=1e-4)
  # A tint changes the grey levels, not the polarity: nuclei stay bright after normalisation.
  nuclei = image[..., 0] > 120
  assert float(norm(coloured)[0, ..., 0][nuclei].mean()) > 1.0
  np.testing.assert_allclose(models.normalize_input(dark, 'standardize'),
                             models.standardize(dark))
  with pytest.raises(ValueError, match='input_norm'):
    models.normalize_input(dark, 'nope')
  model = models.UNetPlusPlus(filters=(4, 8), input_norm='grey_invert')
  variables = model.init(jax.random.key(0), dark)
  assert variables['params']['X0_0']['Conv_0']['kernel'].shape[-2] == 1  # One grey channel.


def test_haematoxylin_keeps_eosin_stroma_dark_where_grey_invert_lights_it_up():
  image, label = _fluorescence((64, 64))
  dark = jnp.asarray(image[None] / 255, jnp.float32)
  # Fluorescence is left as grey_invert leaves it.
  np.testing.assert_allclose(models.normalize_input(dark, 'haematoxylin'),
                             models.normalize_input(dark, 'grey_invert'), atol=1e-6)
  # An H&E-like section: white background, eosin-pink stroma on the right half, purple nuclei.
  nuclei, stroma = label > 0, (np.arange(64) >= 32)[None, :] & (label == 0)
  section = np.full((64, 64, 3), (0.95, 0.93, 0.95), np.float32)
  section[stroma] = (0.90, 0.55, 0.75)
  section[nuclei] = (0.45, 0.30, 0.65)
  background = ~nuclei & ~stroma

  def contrast(input_norm):
    """How far stroma rises above the background, as a fraction of how far nuclei rise."""
    view = np.asarray(models.normalize_input(jnp.asarray(section[None]), input_norm))[0, ..., 0]
    return ((view[stroma].mean() - view[background].mean())
            / (view[nuclei].mean() - view[background].mean()))

  assert contrast('grey_invert') > 0.35  # Stroma looks like a dim nucleus...
  assert abs(contrast('haematoxylin')) < 0.1  # ...but holds almost no haematoxylin.
  # The density is skimage's colour deconvolution, up to its fixed scale.
  reference = color.rgb2hed(section)[..., :1]
  density = np.asarray(models.haematoxylin(jnp.asarray(section)))
  np.testing.assert_allclose(density / density.max(), reference / reference.max(), atol=1e-5)
  # 'rgb_haematoxylin' gives the network both views: the standardised colours, then the stain.
  both = models.normalize_input(jnp.asarray(section[None]), 'rgb_haematoxylin')
  np.testing.assert_allclose(both[..., :3], models.normalize_input(section[None], 'standardize'))
  np.testing.assert_allclose(both[..., 3:], models.normalize_input(section[None], 'haematoxylin'))
  for input_norm, channels in (('haematoxylin', 1), ('rgb_haematoxylin', 4)):
    model = models.UNetPlusPlus(filters=(4, 8), input_norm=input_norm)
    variables = model.init(jax.random.key(0), jnp.asarray(section[None]))
    assert variables['params']['X0_0']['Conv_0']['kernel'].shape[-2] == channels


def test_clahe_is_skimages_algorithm_with_regions_fixed_in_pixels():
  scene = transform.resize(data.camera(), (100, 140), anti_aliasing=True).astype(np.float32)
  scene = (scene - scene.min()) / np.ptp(scene)
  # Unclipped (plain adaptive equalisation) it maps and blends the regions as skimage does, whose
  # output is rescaled to [0, 1]; regions of 30 or 34 px would differ by twice as much.
  ours = np.asarray(models.clahe(jnp.asarray(scene[None]), tile=32, clip_limit=1.0))[0]
  ours = (ours - ours.min()) / np.ptp(ours)
  want = exposure.equalize_adapthist(scene, kernel_size=32, clip_limit=1.0, nbins=256)
  assert np.abs(ours - want).mean() < 0.018
  # Clipping is what keeps it from stretching the noise of a flat background to full range.
  flat = 0.5 + 0.002 * np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32)
  assert np.std(models.clahe(jnp.asarray(flat), clip_limit=1.0)) > 0.2
  assert np.std(models.clahe(jnp.asarray(flat))) < 0.02
  # Regions are 32 px wherever the image comes from: a crop on the region grid is equalised as
  # the whole image is, but for the half region at its border (blended with regions outside).
  whole = np.asarray(models.clahe(jnp.asarray(scene[None, :96, :128])))[0]
  crop = np.asarray(models.clahe(jnp.asarray(scene[None, 32:96, 32:96])))[0]
  np.testing.assert_allclose(crop[16:-16, 16:-16], whole[48:80, 48:80], atol=1e-5)


def test_clahe_channel_lifts_the_contrast_of_dimly_lit_nuclei():
  image, label = _fluorescence((64, 128))
  nuclei = label > 0
  # The left half lit four times more dimly than the right: the grey view keeps that factor
  # between the two halves' nuclei; equalised, the dim ones stand out by about 40% more, and
  # as much as the bright ones without the clipping that keeps noise down.
  left = np.broadcast_to(np.arange(128) < 64, nuclei.shape)
  grey = image[..., 0] / 255 * np.where(left, 0.25, 1.0)
  rgb = jnp.asarray(np.repeat(grey[None, ..., None], 3, axis=-1), jnp.float32)
  views = np.asarray(models.normalize_input(rgb, 'rgb_haematoxylin_clahe'))[0]
  assert views.shape == (64, 128, 5)
  np.testing.assert_allclose(views[..., :4],
                             models.normalize_input(rgb, 'rgb_haematoxylin')[0], atol=1e-6)

  def dim_over_bright(view):
    def rise(half):
      return view[nuclei & half].mean() - view[~nuclei & half].mean()
    return rise(left) / rise(~left)

  assert 0.23 < dim_over_bright(views[..., 3]) < 0.27
  assert dim_over_bright(views[..., 4]) > 0.31
  assert dim_over_bright(np.asarray(models.clahe(rgb[..., 0], clip_limit=1.0))[0]) > 0.85
  # On a bright background it equalises the inverted grey: nuclei are bright there too.
  section = jnp.asarray(np.repeat(1 - image[None, ..., :1] / 255, 3, axis=-1), jnp.float32)
  equalised = np.asarray(models.normalize_input(section, 'rgb_haematoxylin_clahe'))[0, ..., 4]
  assert equalised[nuclei].mean() - equalised[~nuclei].mean() > 1.0
  model = models.UNetPlusPlus(filters=(4, 8), input_norm='rgb_haematoxylin_clahe')
  variables = model.init(jax.random.key(0), section)
  assert variables['params']['X0_0']['Conv_0']['kernel'].shape[-2] == 5

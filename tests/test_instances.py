"""Probabilities -> instances: the watershed splits touching nuclei, components do not."""

import dataclasses

import numpy as np
import pytest

from unetpp_jax.evaluation import instances

YY, XX = np.mgrid[:60, :100]


def _disk(cy, cx, r):
  return (YY - cy) ** 2 + (XX - cx) ** 2 < r**2


TOUCHING = _disk(30, 30, 15) | _disk(30, 56, 15)  # Overlapping disks: one blob with a neck.


def test_watershed_splits_touching_nuclei_components_do_not():
  prob = TOUCHING.astype(np.float32)
  split = instances.to_instances(prob)
  assert split.max() == 2
  assert split[30, 20] != split[30, 66] and split[30, 20] > 0 and split[30, 66] > 0
  assert np.array_equal(split > 0, TOUCHING)  # Every foreground pixel belongs to an instance.
  whole = instances.to_instances(prob, options=instances.InstanceOptions(method='components'))
  assert whole.max() == 1


def test_small_instances_are_removed_and_ids_are_consecutive():
  prob = (_disk(10, 10, 6) | _disk(40, 80, 2) | _disk(45, 30, 8)).astype(np.float32)
  label = instances.to_instances(prob, options=instances.InstanceOptions(min_size=20))
  assert sorted(np.unique(label)) == [0, 1, 2]  # The 12-pixel disk is gone.
  assert label[40, 80] == 0
  assert label.dtype == np.int32


@pytest.mark.parametrize('method', instances.METHODS)
def test_hesitant_instances_are_removed(method):
  # Two nuclei of one size: one the network is sure of, one above the threshold only in patches
  # (as the dark cytoplasm of a brightfield cell), whose mean probability is 0.7.
  sure, hesitant = _disk(30, 20, 12), _disk(30, 75, 12)
  patches = np.where((YY + XX) % 2 == 0, 0.9, 0.5)
  prob = np.where(sure, 0.95, np.where(hesitant, patches, 0.0)).astype(np.float32)
  options = instances.InstanceOptions(method=method, threshold=0.4)
  assert instances.to_instances(prob, options=options).max() == 2  # Off by default.
  label = instances.to_instances(prob, options=dataclasses.replace(options, min_confidence=0.8))
  assert label.max() == 1 and label[30, 20] == 1 and not label[hesitant].any()
  assert np.array_equal(label > 0, sure)  # The confident nucleus keeps every pixel.
  mean = float(prob[hesitant].mean())
  just_under = dataclasses.replace(options, min_confidence=mean - 1e-3)
  assert instances.to_instances(prob, options=just_under).max() == 2
  with pytest.raises(ValueError, match='must be a probability'):
    instances.InstanceOptions(min_confidence=80)


def test_threshold_and_empty_input():
  prob = np.where(TOUCHING, 0.6, 0.1).astype(np.float32)
  assert instances.to_instances(prob).max() == 2
  assert instances.to_instances(prob, options=instances.InstanceOptions(threshold=0.7)).max() == 0


def test_bright_background_images_take_their_own_options():
  prob = np.where(TOUCHING, 0.65, 0.1).astype(np.float32)
  options = instances.InstanceOptions(threshold=0.7,
                                      bright={'threshold': 0.6, 'method': 'components'})
  assert options.for_background(True) == instances.InstanceOptions(threshold=0.6,
                                                                   method='components')
  assert options.for_background(False) == instances.InstanceOptions(threshold=0.7)
  dark = instances.to_instances(prob, options=options.for_background(False))
  assert dark.max() == 0  # Under the threshold.
  bright = instances.to_instances(prob, options=options.for_background(True))
  assert bright.max() == 1 and np.array_equal(bright > 0, TOUCHING)  # Not split.
  same = instances.InstanceOptions(threshold=0.6)  # No bright changes: one set for every image.
  assert same.for_background(True) == same.for_background(False) == same
  assert instances.to_instances(prob, options=same).max() == 2
  with pytest.raises(ValueError, match='pass those of the image'):
    instances.to_instances(prob, options=options)  # Which image's options is not said.
  with pytest.raises(ValueError, match=r'may only change the fields .*seed_h'):
    instances.InstanceOptions(bright={'sed_h': 2.0})
  with pytest.raises(ValueError, match='must be a probability'):
    instances.InstanceOptions(bright={'min_confidence': 80})


def test_boundary_seeds_follow_the_predicted_boundary():
  # A 3-class prediction: two nuclei in one foreground blob, separated by a boundary line.
  foreground = (_disk(30, 30, 15) | _disk(30, 52, 15)).astype(np.float32)
  boundary = np.zeros_like(foreground)
  boundary[:, 40:43] = foreground[:, 40:43]
  label = instances.to_instances(foreground, boundary,
                                 instances.InstanceOptions(seeds='boundary'))
  assert label.max() == 2 and label[30, 25] != label[30, 60]
  with pytest.raises(ValueError, match='num_classes=3'):
    instances.to_instances(foreground, None, instances.InstanceOptions(seeds='boundary'))


def test_interior_seeds_cut_a_clump_without_a_neck_at_the_predicted_boundary():
  # Two nuclei pressed into one rectangle: its outline has no neck, so the distance to the
  # background has one ridge and 'distance' seeds see one nucleus; the boundary the network
  # predicts between them gives the interior two distance maxima.
  foreground = np.zeros((60, 100), np.float32)
  foreground[20:40, 20:80] = 1
  boundary = np.zeros_like(foreground)
  boundary[20:40, 49:52] = 0.9
  assert instances.to_instances(foreground, boundary).max() == 1
  options = instances.InstanceOptions(seeds='interior')
  label = instances.to_instances(foreground, boundary, options)
  assert label.max() == 2 and label[30, 30] != label[30, 70]
  assert np.array_equal(label > 0, foreground > 0.5)  # The boundary is flooded too.
  # An uncertain boundary (p(nucleus) = 0.6 on it) cuts only for markers above 0.6.
  faint = boundary * 0.4 / 0.9
  assert instances.to_instances(foreground, faint, options).max() == 1
  assert instances.to_instances(foreground, faint, dataclasses.replace(
      options, marker_threshold=0.7)).max() == 2
  with pytest.raises(ValueError, match='num_classes=3'):
    instances.to_instances(foreground, None, options)


def test_product_seeds_split_at_the_boundary_and_drop_small_seeds():
  # Two nuclei in one blob, a predicted boundary between them, and a faint rim of foreground
  # that reaches below the seed threshold but above the extent threshold.
  core = _disk(30, 30, 13) | _disk(30, 54, 13)
  foreground = np.where(core, 0.95, np.where(_disk(30, 30, 16) | _disk(30, 54, 16), 0.45, 0.0))
  boundary = np.zeros_like(foreground)
  boundary[:, 41:44] = 0.9 * (foreground[:, 41:44] > 0)
  options = instances.InstanceOptions(seeds='product', threshold=0.4, seed_threshold=0.7)
  label = instances.to_instances(foreground.astype(np.float32), boundary.astype(np.float32),
                                 options)
  assert label.max() == 2 and label[30, 20] != label[30, 64]
  assert np.array_equal(label > 0, foreground > 0.4)  # The extent comes from the lower threshold.
  # A seed smaller than min_seed_size seeds nothing: its blob is kept as an unreached piece.
  tiny = np.where(_disk(10, 85, 2), 0.9, np.where(_disk(10, 85, 6), 0.5, 0.0))
  small = instances.to_instances(tiny.astype(np.float32), None, dataclasses.replace(
      options, min_seed_size=50, min_size=1))
  assert small.max() == 1
  # 1-class models: seeds from p(foreground) alone.
  assert instances.to_instances(foreground.astype(np.float32), None, options).max() >= 1


def test_rejects_unknown_options():
  with pytest.raises(ValueError, match='method'):
    instances.InstanceOptions(method='magic')


def test_holes_are_filled_and_marker_threshold_applies():
  ring = _disk(30, 30, 15) & ~_disk(30, 30, 5)  # A nucleus with a pale centre.
  label = instances.to_instances(ring.astype(np.float32))
  assert label.max() == 1 and label[30, 30] == 1
  unfilled = instances.to_instances(ring.astype(np.float32),
                                    options=instances.InstanceOptions(fill_holes=False))
  assert unfilled[30, 30] == 0
  # Two nuclei whose shared boundary is uncertain (p = 0.4, so p(nucleus) = 0.6 there): markers
  # at p(nucleus) > 0.5 (the default, = threshold) merge across it, markers at > 0.7 do not.
  foreground = (_disk(30, 30, 15) | _disk(30, 52, 15)).astype(np.float32)
  boundary = np.zeros_like(foreground)
  boundary[:, 40:43] = 0.4 * foreground[:, 40:43]
  merged = instances.to_instances(foreground, boundary, instances.InstanceOptions(seeds='boundary'))
  split = instances.to_instances(foreground, boundary, instances.InstanceOptions(
      seeds='boundary', marker_threshold=0.7))
  assert split.max() == 2 and merged.max() == 1


def test_seed_dynamic_scales_with_the_median_nucleus_radius():
  yy, xx = np.mgrid[:80, :160]
  disk = lambda cy, cx, r: (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
  dented = disk(40, 40, 20) | disk(40, 58, 18)  # A large nucleus with a shallow dent.
  pair = disk(40, 110, 6) | disk(40, 120, 5)  # Two small touching nuclei: a deep neck.
  prob = (dented | pair).astype(np.float32)
  absolute = instances.to_instances(prob)
  relative = instances.to_instances(prob, options=instances.InstanceOptions(seed_h_per_radius=0.1))
  pieces = lambda label, where: len(np.unique(label[where]))
  assert (pieces(absolute, dented), pieces(absolute, pair)) == (2, 2)
  assert (pieces(relative, dented), pieces(relative, pair)) == (1, 2)
  assert np.array_equal(relative > 0, prob > 0.5)
  # Never below seed_h: a fraction of the radius under it changes nothing.
  small = instances.InstanceOptions(seed_h_per_radius=0.01)
  assert np.array_equal(instances.to_instances(prob, options=small), absolute)

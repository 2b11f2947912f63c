"""The label scheme: one object says which models have a boundary class, and what follows."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from unetpp_jax import inference_flags, losses
from unetpp_jax.evaluation import instances
from unetpp_jax.label_scheme import LabelScheme


def _touching_pair():
  label = np.zeros((1, 8, 12), np.int32)
  label[0, 1:7, 1:6] = 1
  label[0, 1:7, 6:11] = 2
  return jnp.asarray(label)


@pytest.mark.parametrize('num_classes, channels', [
    (1, ('foreground',)), (2, ('foreground',)), (3, ('foreground', 'boundary'))])
def test_channels_and_probabilities(num_classes, channels):
  scheme = LabelScheme(num_classes)
  assert scheme.channels == channels and scheme.has_boundary == (num_classes == 3)
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7, num_classes))
  probs = np.asarray(scheme.probabilities(logits))
  assert probs.shape == (2, 5, 7, len(channels))
  # What evaluation computed before the scheme: sigmoid, or 1 - p(background) and p(class 2).
  if num_classes == 1:
    expected = [jax.nn.sigmoid(logits[..., 0])]
  else:
    softmax = jax.nn.softmax(logits, axis=-1)
    expected = [1 - softmax[..., 0]] + ([softmax[..., 2]] if num_classes == 3 else [])
  np.testing.assert_allclose(probs, np.stack(expected, axis=-1), atol=1e-6)
  foreground, boundary = scheme.split(probs)
  np.testing.assert_array_equal(foreground, probs[..., 0])
  assert (boundary is None) == (num_classes != 3)


def test_target_and_contact_band_follow_the_config():
  config = ml_collections.ConfigDict({'model': {'num_classes': 3}, 'loss': {'contact_width': 2}})
  scheme = LabelScheme.from_config(config)
  assert scheme == LabelScheme(num_classes=3, contact_width=2)
  label = _touching_pair()
  np.testing.assert_array_equal(scheme.target(label), losses.semantic_target(label, 3, 2))
  np.testing.assert_array_equal(scheme.contact_band(label), losses.contact_band(label, 2))
  assert (np.asarray(scheme.target(label)) == losses.BOUNDARY).any()
  # No band without a boundary class or without a width; 1 class: nucleus vs background.
  assert LabelScheme(3).contact_band(label) is None
  assert LabelScheme(1, contact_width=2).contact_band(label) is None
  np.testing.assert_array_equal(LabelScheme(1, 2).target(label), np.asarray(label) > 0)
  # Configs from before contact_width existed.
  del config.loss.contact_width
  assert LabelScheme.from_config(config) == LabelScheme(num_classes=3)


def test_default_instance_options_and_unset_changes():
  assert instances.default_options(LabelScheme(1)) == instances.InstanceOptions()
  assert instances.default_options(LabelScheme(2)) == instances.InstanceOptions()
  three = instances.default_options(LabelScheme(3, contact_width=2))
  assert (three.seeds, three.threshold, three.min_size, three.seed_h_per_radius,
          three.min_confidence) == ('distance', 0.7, 30, 0.1, 0.8)
  assert three.bright == {'threshold': 0.6, 'seed_h': 1.5}
  # Unset flags (None, --seeds=auto) keep the scheme's defaults; set ones replace them.
  assert instances.default_options(LabelScheme(3), seeds='auto', threshold=None,
                                   min_size=None, marker_threshold=None, seed_h=None,
                                   seed_h_per_radius=None, min_confidence=None) == three
  changed = instances.default_options(LabelScheme(3), seeds='boundary', threshold=0.5,
                                      fill_holes=False)
  assert (changed.seeds, changed.threshold, changed.min_size, changed.fill_holes) == (
      'boundary', 0.5, 30, False)
  # A change is for every image: it replaces the bright-background default of its field.
  assert changed.bright == {'seed_h': 1.5}
  assert changed.for_background(bright=True).threshold == 0.5
  with pytest.raises(TypeError):
    instances.default_options(LabelScheme(1), no_such_option=1)


def test_instance_flags_of_evaluate_and_segment_reach_the_options():
  config = ml_collections.ConfigDict({'model': {'num_classes': 3}, 'loss': {}})
  parsed = flags.FLAGS.is_parsed()  # pytest parses no absl flags: their defaults, then.
  flags.FLAGS.mark_as_parsed()
  try:
    assert inference_flags.instance_options(config) == instances.default_options(LabelScheme(3))
    with flagsaver.flagsaver(min_confidence=0.5, min_size=7, seeds='boundary'):
      assert inference_flags.instance_options(config) == instances.default_options(
          LabelScheme(3), min_confidence=0.5, min_size=7, seeds='boundary')
    with flagsaver.flagsaver(seeds='interior', smooth=2.0):
      bright = inference_flags.instance_options(config).for_background(bright=True)
      assert (bright.seeds, bright.smooth, bright.threshold, bright.seed_h) == (
          'interior', 2.0, 0.6, 1.5)
  finally:
    if not parsed:
      flags.FLAGS.unparse_flags()

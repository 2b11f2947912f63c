"""The example schema every nuclei builder emits (the pipelines rely on it)."""

import numpy as np
import tensorflow_datasets as tfds


def nuclei_features() -> tfds.features.FeaturesDict:
  """id; uint8 RGB image; uint16 instance map (0 background, 1..N nuclei), stored as 16-bit PNG."""
  return tfds.features.FeaturesDict({
      'id': tfds.features.Text(),
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint16),
  })

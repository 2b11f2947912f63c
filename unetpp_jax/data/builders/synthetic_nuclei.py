"""Procedurally generated nuclei images: an offline stand-in for DSB2018.

Every example is a pure function of (index, seed), so the dataset needs no download and is
identical on every machine. Two imaging styles mimic the main DSB2018 modalities:

* fluorescence: dark background, bright textured nuclei (grayscale stored as RGB);
* brightfield: bright, slightly tinted background, darker purple nuclei (H&E-like).

Nuclei are rotated ellipses of varying size; some are placed touching or overlapping an earlier
one. Images get uneven illumination and pixel noise, and their sizes vary (not always square).
The label is an instance map (0 = background, 1..N = nuclei); where nuclei overlap the later one
wins, as in the DSB2018 builder.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from unetpp_jax.data.builders import features

NUM_EXAMPLES = 240
MIN_SIZE = 96
MAX_SIZE = 160


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
  """Zero-mean, unit-scale noise that varies smoothly over about `cell` pixels."""
  h, w = shape
  coarse = rng.standard_normal((h // cell + 2, w // cell + 2))
  # Bilinear upsampling of the coarse grid (separable: rows, then columns).
  ys = np.arange(h) / cell
  xs = np.arange(w) / cell
  y0 = ys.astype(int)
  x0 = xs.astype(int)
  fy = (ys - y0)[:, None]
  fx = (xs - x0)[None, :]
  top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
  bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _place_nuclei(
    rng: np.random.Generator, h: int, w: int
) -> list[tuple[float, float, float, float, float]]:
  """Returns ellipses (cy, cx, semi-axis a, semi-axis b, angle); some touch/overlap earlier ones."""
  scale = min(h, w) / 128  # Nuclei scale with the image, like DSB's magnifications.
  ellipses = []
  for _ in range(int(rng.integers(5, 20))):
    a = rng.uniform(6, 14) * scale
    b = a * rng.uniform(0.55, 1.0)
    angle = rng.uniform(0, np.pi)
    if ellipses and rng.random() < 0.35:
      # Next to an earlier nucleus: centre distance 0.7..1.05 x the sum of radii, so the two
      # overlap or just touch.
      py, px, pa, _, _ = ellipses[int(rng.integers(len(ellipses)))]
      direction = rng.uniform(0, 2 * np.pi)
      dist = (pa + a) * rng.uniform(0.7, 1.05)
      cy = float(np.clip(py + dist * np.sin(direction), 0, h - 1))
      cx = float(np.clip(px + dist * np.cos(direction), 0, w - 1))
    else:
      cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
    ellipses.append((cy, cx, a, b, angle))
  return ellipses


def generate_example(index: int, seed: int = 0) -> dict[str, Any]:
  """Generates one synthetic example, deterministically from (index, seed).

  Args:
    index: example index (any non-negative int).
    seed: dataset seed; different seeds give unrelated datasets.

  Returns:
    {'id': str, 'image': uint8 [H, W, 3], 'label': uint16 [H, W]} with H, W in
    [MIN_SIZE, MAX_SIZE]; label 0 is background and 1..N are the N visible nuclei.
  """
  rng = np.random.default_rng([seed, index])
  h, w = (int(s) for s in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
  fluorescence = bool(rng.random() < 0.5)

  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  label = np.zeros((h, w), np.uint16)
  # Per-pixel nucleus "thickness" in [0, 1]: brightest in the centre, fading towards the rim.
  profile = np.zeros((h, w), np.float32)
  strength = np.zeros((h, w), np.float32)
  for i, (cy, cx, a, b, angle) in enumerate(_place_nuclei(rng, h, w), start=1):
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * cos + (yy - cy) * sin) / a
    v = (-(xx - cx) * sin + (yy - cy) * cos) / b
    r2 = u * u + v * v
    inside = r2 <= 1.0
    label[inside] = i  # Later nuclei are drawn on top.
    profile[inside] = 1.0 - 0.35 * r2[inside]
    strength[inside] = rng.uniform(0.5, 1.0)

  # Nuclei hidden entirely under later ones (or tiny ones) vanish: renumber the visible ones 1..N
  # in drawing order so that every id 1..N is present.
  visible = np.unique(label[label > 0])
  remap = np.zeros(int(visible.max()) + 1, np.uint16)
  remap[visible] = np.arange(1, len(visible) + 1, dtype=np.uint16)
  label = remap[label]

  texture = 1.0 + 0.15 * _smooth_noise(rng, (h, w), cell=3)  # Chromatin-like granularity.
  nuclei = profile * strength * texture
  # Uneven illumination: a random linear gradient plus a soft vignette.
  gy, gx = rng.uniform(-0.25, 0.25, size=2)
  illumination = (1.0 + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)
                  - 0.15 * ((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2))
  illumination += 0.05 * _smooth_noise(rng, (h, w), cell=32)

  if fluorescence:
    background = rng.uniform(0.02, 0.1)
    gray = (background + rng.uniform(0.5, 0.85) * nuclei) * illumination
    image = np.repeat(gray[..., None], 3, axis=-1)
    noise_sigma = rng.uniform(0.01, 0.04)
  else:
    background_rgb = np.array([0.92, 0.86, 0.9]) + rng.uniform(-0.05, 0.05, size=3)
    # Absorbance of hematoxylin-stained nuclei: more in red/green than blue -> purple.
    absorb_rgb = np.array([0.55, 0.65, 0.35]) * rng.uniform(0.7, 1.1)
    image = (background_rgb - absorb_rgb * nuclei[..., None]) * illumination[..., None]
    noise_sigma = rng.uniform(0.01, 0.03)
  image = image + noise_sigma * rng.standard_normal(image.shape)
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return {'id': f'synthetic_{seed}_{index:05d}', 'image': image, 'label': label}


class SyntheticNuclei(tfds.core.GeneratorBasedBuilder):
  """Synthetic fluorescence/brightfield nuclei with instance labels (offline DSB2018 stand-in)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.nuclei_features(),
        homepage='https://github.com/MrGiovanni/UNetPlusPlus',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(NUM_EXAMPLES)}

  def _generate_examples(self, num_examples: int):
    for index in range(num_examples):
      example = generate_example(index)
      example['label'] = example['label'][..., None]
      yield index, example

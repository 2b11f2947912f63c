"""Semantic probabilities -> nucleus instances (a label map: 0 = background, 1..N = nuclei).

1. Foreground = probability > threshold (`InstanceOptions` 0.5, as `metrics.THRESHOLD`; the
   defaults of 3-class models are higher, see `default_options`), with holes filled (a
   nucleus is simply connected; a hole is a pale centre the network missed).
2. Split touching nuclei ('watershed'), or keep connected components as they are ('components',
   4-connectivity). The watershed floods the foreground from one seed per nucleus:
   * 'distance' seeds: the h-maxima of the (Gaussian-smoothed) Euclidean distance to the background,
     i.e. the centres of the roughly convex blobs; two nuclei joined by a neck yield two maxima
     whose dynamic exceeds `seed_h` pixels. The flooding follows the inverted distance map.
     With `seed_h_per_radius` the dynamic is at least that fraction of the image's median
     nucleus radius, measured on a first pass: a neck that separates two 5-pixel nuclei is a
     dent in a 20-pixel one, which should stay whole.
   * 'interior' seeds (3-class models): 'distance' seeds of the predicted nucleus interior
     p(nucleus) > marker_threshold (default: threshold) instead of the foreground: the contact
     bands the network draws between touching nuclei cut a crowded clump into its nuclei before
     the distance is measured, where the clump's outline alone shows no neck. The flooding
     follows that distance over the whole foreground.
   * 'boundary' seeds (3-class models: background / nucleus / boundary, see
     `losses.semantic_target`): the connected components of the nucleus-interior prediction
     p(nucleus) > marker_threshold (default: threshold); the flooding follows p(boundary), so the
     contact bands between touching nuclei become the watershed lines.
   * 'product' seeds (the DSB2018 winners' decoding): the connected components of
     p(foreground) * (1 - p(boundary)) > seed_threshold with at least min_seed_size pixels (the
     confident cores of nuclei, away from every border); the flooding follows p(foreground) down
     to the extent threshold, which is then usually set lower than for the other seeds. Without a
     boundary class (1-class models) the seeds are p(foreground) > seed_threshold.
   Foreground pieces that no seed reaches (e.g. thin slivers without an h-maximum) are kept as
   instances of their own.
3. Instances smaller than `min_size` pixels are dropped (they are mostly noise and each would be a
   false positive), and so are those whose mean p(foreground) is below `min_confidence`: the
   network is sure of a nucleus throughout it, and hesitant over the dark cytoplasm of brightfield
   cells or the stroma of a stained section that crosses the threshold in patches. The rest are
   renumbered 1..N.

Images with a bright background (stained tissue, brightfield: `splits.bright_background` of the
image) may take other values of these options (`InstanceOptions.bright`): the network's
probabilities over textured, large nuclei on a bright background call for other thresholds and
seeds than over a fluorescence image's crowded small nuclei.

The defaults (`default_options`: those of `InstanceOptions`, changed by the model's
`LabelScheme.instance_defaults`) were chosen on the DSB2018 validation split; the scores behind
them are in docs/results.md, and docs/evaluation.md lists them.
"""

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import morphology, segmentation

from unetpp_jax.data import contract
from unetpp_jax.label_scheme import LabelScheme

METHODS = ('watershed', 'components')
SEEDS = ('distance', 'boundary', 'product', 'interior')


@dataclasses.dataclass(frozen=True)
class InstanceOptions:
  """How probabilities become instances (see the module docstring)."""
  threshold: float = 0.5
  method: str = 'watershed'
  seeds: str = 'distance'
  seed_h: float = 0.5  # Minimum dynamic (in pixels of distance) of a 'distance' or 'interior' seed.
  seed_h_per_radius: float = 0.0  # Or, if larger, this fraction of the median nucleus radius.
  smooth: float = 1.0  # Gaussian sigma applied to the distance map before finding seeds.
  min_size: int = 15  # Instances with fewer pixels are removed.
  min_confidence: float = 0.0  # Instances with a lower mean p(foreground) are removed.
  fill_holes: bool = True  # Fill holes of the foreground mask first.
  # 'boundary', 'interior' seeds: threshold of p(nucleus) for the markers; None = threshold.
  marker_threshold: float | None = None
  seed_threshold: float = 0.7  # 'product' seeds: threshold of p(foreground) * (1 - p(boundary)).
  min_seed_size: int = 5  # 'product' seeds: smaller seeds (pixels) are dropped.
  # Changes of the fields above for images with a bright background (stained tissue and
  # brightfield, `splits.bright_background`): see `for_background`.
  bright: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'Instance method {self.method!r} must be one of {METHODS}.')
    if self.seeds not in SEEDS:
      raise ValueError(f'Watershed seeds {self.seeds!r} must be one of {SEEDS}.')
    if not 0 <= self.min_confidence <= 1:
      raise ValueError(f'min_confidence={self.min_confidence} must be a probability, 0 to 1.')
    fields = {f.name for f in dataclasses.fields(self)} - {'bright'}
    if set(self.bright) - fields:
      raise ValueError(f'bright={self.bright} may only change the fields {sorted(fields)}.')
    self.for_background(bright=True)  # Checks the values of the bright-background options.

  def for_background(self, bright: bool) -> 'InstanceOptions':
    """The options for one image: with the `bright` changes if its background is bright."""
    if not self.bright:
      return self
    return dataclasses.replace(self, **(self.bright if bright else {}), bright={})


def default_options(scheme: LabelScheme, **changes: Any) -> InstanceOptions:
  """The options for a model of `scheme` (its `instance_defaults`), with `changes`.

  A change of None, or seeds='auto', keeps the default: it is an unset flag of the commands
  (`inference_flags`, `sweep_instances`), which thus all mean the same by it.
  """
  changes = {k: v for k, v in changes.items() if v is not None and (k, v) != ('seeds', 'auto')}
  defaults = scheme.instance_defaults
  # A change is meant for every image: it replaces the bright-background default of its field.
  bright = {k: v for k, v in defaults.get('bright', {}).items() if k not in changes}
  return InstanceOptions(**{**defaults, 'bright': bright, **changes})


def _relabel(labels: np.ndarray, foreground: np.ndarray, options: InstanceOptions) -> np.ndarray:
  """Drops instances smaller than min_size or less confident than min_confidence and renumbers
  the rest 1..N (int32)."""
  counts = np.bincount(labels.ravel())
  keep = counts >= options.min_size
  if options.min_confidence > 0:
    sums = np.bincount(labels.ravel(), weights=foreground.ravel(), minlength=len(counts))
    keep &= sums >= options.min_confidence * counts
  keep[0] = False
  new_ids = np.zeros(len(counts), np.int32)
  new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
  return new_ids[labels]


def to_instances(
    foreground: np.ndarray,
    boundary: np.ndarray | None = None,
    options: InstanceOptions = InstanceOptions(),
) -> np.ndarray:
  """Instance label map int32 [H, W] from probabilities.

  Args:
    foreground: [H, W] probability that a pixel belongs to a nucleus (boundary included).
    boundary: [H, W] probability of the boundary class; required by 'boundary' seeds.
    options: See `InstanceOptions`; those of this image (`for_background`).
  """
  if options.bright:
    raise ValueError('Instance options with bright-background changes: pass those of the image, '
                     'options.for_background(splits.bright_background(image)).')
  mask = foreground > options.threshold
  if options.fill_holes:
    mask = ndimage.binary_fill_holes(mask)
  if options.method == 'components' or not mask.any():
    labels, _ = ndimage.label(mask)
    return _relabel(labels, foreground, options)

  if options.seeds in ('boundary', 'interior'):
    if boundary is None:
      raise ValueError(f"'{options.seeds}' seeds need a model with a boundary class "
                       '(num_classes=3).')
    marker_threshold = (options.threshold if options.marker_threshold is None
                        else options.marker_threshold)
    interior = mask & ((foreground - boundary) > marker_threshold)  # p(nucleus) = p(fg) - p(bd).
  if options.seeds == 'boundary':
    markers, _ = ndimage.label(interior)
    surface = boundary
  elif options.seeds == 'product':
    core = foreground * (1 - boundary) if boundary is not None else foreground
    seeds = morphology.remove_small_objects((core > options.seed_threshold) & mask,
                                            max_size=options.min_seed_size - 1)
    markers, _ = ndimage.label(seeds)
    surface = -foreground
  else:  # 'distance' seeds of the foreground, or of the interior.
    seeded = interior if options.seeds == 'interior' else mask
    distance = ndimage.distance_transform_edt(seeded)
    if options.smooth > 0:
      distance = ndimage.gaussian_filter(distance, options.smooth)
    markers, _ = ndimage.label(morphology.h_maxima(distance, options.seed_h) & seeded)
    surface = -distance
    if options.seed_h_per_radius > 0:  # Second pass, scaled to this image's nuclei.
      first = segmentation.watershed(surface, markers, mask=mask)
      seed_h = options.seed_h_per_radius * contract.median_diameter(first, options.min_size) / 2
      if seed_h > options.seed_h:
        markers, _ = ndimage.label(morphology.h_maxima(distance, seed_h) & seeded)
  labels = segmentation.watershed(surface, markers, mask=mask)

  unreached, _ = ndimage.label(mask & (labels == 0))
  labels = np.where(unreached > 0, unreached + labels.max(), labels)
  return _relabel(labels, foreground, options)

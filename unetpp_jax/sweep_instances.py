r"""Chooses the instance post-processing on the validation split: predicts once, scores a grid.

  python -m unetpp_jax.sweep_instances --workdir=workdirs/dsb_cpu \
      --data=../shared/data/dsb2018/stage1_train.zip [--noflips] [--strategy=auto|pad|tile]

Runs the network once over the run's validation split (the ids training held out; never a test
set), keeps the final prediction's probabilities, then prints as JSON its official score with the
default `InstanceOptions` and with one option at a time changed to each value of `GRID` (a full
grid costs too many watersheds on a CPU), plus the other watershed seeds (3-class models) and plain
connected components, overall and per kind of image. A change applies to every image, as an
evaluate flag does; the scores of the bright-background kinds (tissue, brightfield) choose
`InstanceOptions.bright`, those of fluorescence the rest. Per-head scores come from
`python -m unetpp_jax.evaluate`. The chosen values become the defaults in
`LabelScheme.instance_defaults` (docs/results.md quotes the sweep; docs/evaluation.md describes
the options).
"""

import collections
import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import time
import warnings
from typing import Any

from unetpp_jax import cli

cli.quiet_native_logs()  # Before jax is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from unetpp_jax import atomic, losses
from unetpp_jax.data import splits
from unetpp_jax.evaluation import evaluate, instances, predict
from unetpp_jax.label_scheme import LabelScheme
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
_INFERENCE = predict.InferenceOptions()  # Its defaults, as evaluate's.
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.DEFINE_string('data', None, 'Kaggle-layout folder or zip holding the validation images.')
flags.DEFINE_bool('flips', _INFERENCE.flips, 'Flip test-time augmentation.')
flags.DEFINE_bool('transpose', _INFERENCE.transpose, 'Also the transposed image (with flips: '
                  '8-way dihedral).')
flags.DEFINE_enum('strategy', _INFERENCE.strategy, predict.STRATEGIES, 'Native-size inference.')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
flags.DEFINE_bool('average', True, 'Predict with the moving average of the weights where the '
                  'checkpoint holds one; --noaverage: the trained weights.')
flags.DEFINE_enum('seeds', 'auto', ('auto',) + instances.SEEDS, 'Base watershed seeds; auto = '
                  "instances.default_options of the model's label scheme (as evaluate).")
flags.DEFINE_float('threshold', None, 'Base foreground threshold; default: '
                   "instances.default_options of the model's label scheme (as evaluate).")
flags.DEFINE_integer('processes', 2, 'Scoring processes.')
flags.DEFINE_integer('limit', 0, 'Only the first N validation images (a quick check); 0 = all.')
flags.DEFINE_string('cache', None, 'Optional .npz of the predictions: read if it exists (and was '
                    'made with the same step, flips, strategy and images), else written; a second '
                    'sweep of the same model then skips the network.')
flags.mark_flags_as_required(['workdir', 'data'])

GRID = {
    'threshold': (0.5, 0.6, 0.7, 0.8),
    'seed_h': (0.5, 1.0, 1.5, 2.0),
    'smooth': (1.0, 2.0),
    'seed_h_per_radius': (0.0, 0.1, 0.2),
    'marker_threshold': (0.3, 0.5, 0.7),
    'min_size': (5, 15, 30),
    'min_confidence': (0.0, 0.7, 0.8, 0.85),
    'fill_holes': (True, False),
}
# The seeds that read each seed-specific option; the sweep skips the others' options.
_DISTANCE = ('distance', 'interior')
_SEEDS_OF = {'marker_threshold': ('boundary', 'interior'), 'seed_h': _DISTANCE,
             'seed_h_per_radius': _DISTANCE, 'smooth': _DISTANCE}
# 'product' seeds (the winners' decoding): seed and extent thresholds together.
PRODUCT_GRID = [{'seeds': 'product', 'seed_threshold': seed, 'threshold': extent}
                for seed in (0.5, 0.7, 0.8) for extent in (0.3, 0.4, 0.5)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.time()
  config = evaluate.load_config(FLAGS.workdir, evaluate.config_defaults())
  ids = evaluate.select_ids(FLAGS.data, evaluate.workdir_split_ids(FLAGS.workdir, config,
                                                                   'validation'), None, None)
  ids = ids[:FLAGS.limit] if FLAGS.limit else ids
  variables, step = evaluate.load_variables(FLAGS.workdir, config, FLAGS.step, FLAGS.average)
  weights = predict.weights_name(FLAGS.workdir, step, FLAGS.average)
  predictor = predict.Predictor(config, variables, predict.InferenceOptions(
      strategy=FLAGS.strategy, flips=FLAGS.flips, transpose=FLAGS.transpose), final_only=True)
  scheme = predictor.scheme
  key = {'workdir': os.path.abspath(FLAGS.workdir), 'step': step, 'weights': weights,
         'flips': FLAGS.flips, 'transpose': FLAGS.transpose, 'strategy': predictor.strategy,
         'ids': list(ids)}
  global _STORED
  _STORED = _read_cache(FLAGS.cache, key) if FLAGS.cache else None
  if _STORED is None:
    _STORED = [  # (true label, final probabilities [H, W, c] as float16, kind of image)
        (example['label'].astype(np.int32), probs[-1].astype(np.float16),
         splits.image_kind(example['image'], example['label']))
        for example, probs in predictor.predict(
            evaluate._examples(FLAGS.data, ids, None, None))]  # pylint: disable=protected-access
    if FLAGS.cache:
      _write_cache(FLAGS.cache, key, _STORED)
  predict_seconds = time.time() - start

  base = {'seeds': FLAGS.seeds, 'threshold': FLAGS.threshold}
  default = instances.default_options(scheme, **base)
  changes = variants(scheme, default)
  # As a flag of evaluate would: a change applies to every image, bright background or not.
  options = [instances.default_options(scheme, **{**base, **v}) for v in changes]
  # Fork: the workers share the stored probabilities; one variant per task. They run numpy and
  # scipy only, never JAX, so Python's warning that a forked JAX process may deadlock is moot.
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', r'os\.fork\(\) was called', RuntimeWarning)
    with multiprocessing.get_context('fork').Pool(FLAGS.processes) as pool:
      scores = pool.map(functools.partial(_score, scheme), options)
  print(json.dumps({
      'checkpoint_step': step, 'weights': weights, 'num_images': len(_STORED),
      'strategy': predictor.strategy,
      'flips': FLAGS.flips, 'transpose': FLAGS.transpose, 'prediction': predictor.names[-1],
      'predict_seconds': round(predict_seconds), 'default': str(default),
      'mean_probabilities': _mean_probabilities(scheme) if scheme.has_boundary else None,
      'variants': sorted(({'change': v or 'default', **r} for v, r in zip(changes, scores)),
                         key=lambda r: -r['score']),
      'seconds': round(time.time() - start)}, indent=1, default=str))


def variants(scheme: LabelScheme, default: instances.InstanceOptions) -> list[dict[str, Any]]:
  """The changes of `default` the sweep scores: none, each `GRID` value of an option that the
  seeds of some image read (fluorescence or bright background), the other watershed seeds
  (3-class models), the product seeds' grid and connected components."""
  seeds = default.seeds
  used = {seeds, default.for_background(bright=True).seeds}
  changes = [{}]
  for field, values in GRID.items():
    if not used & set(_SEEDS_OF.get(field, used)):
      continue  # An option of the other seeds.
    changes += [{field: v} for v in values
                if v != getattr(default, field) or field in default.bright]
  if scheme.has_boundary:  # The other seeds on the same probabilities.
    changes += [{'seeds': s} for s in ('distance', 'boundary', 'interior')
                if s != seeds or 'seeds' in default.bright]
  changes += [v for v in PRODUCT_GRID if scheme.has_boundary or seeds != 'product']
  return changes + [{'method': 'components'}]


_STORED = []


def _mean_probabilities(scheme: LabelScheme) -> dict[str, dict[str, float]]:
  """Mean predicted p(foreground) and p(boundary) over the pixels of each kind of the true
  target of a `scheme` with a boundary class: background, interior, the 1-pixel rims, and the
  contact band beyond the rims (the scheme's, at least 2 pixels wide). Says which part of the
  target the model has learned."""
  rims = dataclasses.replace(scheme, contact_width=0)
  wide = dataclasses.replace(scheme, contact_width=max(scheme.contact_width, 2))
  sums = {k: np.zeros(3) for k in ('background', 'interior', 'rim', 'contact band')}
  for label, probs, _ in _STORED:
    instance = jnp.asarray(label[None])
    rim = np.asarray(rims.target(instance))[0] == losses.BOUNDARY
    band = np.asarray(wide.contact_band(instance))[0] & ~rim
    foreground, boundary = scheme.split(probs.astype(np.float32))
    for kind, where in (('background', label == 0), ('interior', (label > 0) & ~rim & ~band),
                        ('rim', rim), ('contact band', band)):
      sums[kind] += (foreground[where].sum(), boundary[where].sum(), where.sum())
  return {kind: {'pixels': int(n), 'p_foreground': round(f / max(n, 1), 4),
                 'p_boundary': round(b / max(n, 1), 4)} for kind, (f, b, n) in sums.items()}


def _read_cache(path: str, key: dict) -> list | None:
  """The stored predictions of `path` if it was written for `key`, else None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if json.loads(str(f['key'])) != key:
      print(f'{path} holds other predictions (workdir, step, weights, flips, strategy or images '
            'differ): predicting again.', file=sys.stderr)
      return None
    return [(f[f'label{i}'], f[f'probs{i}'], str(f[f'kind{i}'])) for i in range(len(key['ids']))]


def _write_cache(path: str, key: dict, stored: list) -> None:
  arrays = {'key': np.asarray(json.dumps(key))}
  for i, (label, probs, kind) in enumerate(stored):
    arrays[f'label{i}'], arrays[f'probs{i}'], arrays[f'kind{i}'] = label, probs, np.str_(kind)

  def write(tmp):
    with open(tmp, 'wb') as f:  # A file object: np.savez would append '.npz' to a name.
      np.savez(f, **arrays)
  atomic.write_via(path, write)  # Never a half-written cache.


def _score(scheme: LabelScheme, options: instances.InstanceOptions) -> dict[str, float]:
  """The official score and more of `options` on the stored predictions of a model of `scheme`,
  overall and per kind."""
  acc = evaluate.Accumulator()
  by_kind = collections.defaultdict(list)
  for label, probs, kind in _STORED:
    foreground, boundary = scheme.split(probs.astype(np.float32))
    image_options = options.for_background(kind in splits.BRIGHT_KINDS)
    pred = instances.to_instances(foreground, boundary, image_options)
    _, _, result = acc.add(foreground > image_options.threshold, label > 0, pred, label)
    by_kind[kind].append(result.score)
  scores = {k: round(v, 4) for k, v in acc.summary().items()
            if k in ('score', 'ap50', 'touching_recall50', 'iou', 'iou_per_image')}
  return {**scores, 'per_kind': {k: round(float(np.mean(by_kind[k])), 4)
                                 for k in splits.KINDS if by_kind[k]}}


if __name__ == '__main__':
  cli.run(main)

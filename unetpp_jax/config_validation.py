"""Checks a config before anything is built or compiled, with messages that say what to change."""

from collections.abc import Mapping
import copy
import json
import math
from typing import Any

import jax

from unetpp_jax import data, models
from unetpp_jax.data import contract, release, splits

# Valid values shown when a tuple flag cannot be parsed.
_TUPLE_EXAMPLES = {
    'model.filters': '(32,64,128,256,512)',
    'loss.deep_supervision_heads': '(1,2,3,4)',
    'loss.head_weights': '(1.0,1.0,1.0,1.0)',
}

# The lists belong to the modules that implement the choices; the train loop's own choices
# (failure policy, optimizer) are listed here.
_CHOICES = {
    'data.train_preprocess': contract.PREPROCESS_MODES,
    'data.on_bad_example': release.ON_BAD_EXAMPLE,
    'nonfinite_policy': ('halt', 'skip'),
    'model.name': models.MODEL_NAMES,
    'model.norm': models.NORMS,
    'model.upsample': models.UPSAMPLES,
    'model.dtype': models.DTYPES,
    'model.input_norm': models.INPUT_NORMS,
    'data.split': splits.SPLITS,
    'optimizer.name': ('adam', 'adamw', 'sgd'),
    'optimizer.schedule': ('constant', 'cosine'),
    'predict.mode': models.PREDICTION_MODES,
}


# Fields a resumed run may change freely: run length, logging/eval/checkpoint cadence, where the
# data lives, evaluation batch, inference, the moving average of the weights (which training does
# not read) and failure handling. Every other field changes the model, the data or the
# optimisation. (With a cosine schedule, num_train_steps also reshapes the remaining learning-rate
# decay.)
RESUMABLE_CHANGES = (
    'num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'checkpoint_every_minutes', 'keep_checkpoints', 'eval_batch_size', 'nonfinite_policy',
    'data.tfds_data_dir',
    'data.manual_dir', 'data.on_bad_example', 'predict', 'optimizer.ema_decay',
)

# Fields added after runs were recorded, with the value that reproduces what those runs did (as
# JSON): a stored config without the field equals a config holding this value.
ADDED_FIELDS = {
    'data.scale_range': [1.0, 1.0],
    'data.split': 'tail',
    'data.invert_prob': 0.0,
    'data.grey_prob': 0.0,
    'data.channel_shuffle': False,
    'data.stain_jitter': 0.0,
    'data.recolour_prob': 0.0,
    'data.nucleus_diameter': 0.0,
    'data.touching_crop_prob': 0.0,
    'data.max_rotation': 0.0,
    'data.elastic': 0.0,
    **{f'data.repeats.{kind}': 1 for kind in splits.KINDS},
    'model.input_norm': 'standardize',
    'model.norm_groups': 8,
    'loss.contact_width': 0,
    'loss.class_weights': [],
    'loss.contact_weight': 1.0,
    'loss.lovasz_weight': 0.0,
    'optimizer.ema_decay': 0.0,
}


def upgrade(stored: Mapping[str, Any]) -> dict[str, Any]:
  """A stored config of an older run (see `workdir`) with every field of ADDED_FIELDS it lacks
  set to the value that reproduces what the run did."""
  upgraded = copy.deepcopy(dict(stored))
  for dotted, value in ADDED_FIELDS.items():
    *parents, name = dotted.split('.')
    node = upgraded
    for key in parents:
      node = node.setdefault(key, {})
    node.setdefault(name, value)
  return upgraded


def _get(config: Any, dotted: str) -> Any:
  """config's field `dotted`; in a config of an older run that lacks it, its ADDED_FIELDS value."""
  value = config
  try:
    for key in dotted.split('.'):
      value = value[key]
  except KeyError:
    if dotted not in ADDED_FIELDS:
      raise
    return ADDED_FIELDS[dotted]
  return value


def validate(config: Any) -> None:
  """Raises ValueError listing every problem found in `config`."""
  errors = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  unparsed = set()
  for field, value in _flatten(config.to_dict()).items():
    if isinstance(value, float):  # nan and inf would slip through range checks or break training.
      check(math.isfinite(value), f'config.{field}={value} must be finite.')
    text = _unparsed_tuple(value)
    if text is not None:
      unparsed.add(field)
      errors.append(f'config.{field}={text} cannot be parsed: write a tuple of numbers, e.g. '
                    f'--config.{field}="{_TUPLE_EXAMPLES.get(field, "(1,2)")}".')

  for field, choices in _CHOICES.items():
    value = _get(config, field)
    check(value in choices, f'config.{field}={value!r} must be one of {choices}.')

  # numpy's generators (data order, augmentation) take only non-negative seeds.
  check(isinstance(config.seed, int) and config.seed >= 0,
        f'config.seed={config.seed!r} must be an integer >= 0.')
  source_error = data.source_error(config.data.source)
  check(source_error is None, source_error)
  check(0 < config.data.val_fraction < 1, 'config.data.val_fraction must be in (0, 1).')
  check(config.data.jitter >= 0, 'config.data.jitter must be >= 0.')
  check(config.data.stain_jitter >= 0, 'config.data.stain_jitter must be >= 0.')
  for field in ('data.invert_prob', 'data.grey_prob', 'data.recolour_prob',
                'data.touching_crop_prob'):
    check(0 <= _get(config, field) <= 1, f'config.{field}={_get(config, field)} must be in [0, 1].')
  repeats = config.data.get('repeats', {})
  check(set(repeats) <= set(splits.KINDS) and all(isinstance(r, int) and r >= 1
                                                  for r in repeats.values()),
        f'config.data.repeats={dict(repeats)} must map kinds of image {splits.KINDS} to '
        'integers >= 1.')

  if unparsed & {'model.filters', 'loss.deep_supervision_heads', 'loss.head_weights'}:
    # The checks below depend on these; with a value that is not a tuple of numbers they would
    # only add knock-on errors about the heads and image size.
    raise ValueError(_message(errors))
  filters = tuple(config.model.filters)
  check(
      len(filters) >= 2 and all(isinstance(f, int) and f > 0 for f in filters),
      f'config.model.filters={filters} must list at least 2 positive channel counts.',
  )
  levels = max(len(filters) - 1, 1)
  size = config.data.image_size
  check(
      size > 0 and size % 2**levels == 0,
      f'config.data.image_size={size} must be a positive multiple of 2**L = {2**levels} '
      f'(L = {levels} levels for filters {filters}).',
  )
  check(
      config.model.num_classes in (1, 2, 3),
      f'config.model.num_classes={config.model.num_classes} must be 1 (sigmoid), 2 (softmax '
      'background/nucleus) or 3 (background/nucleus/boundary).',
  )
  check(0 <= config.model.dropout_rate < 1, 'config.model.dropout_rate must be in [0, 1).')
  norm_groups = _get(config, 'model.norm_groups')
  check(isinstance(norm_groups, int) and norm_groups >= 1,
        f'config.model.norm_groups={norm_groups} must be an integer >= 1.')

  heads = tuple(config.loss.deep_supervision_heads)
  check(
      len(heads) > 0 and len(set(heads)) == len(heads)
      and all(isinstance(h, int) and 1 <= h <= levels for h in heads),
      f'config.loss.deep_supervision_heads={heads} must be distinct heads in 1..{levels}.',
  )
  weights = tuple(config.loss.head_weights)
  check(
      not weights or (len(weights) == len(heads)
                      and all(isinstance(w, (int, float)) and w >= 0 for w in weights)),
      f'config.loss.head_weights={weights} must be empty or one non-negative weight per '
      f'supervised head {heads}.',
  )
  check(
      config.loss.bce_weight >= 0 and config.loss.dice_weight >= 0
      and config.loss.get('lovasz_weight', 0.0) >= 0,
      'config.loss.bce_weight, dice_weight and lovasz_weight must be >= 0.',
  )
  contact_width = config.loss.get('contact_width', 0)
  check(isinstance(contact_width, int) and contact_width >= 0,
        f'config.loss.contact_width={contact_width} must be an integer >= 0 (pixels).')
  class_weights = tuple(config.loss.get('class_weights', ()))
  check(
      not class_weights or (config.model.num_classes > 1
                            and len(class_weights) == config.model.num_classes
                            and all(isinstance(w, (int, float)) and w > 0 for w in class_weights)),
      f'config.loss.class_weights={class_weights} must be empty or one positive weight per class '
      f'of a softmax model (model.num_classes={config.model.num_classes}).',
  )
  contact_weight = config.loss.get('contact_weight', 1.0)
  check(isinstance(contact_weight, (int, float)) and contact_weight > 0,
        f'config.loss.contact_weight={contact_weight} must be a number > 0.')
  scale_range = tuple(config.data.get('scale_range', (1.0, 1.0)))
  check(
      len(scale_range) == 2 and all(isinstance(v, (int, float)) for v in scale_range)
      and 0 < scale_range[0] <= scale_range[1],
      f'config.data.scale_range={scale_range} must be (lo, hi) with 0 < lo <= hi.',
  )
  check(
      scale_range == (1.0, 1.0) or config.data.train_preprocess == 'crop',
      f'config.data.scale_range={scale_range} zooms native-resolution crops: it needs '
      "config.data.train_preprocess='crop' (or scale_range=(1, 1)).",
  )
  nucleus_diameter = _get(config, 'data.nucleus_diameter')
  check(
      isinstance(nucleus_diameter, (int, float)) and nucleus_diameter >= 0,
      f'config.data.nucleus_diameter={nucleus_diameter} must be a size in pixels (0 = off).',
  )
  check(
      not nucleus_diameter or config.data.train_preprocess == 'crop',
      f'config.data.nucleus_diameter={nucleus_diameter} zooms native-resolution crops: it needs '
      "config.data.train_preprocess='crop' (or nucleus_diameter=0).",
  )
  check(
      not _get(config, 'data.touching_crop_prob') or config.data.train_preprocess == 'crop',
      f'config.data.touching_crop_prob={_get(config, "data.touching_crop_prob")} places '
      "native-resolution crops: it needs config.data.train_preprocess='crop' (or 0).",
  )
  max_rotation = _get(config, 'data.max_rotation')
  check(0 <= max_rotation <= 180,
        f'config.data.max_rotation={max_rotation} must be an angle in [0, 180] degrees.')
  check(
      not max_rotation or config.data.train_preprocess == 'crop',
      f'config.data.max_rotation={max_rotation} rotates native-resolution crops: it needs '
      "config.data.train_preprocess='crop' (or 0).",
  )
  elastic = _get(config, 'data.elastic')
  check(elastic >= 0, f'config.data.elastic={elastic} must be a length in pixels (0 = off).')
  check(
      not elastic or config.data.train_preprocess == 'crop',
      f'config.data.elastic={elastic} deforms native-resolution crops: it needs '
      "config.data.train_preprocess='crop' (or 0).",
  )
  check(
      1 <= config.predict.head <= levels,
      f'config.predict.head={config.predict.head} must be in 1..{levels}.',
  )
  if config.model.name in ('unet', 'wide_unet'):  # One decoder path: only head L exists.
    check(
        heads == (levels,) and config.predict.head == levels,
        f'config.model.name={config.model.name!r} has only head {levels}: set '
        f'--config.loss.deep_supervision_heads="({levels},)" and --config.predict.head={levels}.',
    )

  opt = config.optimizer
  check(opt.learning_rate > 0, f'config.optimizer.learning_rate={opt.learning_rate} must be > 0.')
  check(opt.warmup_steps >= 0, 'config.optimizer.warmup_steps must be >= 0.')
  check(opt.weight_decay >= 0, 'config.optimizer.weight_decay must be >= 0.')
  check(not (opt.weight_decay and opt.name == 'adam'),
        f"config.optimizer.weight_decay={opt.weight_decay} does nothing with optimizer.name='adam':"
        " use 'adamw' (decoupled weight decay) or weight_decay=0.")
  check(opt.grad_clip_norm >= 0, 'config.optimizer.grad_clip_norm must be >= 0 (0 = off).')
  check(0 <= opt.ema_decay < 1,
        f'config.optimizer.ema_decay={opt.ema_decay} must be in [0, 1) (0 = off).')

  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    check(
        value > 0 and value % devices == 0,
        f'config.{field}={value} must be a positive multiple of the device count ({devices}).',
    )
  check(config.num_train_steps > 0, 'config.num_train_steps must be > 0.')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    check(config[field] > 0, f'config.{field} must be > 0.')
  check(config.get('checkpoint_every_minutes', 0) >= 0,
        'config.checkpoint_every_minutes must be >= 0 (0 = checkpoints by step count only).')

  if errors:
    raise ValueError(_message(errors))


def _message(errors: list[str]) -> str:
  if len(errors) == 1:
    return f'Invalid config: {errors[0]}'
  return 'Invalid config:\n  ' + '\n  '.join(errors)


def _unparsed_tuple(value: Any) -> str | None:
  """The flag text if `value` is what the flag parser made of a tuple it could not parse.

  ml_collections parses `--config.model.filters=(4,x)` as the 1-tuple ('(4,x)',): a literal that
  Python cannot evaluate is kept as a string.
  """
  if isinstance(value, (tuple, list)) and any(isinstance(v, str) for v in value):
    return ','.join(str(v) for v in value)
  return None


_ABSENT = object()


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_changes(stored: Mapping[str, Any], config: Any) -> list[str]:
  """'field: old -> new' for each field outside RESUMABLE_CHANGES that differs.

  Args:
    stored: a config as a workdir stores it (fields added since are taken as `upgrade` fills them).
    config: the new config (a ConfigDict).
  """
  old = _flatten(upgrade(stored))
  new = _flatten(json.loads(config.to_json_best_effort()))  # Compared as JSON, like `stored`.
  changes = []
  for key in sorted(old.keys() | new.keys()):
    if any(key == f or key.startswith(f + '.') for f in RESUMABLE_CHANGES):
      continue
    before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if before != after:
      show = lambda v: '(absent)' if v is _ABSENT else repr(v)
      changes.append(f'{key}: {show(before)} -> {show(after)}')
  return changes

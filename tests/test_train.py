"""Train loop: exact resume, multi-device equivalence, validation, any numpy iterator as input."""

import dataclasses
import functools
import json

import flax
import jax
import numpy as np
import pytest

from configs import synthetic
from unetpp_jax import config_validation, models, steps, train, writers
from unetpp_jax.data.background import BackgroundInput
from unetpp_jax.evaluation import evaluate, predict
from unetpp_jax.heads import Heads


def tiny_config():
  config = synthetic.get_config()
  config.data.image_size = 32
  config.model.filters = (4, 8, 16, 32)
  config.model.dropout_rate = 0.1  # exercises the per-step dropout RNG in the resume test
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  return config


@dataclasses.dataclass
class ArrayInput:
  train_iter: object
  eval_batches: list


def _batch(seed, config, devices):
  """Squares on noise: a learnable task whose batch k depends only on k."""
  rng = np.random.default_rng(seed)
  size, per_device = config.data.image_size, config.batch_size // devices
  label = np.zeros((devices, per_device, size, size), np.int32)
  image = rng.random((devices, per_device, size, size, 3), np.float32) * 0.3
  for d in range(devices):
    for b in range(per_device):
      y, x = rng.integers(0, size - 12, 2)
      label[d, b, y:y + 12, x:x + 12] = 1
      image[d, b, y:y + 12, x:x + 12] += 0.6
  return {'image': image, 'label': label}


def array_input_fn(config, start_step):
  devices = jax.local_device_count()

  def train_iter():
    step = start_step
    while True:
      yield _batch(step, config, devices)
      step += 1

  eval_batches = [
      dict(_batch(10_000 + i, config, devices),
           weight=np.ones((devices, config.batch_size // devices), np.float32))
      for i in range(2)
  ]
  return ArrayInput(train_iter(), eval_batches)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restart_resumes_exactly(tmp_path):
  config = tiny_config()
  straight = train.train_and_evaluate(config, tmp_path / 'straight', array_input_fn)

  first = config.copy_and_resolve_references()
  first.num_train_steps = 3
  train.train_and_evaluate(first, tmp_path / 'resumed', array_input_fn)
  resumed = train.train_and_evaluate(config, tmp_path / 'resumed', array_input_fn)

  assert int(straight.step) == int(resumed.step) == 6
  _assert_trees_equal(straight.params, resumed.params)
  _assert_trees_equal(straight.batch_stats, resumed.batch_stats)
  _assert_trees_equal(straight.opt_state, resumed.opt_state)
  workdir = tmp_path / 'resumed'
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['3', '6']
  assert json.loads((workdir / 'config.json').read_text())['model']['filters'] == [4, 8, 16, 32]
  eval_metrics = json.loads((workdir / 'eval_metrics.json').read_text())
  assert eval_metrics['step'] == 6 and 0.0 <= eval_metrics['eval/iou/head3'] <= 1.0


def test_moving_average_follows_the_weights_resumes_and_is_what_inference_uses(tmp_path):
  config = tiny_config()
  config.optimizer.ema_decay = 0.9
  model = models.create_model(config.model, bn_axis_name=steps.AXIS)
  state = steps.create_train_state(config, jax.random.key(0), model)
  heads = Heads.from_config(config)
  p_step = jax.pmap(functools.partial(steps.train_step, dropout_rng=jax.random.key(1),
                                      heads=heads), axis_name=steps.AXIS)
  devices = jax.local_device_count()
  first = p_step(flax.jax_utils.replicate(state), _batch(0, config, devices))[0]
  second = flax.jax_utils.unreplicate(p_step(first, _batch(1, config, devices))[0])
  first = flax.jax_utils.unreplicate(first)
  # Bias-corrected: the first update's weights, then (0.9 w1 + w2) / 1.9; never the initial ones.
  for average, weight in zip(jax.tree.leaves(first.ema), jax.tree.leaves(
      {'params': first.params, 'batch_stats': first.batch_stats}), strict=True):
    np.testing.assert_allclose(average, weight, rtol=1e-5, atol=1e-7)
  for name in ('params', 'batch_stats'):
    for w1, w2, average in zip(jax.tree.leaves(getattr(first, name)),
                               jax.tree.leaves(getattr(second, name)),
                               jax.tree.leaves(second.ema[name]), strict=True):
      np.testing.assert_allclose(average, (0.9 * w1 + w2) / 1.9, rtol=1e-5, atol=1e-7)

  straight = train.train_and_evaluate(config, tmp_path / 'straight', array_input_fn)
  shorter = config.copy_and_resolve_references()
  shorter.num_train_steps = 3
  train.train_and_evaluate(shorter, tmp_path / 'resumed', array_input_fn)
  resumed = train.train_and_evaluate(config, tmp_path / 'resumed', array_input_fn)
  _assert_trees_equal(straight.ema, resumed.ema)
  assert not np.allclose(jax.tree.leaves(straight.ema['params'])[0],
                         jax.tree.leaves(straight.params)[0])
  # Validation during training and every inference path use the average, not the weights.
  variables, step = evaluate.load_variables(tmp_path / 'straight', config)
  assert step == 6
  _assert_trees_equal(variables, straight.ema)
  p_eval = jax.pmap(functools.partial(steps.eval_step, heads=heads), axis_name=steps.AXIS)
  batches = array_input_fn(config, 0).eval_batches
  recorded = json.loads((tmp_path / 'straight' / 'eval_metrics.json').read_text())['eval/loss']
  on_average = steps.evaluate_batches(p_eval, flax.jax_utils.replicate(straight), batches)
  on_weights = steps.evaluate_batches(
      p_eval, flax.jax_utils.replicate(straight.replace(ema={})), batches)
  assert recorded == pytest.approx(on_average['eval/loss'], rel=1e-5)
  assert recorded != pytest.approx(on_weights['eval/loss'], rel=1e-3)


def test_the_moving_average_can_be_switched_on_and_off_when_a_run_resumes(tmp_path):
  config = tiny_config()
  config.num_train_steps = 3
  train.train_and_evaluate(config, tmp_path, array_input_fn)
  config.num_train_steps, config.optimizer.ema_decay = 6, 0.9
  on = train.train_and_evaluate(config, tmp_path, array_input_fn)
  assert not np.allclose(jax.tree.leaves(on.ema['params'])[0], jax.tree.leaves(on.params)[0])
  _assert_trees_equal(evaluate.load_variables(tmp_path, config)[0], on.ema)
  config.num_train_steps, config.optimizer.ema_decay = 9, 0.0
  off = train.train_and_evaluate(config, tmp_path, array_input_fn)
  assert off.ema == {}
  variables, step = evaluate.load_variables(tmp_path, config)
  assert step == 9
  _assert_trees_equal(variables, {'params': off.params, 'batch_stats': off.batch_stats})
  # What a checkpoint holds decides, not the config: step 6 still gives its average, or its
  # trained weights when asked (evaluate, segment and sweep_instances --noaverage).
  _assert_trees_equal(evaluate.load_variables(tmp_path, config, step=6)[0], on.ema)
  _assert_trees_equal(evaluate.load_variables(tmp_path, config, step=6, average=False)[0],
                      {'params': on.params, 'batch_stats': on.batch_stats})
  assert [predict.weights_name(tmp_path, step, average) for step, average in
          ((6, True), (6, False), (9, True))] == ['moving average', 'trained', 'trained']


def test_training_reduces_loss(tmp_path):
  config = tiny_config()
  config.model.dropout_rate = 0.0
  config.num_train_steps = 30
  config.eval_every_steps = 30
  config.optimizer.learning_rate = 1e-2
  model = models.create_model(config.model, bn_axis_name=steps.AXIS)
  state = steps.create_train_state(config, jax.random.key(0), model)
  data = array_input_fn(config, 0)
  p_eval = jax.pmap(functools.partial(steps.eval_step, heads=Heads.from_config(config)),
                    axis_name=steps.AXIS)
  before = steps.evaluate_batches(p_eval, flax.jax_utils.replicate(state), data.eval_batches)
  trained = train.train_and_evaluate(config, tmp_path, array_input_fn)
  after = steps.evaluate_batches(p_eval, flax.jax_utils.replicate(trained), data.eval_batches)
  assert after['eval/loss'] < 0.7 * before['eval/loss']
  assert after['eval/iou/head3'] > before['eval/iou/head3'] + 0.2


@pytest.mark.parametrize('norm', ['batch', 'group'])
def test_two_devices_match_one_device_with_the_same_global_batch(norm):
  """Gradient pmean (and synchronised BatchNorm): the device count does not change the update."""
  assert jax.local_device_count() == 2
  config = tiny_config()
  config.model.dropout_rate = 0.0
  config.model.norm = norm
  model = models.create_model(config.model, bn_axis_name=steps.AXIS)
  state = steps.create_train_state(config, jax.random.key(0), model)
  step = functools.partial(steps.train_step, dropout_rng=jax.random.key(1),
                           heads=Heads.from_config(config))
  batch = _batch(0, config, devices=2)
  as_one = jax.tree.map(lambda x: x.reshape(1, -1, *x.shape[2:]), batch)

  def run(devices, batch):
    p_step = jax.pmap(step, axis_name=steps.AXIS, devices=jax.devices()[:devices])
    new_state, m, _ = p_step(flax.jax_utils.replicate(state, jax.devices()[:devices]), batch)
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    return first(new_state), first(m)

  two, m2 = run(2, batch)
  one, m1 = run(1, as_one)
  for a, b in zip(jax.tree.leaves((two.params, two.batch_stats)),
                  jax.tree.leaves((one.params, one.batch_stats)), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(m2.compute()['loss'], m1.compute()['loss'], rtol=1e-5)
  if norm == 'group':  # Per image: nothing to synchronise or carry.
    assert not jax.tree.leaves(two.batch_stats)
    return
  # Without synchronised BatchNorm the two would differ; make sure the check has teeth.
  assert not np.allclose(two.batch_stats['X0_0']['BatchNorm_0']['mean'],
                         state.batch_stats['X0_0']['BatchNorm_0']['mean'])


@pytest.mark.parametrize('num_classes,supervised', [(1, (1, 2, 3)), (3, (3,))])
def test_zero_metrics_are_shaped_as_the_train_steps_metrics(num_classes, supervised):
  """The train loop starts its sums from `Heads.zero_metrics` (no trace of the network): they
  must have the tree, shapes and dtypes of what the pmapped step returns, or the step would
  fail or compile a second time for its own outputs."""
  config = tiny_config()
  config.model.num_classes = num_classes
  config.loss.deep_supervision_heads = supervised
  heads = Heads.from_config(config)
  state = steps.create_train_state(
      config, jax.random.key(0), models.create_model(config.model, bn_axis_name=steps.AXIS))
  step = functools.partial(steps.train_step, dropout_rng=jax.random.key(1), heads=heads)
  traced = jax.eval_shape(jax.pmap(step, axis_name=steps.AXIS), flax.jax_utils.replicate(state),
                          _batch(0, config, devices=2))[1]
  zeros = heads.zero_metrics()
  assert jax.tree.structure(zeros) == jax.tree.structure(traced)
  for zero, leaf in zip(jax.tree.leaves(zeros), jax.tree.leaves(traced), strict=True):
    assert (zero.shape, zero.dtype) == (leaf.shape[1:], leaf.dtype) and not zero.any()
  # One entry per prediction: every output head, then the ensemble.
  assert zeros.segmentation.intersection.shape == (len(heads.prediction_names),)


@pytest.mark.parametrize('minutes,checkpoints,evaluated', [
    (1e-9, [2, 4, 6], [2, 6]),  # Due at every log step: checkpoints there, a first evaluation.
    (0.0, [6], [6]),  # Off: the step interval (here beyond the run) and the last step only.
])
def test_time_based_checkpoints(minutes, checkpoints, evaluated, tmp_path):
  import summaries  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.update(checkpoint_every_minutes=minutes, checkpoint_every_steps=100,
                eval_every_steps=100, keep_checkpoints=10)
  train.train_and_evaluate(config, tmp_path, array_input_fn)
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == checkpoints
  assert sorted(summaries.scalars(tmp_path, 'eval/loss')) == evaluated


def test_progress_line_reads_seconds_per_step_images_per_sec_and_eta():
  progress = writers.ReportProgress(num_train_steps=20_000, batch_size=16, every_secs=30)
  assert not progress(12, t=100.0)  # The first call only starts the clock.
  assert progress(24, t=160.0)  # 12 steps in 60 s.
  assert progress.last_message == ('step 24/20000 (0.1%): 5 s/step, 3.2 images/s, ETA 1d03h')
  assert writers.format_duration(3725) == '1h02m' and writers.format_duration(42) == '42s'


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('data.image_size', 60, 'multiple of 2\\*\\*L = 8'),
        ('loss.deep_supervision_heads', (0, 3), 'distinct heads in 1..3'),
        ('loss.deep_supervision_heads', (4,), 'distinct heads in 1..3'),
        ('loss.head_weights', (1.0,), 'one non-negative weight per'),
        ('optimizer.learning_rate', -1e-3, 'learning_rate=-0.001 must be > 0'),
        ('batch_size', 3, 'multiple of the device count \\(2\\)'),
        ('model.norm', 'layer', "must be one of \\('batch', 'group', 'none'\\)"),
        ('model.norm_groups', 0, 'norm_groups=0 must be an integer >= 1'),
        ('data.source', 'csv:x', "'tfds' or 'npz:PATH'"),
        ('checkpoint_every_minutes', -1.0, 'checkpoint_every_minutes must be >= 0'),
        ('data.invert_prob', 1.5, 'invert_prob=1.5 must be in \\[0, 1\\]'),
        ('data.stain_jitter', -0.5, 'stain_jitter must be >= 0'),
        ('data.recolour_prob', -0.1, 'recolour_prob=-0.1 must be in \\[0, 1\\]'),
        ('optimizer.ema_decay', 1.0, 'ema_decay=1.0 must be in \\[0, 1\\)'),
        ('optimizer.weight_decay', 1e-4,
         "weight_decay=0.0001 does nothing with optimizer.name='adam'"),
    ],
)
def test_invalid_config_is_rejected_before_compiling(field, value, message):
  config = tiny_config()
  parent, key = (config, field) if '.' not in field else (config[field.split('.')[0]],
                                                           field.split('.')[1])
  with parent.ignore_type():
    parent[key] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)


def test_shipped_configs_are_valid():
  from configs import dsb, dsb_accelerator, dsb_cpu  # pylint: disable=g-import-not-at-top
  config_validation.validate(dsb.get_config())
  config_validation.validate(dsb_accelerator.get_config())
  config_validation.validate(dsb_cpu.get_config())
  config_validation.validate(synthetic.get_config())


def test_background_input_keeps_order_raises_source_errors_and_stops():
  def source():
    for i in range(5):
      yield {'x': np.full((jax.local_device_count(), 2), i, np.float32)}
    raise OSError('disk gone')

  batches = BackgroundInput(source(), size=2)
  got = [int(next(batches)['x'][0, 0]) for _ in range(5)]
  assert got == [0, 1, 2, 3, 4]
  with pytest.raises(OSError, match='disk gone'):
    next(batches)
  batches.close()

  endless = BackgroundInput(({'x': np.zeros((jax.local_device_count(), 1))}
                             for _ in iter(int, 1)), size=2)
  assert next(endless)['x'].sharding.device_set == set(jax.local_devices())
  endless.close()  # Its producer is blocked on the full queue: close must still end it.
  assert not endless._thread.is_alive()  # pylint: disable=protected-access

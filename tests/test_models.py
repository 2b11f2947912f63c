"""U-Net++ structure: shapes, parameter counts, pruning equivalence and cost, options."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unetpp_jax import models

PAPER_FILTERS = (32, 64, 128, 256, 512)
SMALL_FILTERS = (4, 8, 16, 32)


def expected_param_count(filters, in_channels=3, num_classes=1, norm='batch', upsample='transpose',
                         skips='nested'):
  """Counts U-Net++ (or plain U-Net) parameters from the definition, independently of the code."""
  levels = len(filters) - 1
  bias = norm == 'none'
  total = 0

  def conv_block(c_in, f):
    per_conv_extra = f if bias else 2 * f  # conv bias, or the norm's scale + offset
    return 9 * c_in * f + per_conv_extra + 9 * f * f + per_conv_extra

  for i in range(levels + 1):
    total += conv_block(in_channels if i == 0 else filters[i - 1], filters[i])  # X(i, 0)
  for j in range(1, levels + 1):
    for i in range(levels + 1 - j):
      if skips == 'plain' and i + j != levels:  # U-Net: the decoder nodes X(L - j, j) only
        continue
      up_channels = filters[i] if upsample == 'transpose' else filters[i + 1]
      if upsample == 'transpose':
        total += 4 * filters[i + 1] * filters[i] + filters[i]
      skip_channels = filters[i] if skips == 'plain' else j * filters[i]
      total += conv_block(skip_channels + up_channels, filters[i])  # X(i, j)
  heads = 1 if skips == 'plain' else levels
  total += heads * (filters[0] * num_classes + num_classes)  # 1x1 heads
  return total


def count(tree):
  return sum(np.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('height,width', [(96, 96), (256, 320)])
def test_paper_model_shapes_and_parameter_count(height, width):
  model = models.UNetPlusPlus(filters=PAPER_FILTERS)
  x = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert len(logits) == 4
  for head in logits:
    assert head.shape == (2, height, width, 1) and head.dtype == jnp.float32
  assert count(variables['params']) == expected_param_count(PAPER_FILTERS)
  # Parameter count does not depend on image size; about 9.0M for the paper's filters.
  assert 8.5e6 < count(variables['params']) < 9.5e6
  params = variables['params']
  assert params['X0_4']['Conv_0']['kernel'].shape == (3, 3, 4 * 32 + 32, 32)
  assert params['up1_3']['kernel'].shape == (2, 2, 64, 32)
  assert params['head4']['kernel'].shape == (1, 1, 32, 1)
  assert set(variables['batch_stats']) == {k for k in params if k.startswith('X')}


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(norm='none'),
        dict(norm='group'),
        dict(upsample='bilinear'),
        dict(num_classes=3),
        dict(in_channels=1),
        dict(in_channels=4, norm='none', upsample='bilinear', num_classes=2),
    ],
)
def test_options_parameter_count(kwargs):
  in_channels = kwargs.pop('in_channels', 3)
  model = models.UNetPlusPlus(filters=SMALL_FILTERS, **kwargs)
  x = jax.ShapeDtypeStruct((1, 32, 48, in_channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables['params']) == expected_param_count(SMALL_FILTERS, in_channels, **kwargs)
  logits = jax.eval_shape(model.apply, variables, x)
  assert [l.shape for l in logits] == [(1, 32, 48, kwargs.get('num_classes', 1))] * 3
  assert ('batch_stats' in variables) == (kwargs.get('norm', 'batch') == 'batch')


def _randomized_variables(model, x):
  """Initial variables with non-trivial BatchNorm statistics, so pruning could not match by luck."""
  variables = model.init(jax.random.key(0), x)
  leaves, treedef = jax.tree.flatten(variables['batch_stats'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  stats = [l + 0.5 * jax.random.uniform(k, l.shape) for l, k in zip(leaves, keys)]
  return {'params': variables['params'], 'batch_stats': jax.tree.unflatten(treedef, stats)}


@pytest.mark.parametrize('upsample', ['transpose', 'bilinear'])
def test_pruned_heads_equal_full_model_heads(upsample):
  model = models.UNetPlusPlus(filters=SMALL_FILTERS, upsample=upsample)
  x = jax.random.uniform(jax.random.key(2), (2, 32, 40, 3))
  variables = _randomized_variables(model, x)
  full = model.apply(variables, x)
  for k in range(1, 4):
    pruned = model.apply(variables, x, prune_level=k)
    assert len(pruned) == k
    for j in range(k):
      np.testing.assert_allclose(pruned[j], full[j], rtol=1e-5, atol=1e-5)
  # The heads really differ from each other, so the comparison above is not vacuous.
  assert not np.allclose(full[0], full[2], atol=1e-3)


@pytest.mark.parametrize('filters', [SMALL_FILTERS, (6, 12, 20)])  # 6 and 20: 2 and 4 groups
def test_group_norm_sees_each_image_alone_in_training_as_in_inference(filters):
  """GroupNorm: an image's logits depend neither on the rest of its batch nor on the mode."""
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  x = x.at[1].multiply(0.2)  # A dim image beside bright ones shifts batch statistics a lot.

  def logits(norm, images, train):
    model = models.UNetPlusPlus(filters=filters, norm=norm)
    variables = model.init(jax.random.key(1), x)
    out, _ = model.apply(variables, images, train=train, mutable=['batch_stats'])
    return np.asarray(out[-1])

  alone = logits('group', x[1:2], train=True)[0]
  np.testing.assert_allclose(logits('group', x, train=True)[1], alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits('group', x, train=False)[1], alone, rtol=1e-5, atol=1e-5)
  # BatchNorm normalises over the batch, so there the same comparison fails.
  assert not np.allclose(logits('batch', x, train=True)[1],
                         logits('batch', x[1:2], train=True)[0], atol=1e-3)


@pytest.mark.parametrize('norm_groups, channels_per_group', [(8, 2), (2, 8), (1, 16)])
def test_group_norm_normalises_each_group_of_channels(norm_groups, channels_per_group):
  """config.model.norm_groups: each group of a layer's channels has mean 0 and variance 1 per
  image, and no finer split of them does."""
  from configs import dsb_paper  # pylint: disable=g-import-not-at-top
  config = dsb_paper.get_config().model
  config.filters, config.norm, config.norm_groups = (16, 32), 'group', norm_groups
  model = models.create_model(config)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), x)
  # The first convolution's 16 channels scaled 1x..16x, so that no two channels look alike.
  conv = variables['params']['X0_0']['Conv_0']
  conv['kernel'] = conv['kernel'] * jnp.arange(1.0, 17.0)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  normed = np.asarray(state['intermediates']['X0_0']['GroupNorm_0']['__call__'][0])

  def group_stats(size):
    groups = normed.reshape(2, 16 * 16, 16 // size, size)
    return groups.mean(axis=(1, 3)), groups.var(axis=(1, 3))

  mean, var = group_stats(channels_per_group)
  np.testing.assert_allclose(mean, 0, atol=1e-4)
  np.testing.assert_allclose(var, 1, atol=1e-2)
  assert not np.allclose(group_stats(channels_per_group // 2)[1], 1, atol=0.05)


def test_pruned_parameters_are_a_subset_of_full():
  model = models.UNetPlusPlus(filters=SMALL_FILTERS)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  full = flax.traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x))
  for k in (1, 2):
    init = lambda rng, x: model.init(rng, x, prune_level=k)  # pylint: disable=cell-var-from-loop
    pruned = flax.traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0), x))
    assert set(pruned) < set(full)
    assert all(pruned[p].shape == full[p].shape for p in pruned)
  assert 'X3_0' not in {p[1] for p in pruned}  # level 2 never reaches the deepest encoder node


def test_pruned_inference_runs_fewer_flops():
  model = models.UNetPlusPlus(filters=PAPER_FILTERS)
  x = jnp.zeros((1, 96, 96, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))

  def flops(k):
    fn = jax.jit(lambda v, x: model.apply(v, x, prune_level=k)[-1])
    cost = fn.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops']

  costs = [flops(k) for k in (1, 2, 3, 4)]
  assert all(a < b for a, b in zip(costs, costs[1:])), costs
  assert costs[0] < 0.2 * costs[3]


def test_image_size_must_be_multiple_of_2_pow_levels():
  model = models.UNetPlusPlus(filters=SMALL_FILTERS)
  with pytest.raises(ValueError, match='multiple of 8'):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 36, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match='prune_level must be in 1..3'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), prune_level=4)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
  f32 = models.UNetPlusPlus(filters=SMALL_FILTERS)
  bf16 = models.UNetPlusPlus(filters=SMALL_FILTERS, dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  out32 = models.foreground_probability(f32.apply(variables, x)[-1])
  out16 = models.foreground_probability(bf16.apply(variables, x)[-1])
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05)


def test_train_mode_uses_dropout_and_updates_batch_stats():
  model = models.UNetPlusPlus(filters=SMALL_FILTERS, dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  run = lambda seed: model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(seed)}
  )
  (a, stats), (b, _) = run(0), run(1)
  assert not np.allclose(a[-1], b[-1])
  assert not np.allclose(
      stats['batch_stats']['X0_0']['BatchNorm_0']['mean'],
      variables['batch_stats']['X0_0']['BatchNorm_0']['mean'],
  )
  np.testing.assert_array_equal(model.apply(variables, x)[-1], model.apply(variables, x)[-1])


def test_predict_modes():
  """The final prediction of every inference path (evaluation's `Predictor`): 'fast' is the
  network pruned to one head, that head alone; 'accurate' the mean of the supervised heads."""
  from configs import dsb_paper  # pylint: disable=g-import-not-at-top
  from unetpp_jax.evaluation import predict  # pylint: disable=g-import-not-at-top
  config = dsb_paper.get_config()
  config.model.filters = SMALL_FILTERS
  config.loss.deep_supervision_heads = (2, 3)
  model = models.create_model(config.model)
  x = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
  variables = _randomized_variables(model, x)
  logits = model.apply(variables, x)
  probs = [jax.nn.sigmoid(l[..., 0]) for l in logits]

  def final(mode, head):
    options = predict.InferenceOptions(mode=mode, prune_level=head, batch_size=2, flips=False)
    return predict.Predictor(config, variables, options).run(list(np.asarray(x)))[-1, ..., 0]
  np.testing.assert_allclose(final('fast', 2), probs[1], atol=1e-5)
  np.testing.assert_allclose(final('accurate', 3), (probs[1] + probs[2]) / 2, atol=1e-5)
  with pytest.raises(ValueError, match='accurate'):
    final('best', 3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_conv_transpose_2x2_equals_flax_conv_transpose(dtype):
  """The matmul upsampler is nn.ConvTranspose((2, 2), strides=2): same init, outputs, gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  ours = models.ConvTranspose2x2(4, dtype=dtype)
  ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2), dtype=dtype)
  params = ours.init(jax.random.key(1), x)
  ref_params = ref.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)  # checkpoints stay compatible
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  out, ref_out = ours.apply(params, x), ref.apply(params, x)
  assert out.shape == ref_out.shape == (2, 10, 14, 4) and out.dtype == ref_out.dtype == dtype
  np.testing.assert_allclose(out.astype(np.float32), ref_out.astype(np.float32), rtol=tol, atol=tol)
  if dtype == jnp.float32:
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 grads, ref_grads)


def test_max_pool_2x2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  # Without ties, the gradients agree too (both route each window's gradient to its maximum).
  loss = lambda pool: lambda x: jnp.sum(jnp.cos(pool(x)))
  np.testing.assert_allclose(
      jax.grad(loss(models.max_pool_2x2))(x),
      jax.grad(loss(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))))(x), rtol=1e-6)


@pytest.mark.parametrize('upsample', ['transpose', 'bilinear'])
def test_plain_unet_has_one_decoder_path_and_head(upsample):
  model = models.UNetPlusPlus(filters=PAPER_FILTERS, skips='plain', upsample=upsample)
  x = jax.ShapeDtypeStruct((2, 96, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables['params']) == expected_param_count(PAPER_FILTERS, upsample=upsample,
                                                            skips='plain')
  assert model.output_heads() == (4,)
  logits = jax.eval_shape(model.apply, variables, x)
  assert [l.shape for l in logits] == [(2, 96, 64, 1)]
  nodes = {k for k in variables['params'] if k.startswith('X')}
  assert nodes == {f'X{i}_0' for i in range(5)} | {'X3_1', 'X2_2', 'X1_3', 'X0_4'}
  assert variables['params']['X0_4']['Conv_0']['kernel'].shape[2] == 32 + (
      32 if upsample == 'transpose' else 64)
  with pytest.raises(ValueError, match='cannot be pruned'):
    model.apply(variables, jnp.zeros((1, 96, 64, 3)), prune_level=2)


def test_model_names_and_wide_unet_matches_unetpp_parameters():
  config = ml_collections.ConfigDict(dict(
      name='unetpp', filters=PAPER_FILTERS, num_classes=1, norm='batch', dropout_rate=0.0,
      upsample='transpose', dtype='float32'))
  unetpp = models.create_model(config)
  config.name = 'unet'
  unet = models.create_model(config)
  config.name = 'wide_unet'
  wide = models.create_model(config)
  assert (unetpp.skips, unet.skips, wide.skips) == ('nested', 'plain', 'plain')
  assert unet.filters == PAPER_FILTERS
  target = models.count_parameters(unetpp)
  assert target == expected_param_count(PAPER_FILTERS)
  assert models.count_parameters(unet) < 0.9 * target
  # Widened by one factor (as the paper's 35..560), to within 0.5% of U-Net++'s parameters.
  ratios = [w / f for w, f in zip(wide.filters, PAPER_FILTERS)]
  assert 1.05 < min(ratios) and max(ratios) - min(ratios) < 0.03
  assert abs(models.count_parameters(wide) - target) < 0.005 * target
  config.name = 'resnet'
  with pytest.raises(ValueError, match='model.name'):
    models.create_model(config)

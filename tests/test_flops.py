"""FLOPs counted on the traced program, against XLA:CPU's count of the compiled one; peak table."""

import functools

import flax
import jax
import numpy as np
import pytest

from unetpp_jax import models, steps
from unetpp_jax.heads import Heads
from unetpp_jax.study import flops
import test_train


def test_train_step_flops_match_xla_cpu_cost_analysis():
  config = test_train.tiny_config()
  # Channel counts large enough that convolutions dominate, as in any real configuration.
  config.model.filters = (16, 32, 64, 128)
  model = models.create_model(config.model, bn_axis_name=steps.AXIS)
  state = flax.jax_utils.replicate(steps.create_train_state(config, jax.random.key(0), model))
  step = jax.pmap(functools.partial(steps.train_step, dropout_rng=jax.random.key(1),
                                    heads=Heads.from_config(config)),
                  axis_name=steps.AXIS)
  batch = test_train._batch(0, config, jax.local_device_count())  # pylint: disable=protected-access
  counted = flops.count_flops(step, state, batch)
  cost = step.lower(state, batch).compile().cost_analysis()
  compiled = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  # XLA also counts elementwise work; the jaxpr count has only convolutions and matmuls (counting
  # padded positions of gradient convolutions): within a few percent of each other.
  assert counted == pytest.approx(compiled, rel=0.1)
  # The forward pass alone is about a third of a train step (backward: two convs per conv).
  forward = flops.count_flops(
      jax.pmap(lambda s, x: s.apply_fn({'params': s.params, 'batch_stats': s.batch_stats}, x),
               axis_name=steps.AXIS), state, batch['image'])
  assert 0.25 < forward / counted < 0.4


def test_conv_and_matmul_flops_are_exact():
  x = np.zeros((2, 8, 8, 3), np.float32)
  w = np.zeros((3, 3, 3, 5), np.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert flops.count_flops(conv, x, w) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  a, b = np.zeros((4, 6), np.float32), np.zeros((6, 7), np.float32)
  assert flops.count_flops(lambda a, b: jax.jit(jnp_dot)(a, b), a, b) == 2 * 4 * 6 * 7
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, a @ b), None, None, length=3)[1]
  assert flops.count_flops(scanned, a, b) == 3 * 2 * 4 * 6 * 7


def jnp_dot(a, b):
  return a @ b


@pytest.mark.parametrize('kind,dtype,peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4e12),
    ('NVIDIA H200', 'float32', 494.7e12),  # TF32: JAX's default float32 matmul precision.
    ('NVIDIA H100 PCIe', 'bfloat16', 756.5e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12),
    ('NVIDIA L4', 'bfloat16', 121e12),
    ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5p', 'float32', 459e12),
    ('TPU v6 lite', 'bfloat16', 918e12),
    ('cpu', 'float32', None),
])
def test_peak_table(kind, dtype, peak):
  assert flops.peak_flops_per_device(kind, dtype) == peak
  assert flops.mfu(1e12, peak) == (None if peak is None else pytest.approx(1e12 / peak))

"""FLOPs of a JAX function from its jaxpr, peak FLOP/s per device kind, and model FLOPs utilisation.

FLOPs are counted on the traced program (the jaxpr: what the user's code asks for, before any
backend compiles it), so the count is the same on CPU, GPU and TPU. XLA's cost analysis of a
compiled GPU executable is empty, and an optimised program's count varies with fusion choices.
Only convolutions and matrix products are counted (2 FLOPs per multiply-add), the convention
for MFU: elementwise work (BatchNorm, activations, the optimizer) is a few percent of a conv
net's FLOPs and runs on units that the peak figures below do not describe.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def _conv_flops(eqn) -> float:
  """2 x output elements x multiply-adds per output element (kernel elements / output features)."""
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  macs_per_output = math.prod(rhs.shape) / rhs.shape[out_feature_dim]
  return 2.0 * math.prod(out.shape) * macs_per_output


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
  """Convolution and matmul FLOPs of `jaxpr`, nested calls included (scan bodies times length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'cond':  # One branch runs: count the most expensive.
      total += max((jaxpr_flops(b.jaxpr) for b in eqn.params['branches']), default=0.0)
    else:
      repeat = eqn.params.get('length', 1) if name == 'scan' else 1
      for sub in _sub_jaxprs(list(eqn.params.values())):
        total += repeat * jaxpr_flops(sub)
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call of `fn(*args, **kwargs)`, traced, never compiled.

  For a pmapped `fn` this is the program of one device (on its shard of the batch).
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


# Peak dense (no structured sparsity) FLOP/s of one JAX device, from the vendors' datasheets, by the
# model's compute dtype. float32 means JAX's default matmul precision, which runs float32
# convolutions and matmuls as TF32 on Ampere and later NVIDIA GPUs and as bfloat16 passes on TPUs;
# its peak is therefore the TF32 (GPU) or bfloat16 (TPU) figure, not the FP32-FMA one. Matched
# in order against jax.Device.device_kind, lower-cased (first match wins).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # NVIDIA H200 / H100 datasheets: SXM BF16 989.4 TFLOPS, TF32 494.7; PCIe 756.5 / 378.
    ('h200 nvl', {'bfloat16': 835.5e12, 'float32': 417.5e12}),
    ('h100 nvl', {'bfloat16': 835.5e12, 'float32': 417.5e12}),
    ('h100 pcie', {'bfloat16': 756.5e12, 'float32': 378.0e12}),
    ('h200', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    ('h100', {'bfloat16': 989.4e12, 'float32': 494.7e12}),  # SXM ('NVIDIA H100 80GB HBM3').
    # NVIDIA A100 (SXM and PCIe): BF16 312, TF32 156.
    ('a100', {'bfloat16': 312e12, 'float32': 156e12}),
    # NVIDIA L40S: BF16 362.05, TF32 183; L4: BF16 121, TF32 60.
    ('l40s', {'bfloat16': 362.05e12, 'float32': 183e12}),
    ('l4', {'bfloat16': 121e12, 'float32': 60e12}),
    # Google Cloud TPU system architecture pages, per chip (one JAX device per chip from v4 on).
    ('tpu v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),  # v6e (Trillium)
    ('tpu v6e', {'bfloat16': 918e12, 'float32': 918e12}),
    ('tpu v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),  # v5e
    ('tpu v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    ('tpu v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    ('tpu v5', {'bfloat16': 459e12, 'float32': 459e12}),  # v5p reports 'TPU v5'.
    ('tpu v4', {'bfloat16': 275e12, 'float32': 275e12}),
)


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  """The datasheet peak of one device of `device_kind` at `dtype`, or None if not in the table."""
  kind = device_kind.lower()
  for pattern, peaks in PEAK_FLOPS:
    if pattern in kind:
      return peaks.get(dtype)
  return None


def mfu(achieved_flops_per_sec: float, peak_flops_per_sec: float | None) -> float | None:
  """Model FLOPs utilisation: achieved / peak (None when the peak is unknown)."""
  if not peak_flops_per_sec:
    return None
  return achieved_flops_per_sec / peak_flops_per_sec

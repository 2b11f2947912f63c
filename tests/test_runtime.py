"""Process-level setup: how many CPU devices training uses."""

import pytest

from unetpp_jax import runtime


@pytest.mark.parametrize('batch_sizes,cores,expected', [
    ((16, 32), 2, 2),
    ((16, 32), 8, 8),
    ((16, 32), 12, 8),  # 12 cores, but 16 images split evenly over at most 8 devices
    ((16, 24), 16, 8),
    ((6,), 4, 3),
    ((7,), 4, 1),  # a prime batch runs on one device
    ((16,), 1, 1),
])
def test_cpu_device_count_divides_every_batch(batch_sizes, cores, expected):
  assert runtime.cpu_device_count(batch_sizes, cores) == expected

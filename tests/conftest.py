"""Test setup: two fake CPU devices (so pmap and BatchNorm synchronisation are real) and a compile
cache."""

import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from unetpp_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_platforms', 'cpu')
# Persistent compilation cache: a second run of the suite skips most compiles. Exported, so that
# every process a test starts (command lines, workers) reads and fills the same cache.
os.environ['JAX_COMPILATION_CACHE_DIR'] = runtime.enable_compilation_cache()
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = str(
    jax.config.jax_persistent_cache_min_compile_time_secs)

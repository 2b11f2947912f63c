"""Process-level JAX setup that must happen before the first JAX computation."""

import glob
import os
import pathlib
from typing import Any

import jax
from absl import flags, logging

DEFAULT_CACHE_DIR = pathlib.Path.home() / '.cache' / 'unetpp_jax' / 'jax'

# The flag of every command line that runs the network (main, benchmark, ablate_deep_supervision):
# pass its value to `use_cpu_cores_as_devices`.
CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None,
    'XLA devices on the CPU backend; default: one per core, as many as divide every batch size '
    'the command runs (training: batch_size and eval_batch_size). Ignored on GPU/TPU.')

GOOGLE_PCI_VENDOR = '0x1ae0'  # Cloud TPU chips.


def tpu_vm(root: str = '/') -> bool:
  """Whether this is a Cloud TPU VM: chips as /dev/accelN (v2 to v4), or as VFIO devices of
  Google's PCI vendor (v5e and later; other VFIO devices and the /dev/accel/ folder of NPUs on
  laptops are not TPUs)."""
  if glob.glob(os.path.join(root, 'dev/accel[0-9]*')):
    return True
  if not glob.glob(os.path.join(root, 'dev/vfio/[0-9]*')):
    return False
  for vendor in glob.glob(os.path.join(root, 'sys/bus/pci/devices/*/vendor')):
    with open(vendor) as f:
      if f.read().strip() == GOOGLE_PCI_VENDOR:
        return True
  return False


def cluster_environment() -> bool:
  """Whether jax.distributed can configure itself: TPU VM, SLURM, Open MPI or JAX_* variables."""
  env = os.environ
  return bool(
      env.get('JAX_COORDINATOR_ADDRESS')
      or tpu_vm()
      or int(env.get('SLURM_NTASKS', '1')) > 1
      or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
  )


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
  """Persists compiled programs, so a restart (or a second test run) skips recompiling.

  Args:
    directory: Where; default $UNETPP_JAX_CACHE, else ~/.cache/unetpp_jax/jax.
  """
  directory = str(directory or os.environ.get('UNETPP_JAX_CACHE') or DEFAULT_CACHE_DIR)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return directory


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def cpu_device_count(batch_sizes: tuple[int, ...], cores: int) -> int:
  """The most devices, at most `cores`, that divide every batch size."""
  return max(d for d in range(1, max(cores, 1) + 1) if all(size % d == 0 for size in batch_sizes))


def use_cpu_cores_as_devices(*batch_sizes: int, devices: int | None = None) -> int | None:
  """On the CPU backend, makes one XLA device per core so the pmapped step runs on all of them.

  XLA:CPU runs each convolution on one thread, so a single CPU device keeps about one core busy.
  With one device per core, pmap runs the per-device shards side by side (BatchNorm statistics and
  gradients are still averaged over the whole batch; docs/benchmark.md, "CPU throughput", has the
  speed-up). The accelerator backends are unaffected.

  Args:
    *batch_sizes: Global batch sizes that every device count must divide.
    devices: Explicit count; None = the most cores that divide every batch size.

  Returns:
    The CPU device count set, or None where it was already set (XLA_FLAGS'
    --xla_force_host_platform_device_count, or jax_num_cpu_devices).
  """
  if ('xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or jax.config.jax_num_cpu_devices > 0):
    return None
  cores = _usable_cores()
  if devices is None:
    devices = cpu_device_count(batch_sizes, cores)
    note = idle_cores_note(batch_sizes, cores, devices)
    if note:
      logging.warning('%s', note)
  if devices < 1:
    raise ValueError(f'CPU device count must be >= 1, got {devices}.')
  jax.config.update('jax_num_cpu_devices', devices)
  logging.info('CPU backend: %d devices (one per core, %d cores).', devices, cores)
  return devices


def idle_cores_note(batch_sizes: tuple[int, ...], cores: int, devices: int) -> str | None:
  """Why `devices` (< `cores`) CPU devices are used, and the batch sizes that would use them all."""
  if devices >= cores:
    return None
  names = ('batch_size', 'eval_batch_size')
  undivided = [f'{name}={size}' for name, size in zip(names, batch_sizes) if size % cores]
  fixes = [f'--config.{name}={-(-size // cores) * cores}'
           for name, size in zip(names, batch_sizes) if size % cores]
  return (f'CPU backend: {devices} of {cores} cores used, as {" and ".join(undivided)} '
          f'{"is" if len(undivided) == 1 else "are"} not divisible by {cores} (each device '
          f'takes an equal share of a batch); training is slower. To use every core: '
          f'{" ".join(fixes)} (or --cpu_devices to choose).')


def prepare_training(config: Any, *batch_sizes: int, compilation_cache: str | None = None) -> None:
  """What a command that trains does before the first JAX computation: TensorFlow imported (quietly)
  when the config reads data through it, the persistent compilation cache ("none": off), and one
  XLA device per CPU core that divides config's batch sizes and `batch_sizes`."""
  from unetpp_jax import cli  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  if config.data.source == 'tfds':  # The other sources run without tensorflow.
    cli.import_tensorflow_quietly()
  if compilation_cache != 'none':
    enable_compilation_cache(compilation_cache)
  use_cpu_cores_as_devices(config.batch_size, config.eval_batch_size, *batch_sizes,
                           devices=CPU_DEVICES.value)

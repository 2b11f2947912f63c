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


def test_idle_cores_note_says_why_and_suggests_a_divisible_batch():
  note = runtime.idle_cores_note((7, 16), cores=2, devices=1)
  assert note.startswith('CPU backend: 1 of 2 cores used, as batch_size=7 is not divisible by 2')
  assert '--config.batch_size=8' in note and 'eval_batch_size' not in note
  note = runtime.idle_cores_note((12, 20), cores=8, devices=4)
  assert 'batch_size=12 and eval_batch_size=20 are not divisible by 8' in note
  assert '--config.batch_size=16 --config.eval_batch_size=24' in note
  assert runtime.idle_cores_note((16, 32), cores=2, devices=2) is None


def test_tpu_vms_are_told_from_laptop_npus_and_other_vfio_devices(tmp_path):
  def machine(name, files):
    root = tmp_path / name
    for path, text in files.items():
      (root / path).parent.mkdir(parents=True, exist_ok=True)
      (root / path).write_text(text)
    return str(root)

  assert runtime.tpu_vm(machine('v4', {'dev/accel0': ''}))
  v5e = machine('v5e', {'dev/vfio/0': '', 'sys/bus/pci/devices/0000:00:04.0/vendor': '0x1ae0\n'})
  assert runtime.tpu_vm(v5e)
  for name, files in [
      ('npu_laptop', {'dev/accel/accel0': '', 'sys/bus/pci/devices/0000:00:0b.0/vendor': '0x8086'}),
      ('vfio_gpu', {'dev/vfio/12': '', 'sys/bus/pci/devices/0000:65:00.0/vendor': '0x10de\n'}),
      ('plain', {'etc/hostname': 'x'}),
  ]:
    assert not runtime.tpu_vm(machine(name, files)), name

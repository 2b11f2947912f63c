"""python -m unetpp_jax.benchmark runs and reports what it promises (speed itself is not asserted
here)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# train: the benchmark sets the CPU device count itself (--cpu_devices); infer: XLA_FLAGS sets it.
@pytest.mark.parametrize('mode,extra,xla_flags,devices', [
    ('train', ['--cpu_devices=4'], '', 4),
    ('infer', ['--prune_level=2', '--profile_dir=PROFILE'],
     '--xla_force_host_platform_device_count=2', 2),
    ('loop', ['--cpu_devices=2'], '', 2),
])
def test_benchmark_prints_one_json_line(mode, extra, xla_flags, devices, tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags, TF_CPP_MIN_LOG_LEVEL='2')
  extra = [e.replace('PROFILE', str(tmp_path / 'profile')) for e in extra]
  result = subprocess.run(
      [sys.executable, '-m', 'unetpp_jax.benchmark', '--config=configs/synthetic.py', '--batch=4',
       '--image_size=32', '--steps=2', '--warmup=1', f'--mode={mode}', *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['mode'] == mode and report['backend'] == 'cpu' and report['device_count'] == devices
  assert report['batch'] == 4 and report['dtype'] == 'float32'
  # FLOPs from the traced step and an MFU against the measured CPU peak, on every backend.
  assert report['flops_per_image'] > 1e6 and report['achieved_gflops'] > 0
  assert report['peak_flops'] > 1e9 and 'measured' in report['peak_flops_source']
  assert report['mfu'] == pytest.approx(report['achieved_gflops'] * 1e9 / report['peak_flops'])
  assert 0 < report['mfu'] < 1
  if mode == 'loop':  # The real train loop against the bare step.
    assert report['steps'] == 2 and report['loop_step_ms'] > 0 and report['step_ms_pipelined'] > 0
    assert report['loop_vs_step'] == pytest.approx(
        report['step_ms_pipelined'] / report['loop_step_ms'])
    assert report['achieved_gflops'] == pytest.approx(
        report['flops_per_image'] * report['loop_images_per_sec'] / 1e9)
    return
  for key in ('images_per_sec', 'step_ms_median', 'step_ms_p90', 'compile_s', 'flops_per_image',
              'xla_flops_per_image', 'achieved_gflops', 'peak_memory_bytes', 'backend',
              'device_count', 'dtype', 'batch'):
    assert key in report, key
  assert report['images_per_sec'] > 0 and report['flops_per_image'] > 1e6
  assert report['step_ms_p90'] >= report['step_ms_median'] > 0
  if mode == 'infer':
    # The profile: a trace for TensorBoard and the op kinds that took the most time.
    assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
    ops = report['top_ops']
    assert ops and all(op['ms_per_step'] > 0 and op['calls_per_step'] > 0 for op in ops)
    assert ops == sorted(ops, key=lambda op: -op['ms_per_step'])
    assert len({op['op'] for op in ops}) == len(ops)  # one entry per kind
    assert report['prune_level'] == 2
    assert report['params'] < 40_000  # the pruned sub-network only (full model: 138,827)


def test_matmul_peak_reports_its_flop_rate():
  from unetpp_jax.study import throughput  # pylint: disable=g-import-not-at-top
  report = throughput.benchmark_matmul(size=128, steps=3, warmup=1)
  assert report['mode'] == 'matmul' and report['step_ms_median'] > 0
  assert report['achieved_gflops'] == pytest.approx(
      2 * 128**3 / (report['step_ms_median'] / 1e3) / 1e9)

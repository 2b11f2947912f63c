"""The deep-supervision study end to end on a tiny synthetic version: every arm of an L = 2 model
trained through the real TFDS pipeline, scored (training evaluator and official score), costed,
tabled and plotted; then resumed after an arm lost its result and its last checkpoint."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from unetpp_jax import models
from unetpp_jax.study import deep_supervision
from unetpp_jax.evaluation import evaluate

import synthetic_release
import test_evaluate

STEPS = 4


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp('ablation')
  config = test_evaluate._tiny_config(root / 'tfds')
  config.num_train_steps = config.eval_every_steps = STEPS
  config.checkpoint_every_steps = config.log_every_steps = STEPS // 2
  val_indices = sorted(int(i.rsplit('_', 1)[1]) for i in evaluate.split_ids(config, 'validation'))
  data = synthetic_release.write_zip(root / 'train.zip', val_indices)
  results = deep_supervision.run_study(config, root / 'study', data=str(data), bench_batch=4,
                               bench_steps=2)
  return root / 'study', config, data, results


def test_every_arm_is_trained_scored_and_costed(study):
  workdir, _, _, results = study
  assert results['arms'] == ['unet', 'wide_unet', 'unetpp', 'unetpp_ds2']
  assert set(results['status'].values()) == {'trained'}
  predictions = {(r['arm'], r['prediction']): r for r in results['rows']}
  assert set(predictions) == {('unet', 'head2'), ('wide_unet', 'head2'), ('unetpp', 'head1'),
                              ('unetpp', 'head2'), ('unetpp_ds2', 'head1'),
                              ('unetpp_ds2', 'head2'), ('unetpp_ds2', 'accurate')}
  for row in results['rows']:
    for metric in (*deep_supervision.METRICS, *deep_supervision.OFFICIAL):
      assert 0 <= row[metric] <= 1, (row, metric)
  # The rows carry the training evaluator's numbers of each arm's last step.
  stored = json.loads((workdir / 'unetpp_ds2' / 'seed0' / 'eval_metrics.json').read_text())
  assert stored['step'] == STEPS
  assert predictions['unetpp_ds2', 'head1']['iou'] == stored['eval/iou/head1']
  assert predictions['unetpp_ds2', 'accurate']['dice'] == stored['eval/dice/accurate']
  official = json.loads((workdir / 'unetpp' / 'seed0' / 'official' / 'metrics.json').read_text())
  assert predictions['unetpp', 'head2']['score'] == official['predictions']['head2']['score']
  # Cost: the pruned network L1 is smaller and cheaper than L2; the wide U-Net matches U-Net++.
  l1, l2 = predictions['unetpp', 'head1'], predictions['unetpp', 'head2']
  assert l1['params'] < l2['params'] and l1['gflops_per_image'] < l2['gflops_per_image']
  assert all(r['images_per_sec'] > 0 for r in results['rows'])
  assert predictions['unet', 'head2']['params'] < l2['params']
  assert abs(predictions['wide_unet', 'head2']['params'] - l2['params']) < 0.05 * l2['params']


def test_outputs_are_written(study):
  workdir, _, _, results = study
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results['rows']) == 7 and tuple(rows[0]) == deep_supervision.COLUMNS
  assert json.loads((workdir / 'results.json').read_text())['rows'] == results['rows']
  table = (workdir / 'results.md').read_text()
  assert table.count('\n| ') == 8  # header and 7 rows
  assert 'score' in table and '| unetpp_ds2 | 1 2 | accurate (L2) |' in table
  for name in ('iou_vs_prune_level.png', 'iou_vs_speed.png'):
    with Image.open(workdir / name) as image:
      assert image.size[0] > 400 and image.size[1] > 300


def test_resume_skips_finished_arms_and_continues_unfinished(study):
  workdir, config, data, first = study
  arm = workdir / 'unetpp_ds2' / 'seed0'
  (arm / 'result.json').unlink()
  shutil.rmtree(arm / 'checkpoints' / str(STEPS))  # As if killed between the two checkpoints.
  for name in ('results.csv', 'results.json', 'results.md'):
    (workdir / name).unlink()
  again = deep_supervision.run_study(config, workdir, data=str(data), bench_batch=4, bench_steps=2)
  assert again['status'] == {'unet/seed0': 'done before', 'wide_unet/seed0': 'done before',
                             'unetpp/seed0': 'done before',
                             'unetpp_ds2/seed0': f'resumed from step {STEPS // 2}'}
  assert again['cost'] == first['cost']  # measured once
  # Exact resume: the continued arm reaches the same numbers as its uninterrupted first run.
  for before, after in zip(first['rows'], again['rows']):
    assert after == pytest.approx(before, rel=1e-5), (before, after)
  assert (workdir / 'results.csv').exists()


def test_summary_over_seeds_and_bad_arms():
  rows = [dict(arm='a', model='unetpp', supervised_heads='2', prediction='head2', prune_level=2,
               params=10, gflops_per_image=1.0, images_per_sec=5.0, seed=s, iou=v, dice=v,
               iou_per_image=v, dice_per_image=v, score=None, ap50=None)
          for s, v in ((0, 0.5), (1, 0.7))]
  (entry,) = deep_supervision._summarize(rows)
  assert entry['seeds'] == 2 and entry['iou'] == pytest.approx(0.6)
  assert entry['iou_std'] == pytest.approx(np.std([0.5, 0.7])) and entry['score'] is None
  assert '0.600 ± 0.100' in deep_supervision.markdown_table([entry], 2)
  base = test_evaluate._tiny_config('/unused')
  for arm in ('unetpp_ds1', 'unetpp_ds3', 'unet_ds2', 'resnet'):
    with pytest.raises(ValueError, match='Unknown arm'):
      deep_supervision.arm_config(base, arm, 0)
  config = deep_supervision.arm_config(base, 'unetpp_ds2', 7)
  assert tuple(config.loss.deep_supervision_heads) == (1, 2) and config.seed == 7
  wide = deep_supervision.arm_config(base, 'wide_unet', 0)
  assert models.create_model(wide.model).skips == 'plain'


def test_seeds_are_repeated_and_summarised(study, tmp_path):
  _, config, _, _ = study
  results = deep_supervision.run_study(config, tmp_path, arms=['unetpp'], seeds=[0, 1],
                                       bench_batch=4, bench_steps=1)
  assert sorted(results['status']) == ['unetpp/seed0', 'unetpp/seed1']
  seeds = {(r['seed'], r['prediction']): r for r in results['rows']}
  assert set(seeds) == {(0, 'head1'), (0, 'head2'), (1, 'head1'), (1, 'head2')}
  assert seeds[0, 'head2']['score'] is None  # no --data: no official score
  assert seeds[0, 'head2']['iou'] != seeds[1, 'head2']['iou']  # the seed changes the run
  head2 = next(e for e in results['summary'] if e['prediction'] == 'head2')
  assert head2['seeds'] == 2 and head2['iou_std'] > 0
  assert head2['iou'] == pytest.approx((seeds[0, 'head2']['iou'] + seeds[1, 'head2']['iou']) / 2)
  # The table's cells carry the spread over the seeds, the head-2 row its IoU's.
  row = next(line for line in (tmp_path / 'results.md').read_text().splitlines()
             if line.startswith('| unetpp') and '| head2 ' in line)
  assert f'{head2["iou"]:.3f} ± {head2["iou_std"]:.3f}' in row


def test_study_runs_with_the_recipe(tmp_path):
  # The recipe (native-scale crops with zoom, contact-aware 3 classes): every head is scored with
  # the official metric, at native size ('pad') with the 3-class instance defaults.
  config = test_evaluate._tiny_config(tmp_path / 'tfds')
  config.data.train_preprocess = 'crop'
  config.data.scale_range = (0.75, 1.33)
  config.model.num_classes = 3
  config.loss.contact_width = 2
  config.loss.class_weights = (1.0, 1.0, 3.0)
  config.num_train_steps = config.eval_every_steps = STEPS
  config.checkpoint_every_steps = config.log_every_steps = STEPS
  val_indices = sorted(int(i.rsplit('_', 1)[1]) for i in evaluate.split_ids(config, 'validation'))
  data = synthetic_release.write_zip(tmp_path / 'train.zip', val_indices)
  results = deep_supervision.run_study(config, tmp_path / 'study', arms=['unetpp_ds2'],
                                       data=str(data), bench_batch=4, bench_steps=2)
  rows = {r['prediction']: r for r in results['rows']}
  assert set(rows) == {'head1', 'head2', 'accurate'}
  for row in rows.values():
    assert 0 <= row['score'] <= 1 and 0 <= row['iou'] <= 1
  official = json.loads(
      (tmp_path / 'study' / 'unetpp_ds2' / 'seed0' / 'official' / 'metrics.json').read_text())
  assert official['inference']['strategy'] == 'pad'
  assert official['instances']['seeds'] == 'distance' and official['instances']['threshold'] == 0.7
  assert official['instances']['bright'] == {'threshold': 0.6, 'seed_h': 1.5}

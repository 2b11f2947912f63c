r"""The UNet++ paper's deep-supervision and pruning study as one resumable command.

  python -m unetpp_jax.ablate_deep_supervision --config=configs/dsb.py --workdir=W \
      [--arms=unet,wide_unet,unetpp,unetpp_ds2,unetpp_ds3,unetpp_ds4] [--seeds=0,1,2] \
      [--data=../shared/data/dsb2018/stage1_train.zip] [--config.num_train_steps=N ...]

Arms share the data, seed and schedule of the config (--config.* overrides apply to every arm):
  unet        U-Net with the same filters (one decoder path, head L only)
  wide_unet   U-Net with filters widened to U-Net++'s parameter count
  unetpp      U-Net++ without deep supervision (loss on head L only)
  unetpp_dsK  U-Net++ with deep supervision over its last K heads, L-K+1..L (K = 2..L; K = L is
              full deep supervision)

Each (arm, seed) trains in W/<arm>/seed<seed>, resuming from its own checkpoints, and is then
evaluated on the validation split:
  - every head j (= U-Net++ pruned to L^j: the pruned network computes exactly head j's
    sub-network) and, for deep supervision, the 'accurate' mean of the supervised heads: pooled and
    per-image IoU and Dice, by the training evaluator at config.data.image_size;
  - with --data (the Kaggle-layout release), the official DSB2018 score and AP@0.5 of the same
    predictions at native size (without test-time flips), by unetpp_jax.evaluation.evaluate.
A finished (arm, seed) leaves result.json in its folder; the next run skips it. Inference cost per
architecture and pruning level (parameters used, XLA FLOPs per image, images/s at --bench_batch on
the current backend) is measured once into W/cost.json.

Writes to W: results.csv (one row per arm, seed and prediction), results.json (those rows, their
mean and standard deviation over seeds, and the cost table), results.md (the table) and the plots
iou_vs_prune_level.png and iou_vs_speed.png.
"""

import copy
import csv
import io
import itertools
import json
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from unetpp_jax import atomic, models, train
from unetpp_jax.evaluation import evaluate
from unetpp_jax.heads import Heads
from unetpp_jax.study import throughput
from unetpp_jax.workdir import Workdir

METRICS = ('iou', 'iou_per_image', 'dice', 'dice_per_image')
OFFICIAL = ('score', 'ap50')
COLUMNS = ('arm', 'seed', 'model', 'supervised_heads', 'prediction', 'prune_level', 'params',
           'gflops_per_image', 'images_per_sec', *METRICS, *OFFICIAL)
_ARM = re.compile(r'(unet|wide_unet|unetpp)(?:_ds(\d+))?$')


def default_arms(levels: int) -> list[str]:
  return ['unet', 'wide_unet', 'unetpp'] + [f'unetpp_ds{k}' for k in range(2, levels + 1)]


def arm_config(base: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
  """`base` with the arm's model and supervised heads and the given seed."""
  levels = len(base.model.filters) - 1
  match = _ARM.fullmatch(arm)
  k = int(match.group(2)) if match and match.group(2) else None
  if not match or (k is not None and (match.group(1) != 'unetpp' or not 2 <= k <= levels)):
    raise ValueError(f'Unknown arm {arm!r}: expected one of {default_arms(levels)} '
                     f'(unetpp_dsK needs 2 <= K <= L = {levels}).')
  config = copy.deepcopy(base)
  config.model.name = match.group(1)
  config.loss.deep_supervision_heads = tuple(range(levels - (k or 1) + 1, levels + 1))
  config.loss.head_weights = ()
  config.predict.head = levels
  config.seed = seed
  return config


def _train_and_score(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     data: str | None) -> dict[str, Any]:
  """Trains one arm (resuming), then scores its predictions: {prediction: {metric: value}}."""
  train.train_and_evaluate(config, workdir)
  stored = Workdir(workdir).eval_metrics()
  if stored['step'] != config.num_train_steps:
    raise RuntimeError(f'The evaluation recorded in {workdir} is from step {stored["step"]}, not '
                       f'the last step {config.num_train_steps}.')
  model = models.create_model(config.model)
  heads = Heads.from_config(config)
  # 'accurate' is a distinct prediction only when several heads are supervised.
  predictions = heads.prediction_names if heads.has_ensemble else heads.prediction_names[:-1]
  scores = {p: {m: stored[f'eval/{m}/{p}'] for m in METRICS} for p in predictions}
  if data:
    report = evaluate.evaluate(
        workdir, data, workdir / 'official', split='validation', num_overlays=4,
        inference=evaluate.InferenceOptions(mode='accurate', prune_level=model.levels,
                                            flips=False))
    for p in predictions:
      scores[p].update({m: report['predictions'][p][m] for m in OFFICIAL})
  return scores


def _costs(config: ml_collections.ConfigDict, levels: Sequence[int], batch: int,
           steps: int) -> dict[str, dict[str, float]]:
  """{prune level: params, FLOPs and images/s} of inference at `batch` images."""
  costs = {}
  for level in levels:
    result = throughput.benchmark_model(config, batch=batch, mode='infer', prune_level=level,
                                        steps=steps, warmup=2)
    costs[str(level)] = dict(params=result['params'],
                             gflops_per_image=result['flops_per_image'] / 1e9,
                             images_per_sec=result['images_per_sec'])
  return costs


def run_study(
    base: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    data: str | None = None,
    bench_batch: int = 16,
    bench_steps: int = 10,
) -> dict[str, Any]:
  """Runs (or resumes) the study in `workdir`; returns what results.json holds."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  levels = len(base.model.filters) - 1
  arms = list(arms or default_arms(levels))
  seeds = list(seeds if seeds is not None else [base.seed])
  configs = {(arm, seed): arm_config(base, arm, seed) for arm in arms for seed in seeds}
  if data and not pathlib.Path(data).exists():
    raise FileNotFoundError(f'--data {data} does not exist.')

  cost_path = workdir / 'cost.json'
  cost = json.loads(cost_path.read_text()) if cost_path.exists() else {}
  status, rows = {}, []
  for n, ((arm, seed), config) in enumerate(configs.items()):
    arm_dir = workdir / arm / f'seed{seed}'
    result_path = arm_dir / 'result.json'
    name = f'{arm}/seed{seed}'
    stored_config = json.loads(config.to_json_best_effort())
    if result_path.exists() and json.loads(result_path.read_text())['config'] == stored_config:
      status[name] = 'done before'
    else:
      steps_done = Workdir(arm_dir).latest_step() or 0
      status[name] = f'resumed from step {steps_done}' if steps_done else 'trained'
      logging.info('[%d/%d] %s: %s (heads %s)...', n + 1, len(configs), name,
                   'resuming' if steps_done else 'training', config.loss.deep_supervision_heads)
      scores = _train_and_score(config, arm_dir, data)
      atomic.write_atomically(
          result_path, json.dumps({'config': stored_config, 'scores': scores}, indent=2))
    scores = json.loads(result_path.read_text())['scores']

    model_name = config.model.name
    if model_name not in cost:
      model = models.create_model(config.model)
      logging.info('Measuring the inference cost of %s...', model_name)
      level_list = range(1, levels + 1) if model.skips == 'nested' else [levels]
      cost[model_name] = _costs(config, level_list, bench_batch, bench_steps)
      atomic.write_atomically(cost_path, json.dumps(cost, indent=2))
    heads = tuple(config.loss.deep_supervision_heads)
    for prediction, values in scores.items():
      level = max(heads) if prediction == 'accurate' else int(prediction.removeprefix('head'))
      rows.append(dict(arm=arm, seed=seed, model=model_name,
                       supervised_heads=' '.join(map(str, heads)), prediction=prediction,
                       prune_level=level, **cost[model_name][str(level)],
                       **{m: values.get(m) for m in (*METRICS, *OFFICIAL)}))

  summary = _summarize(rows)
  results = dict(arms=arms, seeds=seeds, data=data, status=status, rows=rows, summary=summary,
                 cost=cost, base_config=json.loads(base.to_json_best_effort()),
                 command=' '.join(sys.argv))
  atomic.write_atomically(workdir / 'results.json', json.dumps(results, indent=2))
  table = io.StringIO()
  writer = csv.DictWriter(table, COLUMNS)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_atomically(workdir / 'results.csv', table.getvalue())
  atomic.write_atomically(workdir / 'results.md', markdown_table(summary, len(seeds)))
  plot(summary, workdir, levels)
  logging.info('Study results in %s: %s', workdir, status)
  return results


def _summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds of each (arm, prediction)."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault((row['arm'], row['prediction']), []).append(row)
  summary = []
  for (arm, prediction), group in groups.items():
    entry = {k: group[0][k] for k in ('arm', 'model', 'supervised_heads', 'prediction',
                                      'prune_level', 'params', 'gflops_per_image',
                                      'images_per_sec')}
    entry['seeds'] = len(group)
    for metric in (*METRICS, *OFFICIAL):
      values = [r[metric] for r in group if r[metric] is not None]
      entry[metric] = float(np.mean(values)) if values else None
      entry[f'{metric}_std'] = float(np.std(values)) if values else None
    summary.append(entry)
  return summary


def markdown_table(summary: list[dict[str, Any]], num_seeds: int) -> str:
  official = any(e['score'] is not None for e in summary)
  metrics = (*METRICS, *OFFICIAL) if official else METRICS
  spread = f' (mean ± std over {num_seeds} seeds)' if num_seeds > 1 else ''
  header = ['arm', 'supervised heads', 'prediction', 'params', 'GFLOP/img', 'img/s', *metrics]
  lines = [f'Validation{spread}; pooled IoU/Dice and per-image means; cost of the prediction\'s '
           'network.', '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for e in summary:
    cells = [e['arm'], e['supervised_heads'], f'{e["prediction"]} (L{e["prune_level"]})',
             f'{e["params"] / 1e6:.2f}M', f'{e["gflops_per_image"]:.2f}',
             f'{e["images_per_sec"]:.1f}']
    for m in metrics:
      value = e[m]
      cell = '' if value is None else f'{value:.3f}'
      if value is not None and num_seeds > 1:
        cell += f' ± {e[f"{m}_std"]:.3f}'
      cells.append(cell)
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(summary: list[dict[str, Any]], workdir: pathlib.Path, levels: int) -> None:
  """IoU against the pruning level per arm, and IoU against inference speed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  heads_only = [e for e in summary if e['prediction'] != 'accurate']
  arms = list(dict.fromkeys(e['arm'] for e in summary))
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for arm, marker in zip(arms, itertools.cycle('osD^vP*X')):
    points = sorted((e['prune_level'], e['iou'], e['iou_std']) for e in heads_only
                    if e['arm'] == arm)
    x, y, err = zip(*points)
    ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=arm, alpha=0.85,
                linestyle='-' if len(x) > 1 else 'none')
  ax.set_xticks(range(1, levels + 1), [f'L{k}' for k in range(1, levels + 1)])
  _save(fig, ax, 'pruning level (head used)', workdir / 'iou_vs_prune_level.png')

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for arm, marker in zip(arms, itertools.cycle('osD^vP*X')):
    points = [e for e in heads_only if e['arm'] == arm]
    ax.scatter([e['images_per_sec'] for e in points], [e['iou'] for e in points], label=arm,
               marker=marker, alpha=0.85)
    for e in points:
      ax.annotate(f'L{e["prune_level"]}', (e['images_per_sec'], e['iou']), fontsize=7,
                  xytext=(3, 3), textcoords='offset points')
  ax.set_xscale('log')
  _save(fig, ax, 'inference images/s (log scale)', workdir / 'iou_vs_speed.png')


def _save(fig: Any, ax: Any, xlabel: str, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ax.set_xlabel(xlabel)
  ax.set_ylabel('validation IoU (pooled)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

"""Small U-Net++ on procedurally generated nuclei: the offline smoke run (minutes on 2 CPU cores).

Run:
  .venv/bin/python -m unetpp_jax.main --config=configs/synthetic.py   # -> workdirs/synthetic

Expected result: after 300 steps, a validation IoU of the last head (pooled, eval/iou/head3 in
eval_metrics.json) of 0.90 to 0.95; the all-background prediction scores 0.

Measured: 2-core AMD EPYC CPU shared with other jobs, 2 min 47 s; validation IoU 0.925 (no
official score for this data).
"""

from configs import dsb_paper as dsb


def get_config():
  config = dsb.get_config()
  config.data.dataset = 'synthetic_nuclei'
  config.data.image_size = 64
  config.model.filters = (8, 16, 32, 64)  # L = 3.
  config.loss.deep_supervision_heads = (1, 2, 3)
  config.predict.head = 3
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 300
  config.log_every_steps = 25
  config.eval_every_steps = 150
  config.checkpoint_every_steps = 150
  return config

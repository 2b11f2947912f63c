"""Small U-Net++ on procedurally generated nuclei: the offline smoke run (about a minute on 2 CPU cores).

Run:
  python -m unetpp_jax.main --config=configs/synthetic.py    # workdir defaults to workdirs/synthetic

Expected result: validation IoU of the last head well above the all-background baseline after
300 steps (the exact figure is in README.md).
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

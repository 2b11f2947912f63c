"""The deep-supervision study on DSB2018 on a CPU budget: configs/dsb_paper.py at half width, short.

Run (all six arms of L = 4, with the official score of the validation split):
  .venv/bin/python -m unetpp_jax.ablate_deep_supervision --config=configs/dsb_ablation_cpu.py \
      --workdir=workdirs/ablation_cpu --data=../shared/data/dsb2018/stage1_train.zip

Same data, preprocessing, loss and optimiser as configs/dsb_paper.py; filters 16..256 (a quarter
of the FLOPs) and 300 steps of batch 16 (about 9 epochs) so that one arm trains in minutes on two
CPU cores. On a GPU, run the study with configs/dsb_paper.py (or configs/dsb.py) instead.

Measured: 2 CPU cores, 51 minutes for all six arms, evaluation included; official score on the
tail split's validation images (add --config.data.split=tail to repeat) 0.358 at best (U-Net++ L3
with deep supervision), 0.295 for U-Net (docs/results.md).
"""

from configs import dsb_paper as dsb


def get_config():
  config = dsb.get_config()
  config.model.filters = (16, 32, 64, 128, 256)  # Half of the paper's widths; L = 4.
  config.num_train_steps = 300
  config.log_every_steps = 50
  config.eval_every_steps = 300  # Validation once, at the end (the study reads it).
  config.checkpoint_every_steps = 100
  return config

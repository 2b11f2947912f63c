"""The deep-supervision study on DSB2018 on a CPU budget: configs/dsb.py at half width, short schedule.

Run (all six arms of L = 4, with the official score of the validation split):
  .venv/bin/python scripts/ablate_deep_supervision.py --config=configs/dsb_ablation_cpu.py \
      --workdir=workdirs/ablation_cpu --data=../shared/data/dsb2018/stage1_train.zip

Same data, preprocessing, loss and optimiser as configs/dsb.py; filters 16..256 (a quarter of the
FLOPs) and 300 steps of batch 16 (about 9 epochs) so that one arm trains in minutes on two CPU
cores. On a GPU, run the study with configs/dsb.py instead. Expected result: the table and plots in
README.md ("Deep-supervision study").
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

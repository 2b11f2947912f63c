"""The DSB2018 recipe (configs/dsb.py) on a CPU budget: under an hour on 2 CPU cores.

Run:
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb_cpu.py     # -> workdirs/dsb_cpu
  .venv/bin/python -m unetpp_jax.evaluate --workdir=workdirs/dsb_cpu \
      --data=../shared/data/dsb2018/stage1_train.zip --split=validation \
      --output=/tmp/eval_recipe_cpu

Same data, split, targets, loss and evaluation as configs/dsb.py; half the filters (a quarter of
the FLOPs), 128x128 crops, batch 8 and 1,800 steps (about 27 epochs of crops of the 532 training
images of the grouped split), so that CI-class machines can show the recipe works.

Measured: 2-core Intel Xeon CPU, 1,800 steps in 38 to 44 minutes alone, validations included (the
time table of docs/results.md); official score 0.597 on the grouped validation split with the
evaluate defaults, the mean of two seeds (fluorescence sparse 0.664, crowded 0.633, tissue 0.356,
brightfield 0.253).
"""

from configs import dsb


def get_config():
  config = dsb.get_config()
  config.data.image_size = 128  # Native-resolution crops; a multiple of 2**4.
  config.model.filters = (16, 32, 64, 128, 256)  # Half of the paper's widths; L = 4.
  config.batch_size = 8
  config.eval_batch_size = 16
  config.optimizer.warmup_steps = 100
  config.num_train_steps = 1_800  # 1,200 and 2,200 scored lower (docs/results.md).
  config.log_every_steps = 25
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 100  # A few minutes of CPU time: little is lost on a stop.
  return config

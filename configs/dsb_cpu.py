"""configs/dsb.py on a CPU budget: the paper's model and data, 320 steps instead of 20,000.

Run:
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb_cpu.py   # -> workdirs/dsb_cpu

What to expect on 2 CPU cores: 320 steps of batch 16 (5,120 images, about 10 epochs of the 536
training images), validated at steps 160 and 320 and checkpointed every 80 steps (a few minutes of
work at most is lost to a kill). The run takes about 17 minutes of steps at the 5.06 images/s
measured on an idle 2-core AMD EPYC (README "Benchmark"), about 33 minutes at the 2.6 images/s
reported for a 2-core Intel Xeon (issue 14), and about an hour when other jobs share the cores
(1.4 images/s in the README's run); add a minute or two to prepare the data the first time, to
compile and to validate. These are the first 320
steps of the README's 480-step CPU run ("Results"; same seed and batches, constant learning rate):
its validation IoU of head 4 (pooled) was 0.771 at step 160 and 0.778 at step 320 (Dice 0.871,
0.875); expect the same to about +-0.01 on another machine. The full schedule is configs/dsb.py
(20,000 steps: hours on a GPU, days on a CPU).
"""

from configs import dsb


def get_config():
  config = dsb.get_config()
  config.num_train_steps = 320  # About 10 epochs; the paper's 20,000 take days on a CPU.
  config.log_every_steps = 20  # Progress every minute or so at CPU speed.
  config.eval_every_steps = 160  # Validation twice (134 images, under a minute each).
  config.checkpoint_every_steps = 80  # A checkpoint every few minutes at CPU speed.
  return config

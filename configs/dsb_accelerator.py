"""configs/dsb.py (the recipe) for one GPU or TPU chip: bfloat16 compute, a batch that fills it.

Run (on a machine where `jax.devices()` lists the accelerator, see docs/operations.md; the
workdir defaults to workdirs/dsb_accelerator):
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb_accelerator.py

Global batch 64, Adam 2e-3 (the recipe's 1e-3 scaled by the square root of the batch ratio) after a
100-step warmup, and 3,000 steps (192,000 crops, 60% of configs/dsb.py's), sized so that training
and its validation fit in 8 minutes on one H200: that GPU ran the paper setting's train step (128
images of 96x96, bfloat16) in 22 ms, about 54 million pixels per second, so a step of 64 crops of
256x256 (4.2 million pixels) should take about 80 ms, and 3,000 steps about 4 minutes, leaving
room for compilation, input and the validation passes (the recipe's Lovasz term, absent from that
step, adds 22% to a step on a CPU: about 5 minutes if it costs as much here). On a machine without
TensorFlow, train from the zip itself:
--config.data.source=release:../shared/data/dsb2018/stage1_train_compact.zip.

Not measured (an estimate from the measured step time above).
"""

from configs import dsb


def get_config():
  config = dsb.get_config()
  # bfloat16 activations and matmuls; float32 parameters, optimizer state and loss (the H200 step
  # time in bfloat16 is in docs/benchmark.md, "Accelerators").
  config.model.dtype = 'bfloat16'
  # Global batch (split over all devices): 64 crops of 256x256 hold about 3.6 times the pixels of
  # the 128 images of 96x96 that kept an H200 busy in the paper setting (a crop has 7 times the
  # pixels of such an image); on several devices keep it a multiple of the device count.
  config.batch_size = 64
  config.eval_batch_size = 64
  # Learning rate scaled from the recipe's 1e-3 at batch 16 by the square root of the batch ratio
  # (Adam's usual rule): 1e-3 * sqrt(64 / 16) = 2e-3, after a linear warmup, then cosine decay.
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  # About 4 to 5 minutes on one H200, estimated (see above); configs/dsb.py's 320,000 crops
  # would be 5,000 steps.
  config.num_train_steps = 3_000
  config.log_every_steps = 50
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  return config

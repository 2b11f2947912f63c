"""configs/dsb.py for one GPU or TPU chip: bfloat16 compute, a batch that fills the device.

Run (on a machine where `jax.devices()` lists the accelerator, see README "Install"):
  python -m unetpp_jax.main --config=configs/dsb_accelerator.py   # workdir: workdirs/dsb_accelerator

Not yet measured on an accelerator by this project: the settings follow from the H200 step
timings in README ("Benchmark") and from the paper's schedule, not from a tuned run; check the
validation IoU against configs/dsb.py before relying on it.
"""

from configs import dsb


def get_config():
  config = dsb.get_config()
  # bfloat16 activations and matmuls, float32 parameters, optimizer state and loss: about twice
  # the float32 images/s of a Hopper GPU at batch 128 (README "Benchmark").
  config.model.dtype = 'bfloat16'
  # Global batch (split over all devices): 128 keeps an H100/H200 busy at 96x96 (batch 16 leaves
  # it mostly idle); on several devices keep it a multiple of the device count.
  config.batch_size = 128
  config.eval_batch_size = 256
  # Learning rate scaled from the paper's 3e-4 at batch 16 by the square root of the batch ratio
  # (Adam's usual rule): 3e-4 * sqrt(128 / 16) = 8.5e-4, reached after a linear warmup.
  config.optimizer.learning_rate = 8.5e-4
  config.optimizer.warmup_steps = 250
  # The same number of examples as configs/dsb.py (20,000 steps x 16 = 2,500 steps x 128):
  # about 600 epochs of the 536 training images.
  config.num_train_steps = 2_500
  config.log_every_steps = 25
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  return config

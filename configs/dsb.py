"""The DSB2018 recipe: U-Net++ trained on native-scale crops with a contact-aware 3-class target.

Run (the workdir defaults to workdirs/dsb):
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb.py
  .venv/bin/python -m unetpp_jax.evaluate --workdir=workdirs/dsb \
      --data=../shared/data/dsb2018/stage1_train.zip \
      --split=validation --output=/tmp/eval_dsb

What it changes against the paper's setting (configs/dsb_paper.py: whole images resized to 96x96,
1 class), following the DSB2018 winners: random 256x256 crops at native resolution with a random
zoom around 1 (a 696x520 image with 290 nuclei resized to 96x96 leaves 2 to 3 pixels per
nucleus); a 3-class target (background / nucleus interior / boundary: a rim around every nucleus
plus a band where nuclei touch) with a weighted cross-entropy, Dice per class and the
Lovasz-softmax loss; the RGB input joined by its haematoxylin (nuclear-stain) density, which keeps
the stroma of H&E sections dark, and the stain densities of bright-background training images
rescaled at random, so that H&E sections stained unlike the training ones look familiar;
GroupNorm instead of BatchNorm, so that each image is normalised on its own whatever else shares
its batch; every head deeply supervised; evaluation at native size (padded whole images), flip
test-time augmentation, and the instance post-processing chosen on the validation split
(`instances.default_options`).

Sized for one accelerator (20,000 steps of batch 16). configs/dsb_cpu.py is the same recipe on a
CPU budget; docs/results.md has its measured scores and commands.

Measured: 2-core Intel Xeon CPU (idle), 49.9 s per step and 12.4 GB peak memory (python -m
unetpp_jax.benchmark --config=configs/dsb.py --batch=16 --warmup=1 --steps=3), so about 11.5 days
for the 20,000 steps; not run to the end, so no score. Not measured on a GPU or TPU.
"""

from configs import dsb_paper


def get_config():
  config = dsb_paper.get_config()  # Every field is documented there.
  config.data.image_size = 256  # Crop size (a multiple of 2**L); the winners' 256.
  config.data.train_preprocess = 'crop'  # Native resolution; validation uses the central crop.
  config.data.scale_range = (0.75, 1.33)  # Random zoom of each crop, log-uniform.
  config.model.num_classes = 3  # Background / nucleus interior / boundary.
  config.model.input_norm = 'rgb_haematoxylin'  # RGB plus the nuclear-stain density (model.md).
  config.data.stain_jitter = 1.2  # H and E densities of stained sections scaled by 0.3..3.3.
  config.model.norm = 'group'  # Per image; scored above BatchNorm (docs/results.md).
  config.loss.contact_width = 2  # Nucleus pixels within 2 px of another nucleus are boundary.
  config.loss.class_weights = (1.0, 1.0, 3.0)  # The thin boundary class weighs 3x in the CE.
  config.loss.lovasz_weight = 1.0  # Lovasz-softmax (a surrogate of 1 - IoU): sharper masks.
  config.loss.deep_supervision_heads = (1, 2, 3, 4)  # Every head.
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 500
  config.num_train_steps = 20_000
  return config

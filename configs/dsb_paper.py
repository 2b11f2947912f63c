"""U-Net++ on DSB2018 stage1_train as in the UNet++ paper: whole images resized to 96x96, 1 class.

The setting of the deep-supervision study's paper comparison (Adam 3e-4, filters 32..512); the
recipe that scores better on the leaderboard metric is configs/dsb.py.

Run (the workdir defaults to workdirs/dsb_paper):
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb_paper.py
  .venv/bin/python -m unetpp_jax.main --config=configs/dsb_paper.py \
      --config.num_train_steps=600 --config.batch_size=8

The stage1_train release is read from `data.manual_dir` (default: $DSB2018_DIR, else
../shared/data/dsb2018 beside the repository) and prepared once into the TFDS data_dir.

Measured: one NVIDIA H200 GPU, about 6 minutes for the 20,000 steps (timed only); 2-core
AMD EPYC CPU shared with other jobs, 480 steps in 88 minutes, official score 0.433 on the tail
split's validation images (--config.data.split=tail; docs/results.md, with the commands).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, dropout, data order and augmentation.

  config.data = ml_collections.ConfigDict()
  # 'tfds' (tf.data over a TFDS builder), 'npz:PATH' (in-memory, numpy-only pipeline over a file
  # written by `python -m unetpp_jax.export_npz`) or 'release:PATH' (numpy-only, straight from a
  # release zip or folder); the last two need no tensorflow.
  config.data.source = 'tfds'
  config.data.dataset = 'dsb2018'  # TFDS builder: 'dsb2018', 'dsb2018/fixed' or 'synthetic_nuclei'.
  config.data.tfds_data_dir = ''  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets).
  # Folder holding stage1_train.zip (or the unpacked release); '' = $DSB2018_DIR, else
  # ../shared/data/dsb2018 beside the repository. If nothing is there, the builder downloads it.
  config.data.manual_dir = ''
  # Validation split: 'grouped' keeps the tiles of each mosaic together and gives every kind of
  # image (fluorescence sparse / crowded, tissue, brightfield) at least its share
  # (unetpp_jax/data/splits.py); 'tail' is the last val_fraction of the builder's order.
  config.data.split = 'grouped'
  config.data.val_fraction = 0.2  # Share of the images (of each kind) held out for validation.
  # How often each training image of a kind occurs per epoch (oversampling of rare kinds).
  config.data.repeats = ml_collections.ConfigDict({
      'fluorescence_sparse': 1, 'fluorescence_crowded': 1, 'tissue': 1, 'brightfield': 1})
  config.data.image_size = 96  # Training/validation size (square); a multiple of 2**L.
  # 'resize': whole image resized to image_size (the paper). 'crop': random image_size crops at
  # native resolution (validation then uses the central crop).
  config.data.train_preprocess = 'resize'
  config.data.augment = True  # Random flips and rot90, applied to image and label together.
  config.data.jitter = 0.1  # Strength of photometric jitter (brightness, contrast, gamma); 0 = off.
  # Colour augmentation, so that fluorescence (bright nuclei on dark), stained tissue and
  # brightfield (dark nuclei on bright) look alike to the network: the probability of inverting a
  # training image, of making it grey, and whether to permute its colour channels at random.
  config.data.invert_prob = 0.0
  config.data.grey_prob = 0.0
  config.data.channel_shuffle = False
  # Stain augmentation of stained sections (bright background, in colour; grey brightfield is left
  # as it is): their haematoxylin and eosin densities each scaled by a log-uniform factor in
  # [exp(-t), exp(t)], as H&E sections differ between labs; t = 0 = off.
  config.data.stain_jitter = 0.0
  # The probability of drawing a fluorescence training image as an H&E section (nuclei
  # haematoxylin-purple on white or pink; contract.recolour): more nuclei on bright backgrounds.
  config.data.recolour_prob = 0.0
  # 'crop' only: (lo, hi) of a log-uniform random zoom of each crop (nucleus sizes vary several-fold
  # across DSB2018); (1, 1) = native scale only.
  config.data.scale_range = (1.0, 1.0)
  # 'crop' only: size normalisation. Every training window is zoomed so that its image's median
  # nucleus (measured on the labels) is this many pixels across, before the random zoom;
  # inference measures each image's nuclei on a first pass and predicts again at that scale.
  # 0 = off (native scale).
  config.data.nucleus_diameter = 0.0
  # 'crop' only: the probability of centring a training crop where two nuclei touch (on any
  # nucleus where none touch) instead of placing it at random; 0 = every crop at random.
  config.data.touching_crop_prob = 0.0
  # 'crop' only: the largest angle, in degrees, of a random rotation of each crop about its
  # centre (on top of the flips and quarter turns of `augment`); 0 = off.
  config.data.max_rotation = 0.0
  # 'crop' only: the standard deviation, in pixels of the crop, of a random elastic deformation
  # of each crop (smooth displacements drawn on a coarse grid, contract.WARP_GRID); 0 = off.
  config.data.elastic = 0.0
  # Bad examples in the release (undecodable PNG, mask size != image size, masks without an image,
  # an id in two folders): 'error' stops with a message naming the file; 'skip' logs, counts and
  # leaves them out. Applies when TFDS prepares the data (prepared data is cached and reused).
  config.data.on_bad_example = 'error'

  config.model = ml_collections.ConfigDict()
  # 'unetpp' (U-Net++, nested dense skips); the paper's baselines 'unet' (plain skips, same filters)
  # and 'wide_unet' (U-Net with filters scaled to U-Net++'s parameter count). Both have only head L.
  config.model.name = 'unetpp'
  config.model.filters = (32, 64, 128, 256, 512)  # Per encoder level; L = len(filters) - 1 heads.
  config.model.norm = 'batch'  # 'batch' (synchronised across devices), 'group' (per image), 'none'.
  config.model.norm_groups = 8  # 'group': channel groups per layer (1: LayerNorm over H, W, C).
  config.model.dropout_rate = 0.0  # Dropout after each conv; the original Keras code used 0.5.
  config.model.upsample = 'transpose'  # 'transpose' (2x2 stride-2 conv) or 'bilinear'.
  config.model.num_classes = 1  # 1 = binary (sigmoid); >1 = softmax over classes.
  config.model.dtype = 'float32'  # Compute dtype ('float32' or 'bfloat16'); params stay float32.
  # 'standardize' (RGB, per-image standardisation), 'grey_invert' (grey, inverted on bright
  # backgrounds), 'haematoxylin', 'rgb_haematoxylin' (the recipe's) or 'rgb_haematoxylin_clahe':
  # see unetpp_jax/models.py INPUT_NORMS and docs/model.md.
  config.model.input_norm = 'standardize'

  config.loss = ml_collections.ConfigDict()
  config.loss.bce_weight = 1.0  # Weight of (binary) cross-entropy in each head's loss.
  # Weight of soft Dice loss (1 - Dice, per image) in each head's loss.
  config.loss.dice_weight = 1.0
  # Heads (1..L, head j sits on node X(0,j)) whose losses are summed: (1, 2, 3, 4) is full deep
  # supervision, (4,) is none.
  config.loss.deep_supervision_heads = (1, 2, 3, 4)
  config.loss.head_weights = ()  # One weight per supervised head; () = equal weights (sum to 1).
  # num_classes=3: nucleus pixels within this many pixels of another nucleus join the boundary
  # class (the contact band that separates touching nuclei); 0 = only the 1-pixel rim.
  config.loss.contact_width = 0
  # Softmax only: cross-entropy weight per class (background, nucleus[, boundary]); () = all 1.
  config.loss.class_weights = ()
  # num_classes=3: extra cross-entropy factor of the contact band's pixels (on top of
  # class_weights); 1 = none.
  config.loss.contact_weight = 1.0
  # Weight of the Lovasz-softmax loss (a convex surrogate of 1 - IoU per class, per image) added
  # to each head's loss; 0 = none.
  config.loss.lovasz_weight = 0.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'  # 'adam', 'adamw' or 'sgd' (with momentum).
  config.optimizer.learning_rate = 3e-4  # Peak learning rate (the paper's Adam rate).
  config.optimizer.schedule = 'constant'  # 'constant' or 'cosine' (decays to 0 at the last step).
  config.optimizer.warmup_steps = 0  # Linear warmup from 0 to the peak rate.
  config.optimizer.momentum = 0.9  # SGD momentum.
  # Weight decay: decoupled with adamw; with sgd added to the gradient (L2) before the momentum.
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0  # Clip gradients to this global norm; 0 = off.
  # Validation and inference use a moving average of the weights and BatchNorm statistics with
  # this decay (0.998 spans about the last 500 steps); 0 = the weights themselves.
  config.optimizer.ema_decay = 0.0

  config.predict = ml_collections.ConfigDict()
  # 'accurate': mean probability of the supervised heads; 'fast': one head, pruned network.
  config.predict.mode = 'accurate'
  config.predict.head = 4  # Head used by 'fast' mode.

  config.batch_size = 16  # Global batch (all devices of all hosts); divisible by device count.
  config.eval_batch_size = 32  # Global validation batch.
  config.num_train_steps = 20_000  # About 600 epochs of the 532 training images at batch 16.
  config.log_every_steps = 50  # Train metrics / progress.
  config.eval_every_steps = 1000  # Validation on the whole validation split.
  config.checkpoint_every_steps = 1000  # Orbax save interval (the final step is always saved).
  # Also checkpoint at the first log step after this many minutes since the last checkpoint (process
  # 0's clock, agreed by all processes), so a kill loses minutes on any hardware; 0 = off. The first
  # such checkpoint of a run also evaluates, so a validation number appears within this interval.
  config.checkpoint_every_minutes = 10.0
  config.keep_checkpoints = 3  # Keep the newest K checkpoints.
  # Non-finite loss or gradients: 'halt' stops with an error naming the step (checked at log, eval
  # and checkpoint steps; a bad state is never saved); 'skip' drops that update and counts it
  # (train/skipped_updates).
  config.nonfinite_policy = 'halt'
  return config

"""unetpp_jax: U-Net++ for nucleus segmentation (DSB2018) in JAX/Flax."""

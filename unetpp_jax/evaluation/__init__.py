"""Evaluation as the DSB2018 leaderboard does it, from a training workdir.

  predict          checkpoint parameters -> native-size probabilities (resize / pad / tile)
  instances        probabilities -> labelled nuclei
  official_metric  the DSB2018 score (mean average precision over IoU thresholds)
  rle              Kaggle's run-length encoding and submission/solution CSVs
  evaluate         the whole evaluation and its output folder (CLI: `python -m unetpp_jax.evaluate`)
  segment          the same prediction on one's own images: label images, overlays, measurements
                   (CLI: `python -m unetpp_jax.segment`)
"""

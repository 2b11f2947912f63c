"""Synthetic nuclei (unetpp_jax.data.builders.synthetic_nuclei) written as a DSB2018 release zip."""

import io
import os
import zipfile

import numpy as np
from PIL import Image

from unetpp_jax.data.builders import synthetic_nuclei


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def write_zip(path: str | os.PathLike[str], indices, without_masks=(),
              prefix: str = 'stage1_train/') -> str | os.PathLike[str]:
  """A stage1_train-like zip of synthetic examples: <prefix><id>/images/<id>.png and
  <prefix><id>/masks/<k>.png (the corrected labels' archive has a two-level prefix)."""
  with zipfile.ZipFile(path, 'w') as zf:
    for index in indices:
      example = synthetic_nuclei.generate_example(index)
      image_id = example['id']
      zf.writestr(f'{prefix}{image_id}/images/{image_id}.png', png(example['image']))
      if index in without_masks:
        continue
      for k in range(1, int(example['label'].max()) + 1):
        mask = (example['label'] == k).astype(np.uint8) * 255
        zf.writestr(f'{prefix}{image_id}/masks/{k:03d}.png', png(mask))
  return path

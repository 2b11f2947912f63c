"""Does `segment` find the same nuclei in a 16-bit copy of an image as in the 8-bit original?

Microscopes write 16-bit TIFFs; `segment` maps such images to 8 bits per image by percentiles
(docs/segment.md), while the model trained on DSB2018's 8-bit PNGs. This script writes each
fluorescence validation image of a workdir twice, as its 8-bit PNG and as a 16-bit TIFF whose
values are OFFSET + GAIN x the 8-bit ones (a camera offset and a 12-bit range), segments both
folders with the workdir's model and scores both against the labels (official DSB2018 score per
kind of image). Run from the repository root:

  .venv/bin/python scripts/bit_depth_check.py --workdir=workdirs/dsb_cpu \
      --data=../shared/data/dsb2018/stage1_train.zip --per_kind=24 --output=/tmp/bit_depth
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from unetpp_jax.data import release, splits
from unetpp_jax.evaluation import official_metric, segment

OFFSET, GAIN = 100, 12  # 100 + 12 x 255 = 3160: a 12-bit camera's range above its offset.
KINDS = ('fluorescence_sparse', 'fluorescence_crowded')


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True,
                      help='Its validation images (validation_ids.json; without it, every image).')
  parser.add_argument('--data', required=True, help='The Kaggle-layout release (zip or folder).')
  parser.add_argument('--per_kind', type=int, default=24, help='Images of each kind, at most.')
  parser.add_argument('--output', required=True)
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output)
  ids_file = pathlib.Path(args.workdir) / 'validation_ids.json'
  ids = json.loads(ids_file.read_text()) if ids_file.exists() else None  # None: every image.

  labels, kinds, counts = {}, {}, dict.fromkeys(KINDS, 0)
  for folder in ('png8', 'tif16'):
    (output / folder).mkdir(parents=True, exist_ok=True)
  for example in release.iter_examples(args.data, ids=ids):
    image, label = example['image'], example['label']
    kind = splits.image_kind(image, label)
    if kind not in counts or counts[kind] >= args.per_kind:
      continue
    counts[kind] += 1
    name = example['id']
    Image.fromarray(image).save(output / 'png8' / f'{name}.png')
    tifffile.imwrite(output / 'tif16' / f'{name}.tif', OFFSET + GAIN * image.astype(np.uint16))
    labels[name], kinds[name] = label, kind

  scores = {}
  for folder in ('png8', 'tif16'):
    segment.segment(args.workdir, [str(output / folder)], output / f'{folder}_nuclei')
    scores[folder] = {}
    for kind in KINDS:
      results = [official_metric.evaluate_image(
          labels[name], tifffile.imread(output / f'{folder}_nuclei' / 'labels' / f'{name}.tif'))
                 for name in labels if kinds[name] == kind]
      if results:
        scores[folder][kind] = round(official_metric.summarize(results)['score'], 4)
  result = {'images': counts, 'offset': OFFSET, 'gain': GAIN, 'official': scores}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()

r"""Scores a Kaggle DSB2018 submission against a solution file with the official metric.

  python -m unetpp_jax.score --submission=SUB.csv --solution=SOL.csv [--output=metrics.json]

Prints one JSON object: score, ap_per_threshold (thresholds 0.50..0.95), ap50, f1_50,
num_images, ... (see `official_metric`). Every image of the solution is scored; one missing from
the submission counts with all its true objects as false negatives (and is listed under
`missing_from_submission`). A submission image that is not in the solution is an error, as are
malformed or out-of-range RLEs and overlapping masks (see `rle`). Such a user error (and a file
that cannot be read or written) is one line on stderr, `error: ...`, and exit code 1; --verbose
shows the traceback.
"""

import json

from absl import app, flags

from unetpp_jax import atomic, cli
from unetpp_jax.evaluation import official_metric  # numpy only: no jax, no TensorFlow.

FLAGS = flags.FLAGS
flags.DEFINE_string('submission', None, 'Submission CSV: ImageId,EncodedPixels.')
flags.DEFINE_string('solution', None, 'Solution CSV: ImageId,EncodedPixels,Height,Width[,Usage].')
flags.DEFINE_string('output', None, 'Optional path of a JSON file to write the metrics to.')
flags.mark_flags_as_required(['submission', 'solution'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    result = official_metric.score_files(FLAGS.submission, FLAGS.solution)
    text = json.dumps(result, indent=2)
    if FLAGS.output:
      atomic.write_atomically(FLAGS.output, text + '\n')  # Never a half-written metrics file.
  except (OSError, ValueError) as e:  # Unreadable or invalid CSVs, an unwritable --output.
    raise cli.UserError(str(e)) from e
  print(text)


if __name__ == '__main__':
  cli.run(main)

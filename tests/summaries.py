"""Reading what a run wrote to TensorBoard, for tests."""

import pathlib

import tensorflow as tf


def scalars(workdir: pathlib.Path, tag: str) -> dict[int, float]:
  """{step: value} of a scalar in all TensorBoard event files of `workdir` (all runs).

  A step logged by two runs (one SIGKILLed after logging it) must have the same value in both.
  """
  values = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    try:
      for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
          if value.tag == tag:
            number = float(tf.make_ndarray(value.tensor))
            assert values.setdefault(event.step, number) == number, (tag, event.step)
    except tf.errors.DataLossError:  # The last record of a killed process may be cut short.
      pass
  return values

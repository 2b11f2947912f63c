"""Input sources, chosen by name: config.data.source is 'NAME' or 'NAME:ARGUMENT'.

  contract      what every source returns (`Input`) and what they share (schedule, layout, .npz)
  tfds_source   'tfds': tf.data over the TFDS builders in `builders` (needs tensorflow)
  numpy_source  'npz:PATH': numpy only, over an .npz written by `python -m unetpp_jax.export_npz`
  release_source 'release:PATH': numpy only, the Kaggle-layout zip/folder read directly (crops)
  builders      the TFDS builders 'dsb2018' and 'synthetic_nuclei'
  release       the reader of the Kaggle-layout release (folders or zip; PIL only)
  background    `BackgroundInput`: a source's batches put on the devices ahead of the step

A source module is imported only when it is used, so the numpy source never imports tensorflow.
"""

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Source:
  module: str  # Provides create_input(config, *, start_step, process_index, process_count).
  argument: str | None = None  # What follows 'NAME:' (None: the source takes no argument).

  def spelling(self, name: str) -> str:
    return name if self.argument is None else f'{name}:{self.argument}'


SOURCES = {
    'tfds': Source('unetpp_jax.data.tfds_source'),
    'npz': Source('unetpp_jax.data.numpy_source', argument='PATH'),
    'release': Source('unetpp_jax.data.release_source', argument='PATH'),
}


def source_error(source: str) -> str | None:
  """Why `source` names no registered source correctly, or None if it does."""
  name, sep, argument = source.partition(':')
  entry = SOURCES.get(name)
  if entry is not None and (bool(argument) if entry.argument else not sep):
    return None
  spellings = ' or '.join(repr(entry.spelling(n)) for n, entry in SOURCES.items())
  return f'config.data.source={source!r} must be {spellings}.'


def source_argument(config: Any, name: str) -> str:
  """The ARGUMENT of config.data.source = 'NAME:ARGUMENT', asked by the source `name` itself."""
  source, prefix = config.data.source, f'{name}:'
  if not source.startswith(prefix) or not source[len(prefix):]:
    raise ValueError(f'config.data.source={source!r}: the {name} source needs '
                     f'{SOURCES[name].spelling(name)!r}.')
  return source[len(prefix):]


def create_input(config: Any, start_step: int = 0, **kwargs: Any) -> Any:
  """The `contract.Input` of the source named by config.data.source, from `start_step` on."""
  error = source_error(config.data.source)
  if error:
    raise ValueError(error)
  module = importlib.import_module(SOURCES[config.data.source.partition(':')[0]].module)
  return module.create_input(config, start_step=start_step, **kwargs)

"""Atomic file writes: a kill or an error mid-write never leaves a truncated file under its name.

Standard library and etils only, so that every layer (data, evaluation, training, the numpy-only
`score` command) can use it.
"""

import os
import pathlib
from collections.abc import Callable

from etils import epath


def write_via(path: epath.PathLike, write: Callable[[pathlib.PurePath], object]) -> None:
  """Calls `write(temporary path)` beside `path`, then renames the result to `path`.

  The temporary name is unique per process, so concurrent writers never share one; it is removed
  if `write` fails.
  """
  if not isinstance(path, pathlib.PurePath):  # A str: local, or gs:// through etils.
    path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  try:
    write(tmp)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_atomically(path: epath.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  write_via(path, lambda tmp: tmp.write_text(text))

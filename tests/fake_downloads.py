"""Downloads for tests, served from local files or failing at once (nothing here reaches the net).

`serve(monkeypatch, {url: path})` replaces only TFDS's HTTP fetch (`downloader._open_url`), so the
rest of TFDS's download path runs for real: its `<downloads>/<dataset>/<name>.tmp.<uuid>/` folder,
the size/sha256 check of `url_infos`, and the cached file the builder then reads. URLs without a
file fail with ConnectionError, as offline (where TFDS would retry for minutes).
"""

import contextlib
import os
import pathlib
import types

from tensorflow_datasets.core.download import downloader


def serve(monkeypatch, files: dict[str, str | os.PathLike[str]] | None = None) -> list[str]:
  """Serves `files` (url -> local file) to TFDS downloads. Returns the URLs asked for, in order."""
  files = dict(files or {})
  tried = []

  @contextlib.contextmanager
  def open_url(url, **unused_kwargs):
    tried.append(url)
    if url not in files:
      raise ConnectionError(f'offline: {url}')
    data = pathlib.Path(files[url]).read_bytes()
    # As GitHub names its archives (the URL's own basename would be master.zip).
    name = pathlib.Path(files[url]).name
    response = types.SimpleNamespace(url=url, headers={
        'Content-length': str(len(data)), 'content-disposition': f'attachment; filename={name}'})
    yield response, iter([data[:len(data) // 2], data[len(data) // 2:]])

  # Looked up when each download runs, so patching the module attribute is enough.
  monkeypatch.setattr(downloader, '_open_url', open_url)
  return tried

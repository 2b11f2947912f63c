"""What every command line of the project shares: quiet start-up and one-line user errors.

A CLI calls `cli.quiet_native_logs()` before its first `import jax`,
`cli.import_tensorflow_quietly()` before anything imports tensorflow (where it needs it), and
`cli.run(main)` instead of `absl.app.run(main)`. A user error (a config file that does not exist, a
value that cannot be parsed, an invalid config, missing or damaged data, ...) is then printed as one
line, `error: <what, where, how to fix>`, with exit code 1 and no traceback; `--verbose` shows the
traceback (and the libraries' INFO lines). Errors of other kinds (bugs) keep their traceback. A
mistyped config key (`--config.model.filtres=3`), which ml_collections rejects while the flags are
parsed, before `main` runs, is reported the same way, with the nearest valid keys.
"""

import difflib
import importlib.util
import logging as std_logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

flags.DEFINE_bool('verbose', False,
                  'On an error, print the full traceback, not only the one-line message; also '
                  'show the INFO lines of Orbax, TFDS and JAX that are filtered out by default.')

EXIT_USER_ERROR = 1

# Exceptions whose message is written for the user (this project raises these, with the remedy,
# for bad flags, configs and data). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError)

# Python loggers that print start-up chatter at INFO level through absl's handler.
_QUIET_LOGGERS = (
    'jax._src.xla_bridge',  # "Unable to initialize backend 'tpu'", platform probing.
    'jax._src.distributed',
)


class UserError(Exception):
  """A mistake the user can fix; its message says what, where and how to fix it."""


# C++ INFO lines ("I1128 16:47:12.382881 ..." or "I0000 00:00:...") and what follows them.
_NATIVE_NOTICE = re.compile(
    r'^(I\d{4} \d\d:\d\d:|WARNING: All log messages before absl::InitializeLog\(\)|'
    r'To enable the following instructions:)')


def quiet_native_logs() -> None:
  """Hides the C++ INFO lines of XLA (and TensorFlow's, where it still reads this); call before
  importing jax. A value the user set is kept."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow, if installed, without its C++ start-up notices.

  Loading TensorFlow prints, twice (once per native library), absl's "All log messages before
  absl::InitializeLog() is called ..." banner and INFO lines ("oneDNN custom operations are on",
  the CPU-feature notice); TF_CPP_MIN_LOG_LEVEL no longer hides them, as TensorFlow logs through
  absl. So stderr is captured during the import and everything except those INFO lines is
  passed on: warnings and errors still print. Later imports of TensorFlow are then free.
  """
  if 'tensorflow' in sys.modules or importlib.util.find_spec('tensorflow') is None:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors='replace').splitlines()
      sys.stderr.writelines(line + '\n' for line in lines if not _NATIVE_NOTICE.match(line))
      sys.stderr.flush()


class _DropLibraryInfo(std_logging.Filter):
  """Drops the INFO lines Orbax and TFDS log through absl (option dumps, per-save and per-read
  chatter); their warnings and errors pass. TFDS still prints its own preparation progress."""

  _PACKAGES = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorflow_datasets{os.sep}')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(p in record.pathname for p in self._PACKAGES)


def quiet_library_logs() -> None:
  """Keeps this project's progress lines and every warning; drops libraries' INFO chatter."""
  for name in _QUIET_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def one_line(error: BaseException) -> str:
  """The message printed for a user error: its text (or its type, when it has none)."""
  return f'error: {str(error).strip() or type(error).__name__}'


def loaded_config(name: str = 'config') -> Any:
  """The config of a `config_flags.DEFINE_config_file` flag, or a UserError naming the file.

  ml_collections defers a config file's load error to the first use of the config and then
  raises it chained under a generic one ("Failed loading config file config_config").
  """
  flag = flags.FLAGS[name]
  config = flag.value
  try:
    config.to_dict  # pylint: disable=pointless-statement
  except OSError as e:
    path = config_flags.get_config_filename(flag)
    file = path.split(':', 1)[0]
    if not os.path.isfile(file):
      examples = ', '.join(sorted(str(p) for p in pathlib.Path('configs').glob('[!_]*.py')))
      hint = f' Configs here: {examples}.' if examples else ''
      raise UserError(f'--{name}={path}: no such file {os.path.abspath(file)}.{hint}') from e
    cause = e.__cause__ or e
    raise UserError(f'--{name}={path} could not be loaded: '
                    f'{str(cause).strip().splitlines()[-1].strip()}') from e
  return config


def _config_keys(config: Any, prefix: str = '') -> list[str]:
  """Every key of a ConfigDict, nested ones dotted (`model`, `model.filters`, ...)."""
  keys = []
  for key in config.keys():
    path = f'{prefix}{key}'
    keys.append(path)
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      keys.extend(_config_keys(value, f'{path}.'))
  return keys


def _flag_argument(argv: list[str], name: str) -> str | None:
  """The value given to --name in argv (`--name=V` or `--name V`; the last one wins)."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if re.fullmatch(rf'--?{re.escape(name)}=.*', arg):
      value = arg.split('=', 1)[1]
    elif re.fullmatch(rf'--?{re.escape(name)}', arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _nearest(key: str, keys: list[str]) -> list[str]:
  """The keys closest to `key` (difflib's ratio at least 0.6), without those far behind the best."""
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  ratio = lambda k: difflib.SequenceMatcher(None, key, k).ratio()
  return [k for k in close if ratio(k) >= ratio(close[0]) - 0.1]


def unknown_config_key(argv: list[str]) -> str | None:
  """The message for the first `--<config flag>.key` of argv that names no field of its config,
  with the nearest valid keys; None when every override names a field (or a config cannot be
  loaded: its own error then says why)."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not config_flags_lib.is_config_flag(flag):
      continue
    overrides = [arg.split('=', 1)[0].split('.', 1)[1] for arg in argv[1:]
                 if re.match(rf'--?(no)?{re.escape(name)}\.', arg)]
    if not overrides:
      continue
    path = _flag_argument(argv, name)
    try:
      config = flag.parser.parse(path) if path is not None else flag.default
      keys = _config_keys(config)
    except Exception:  # pylint: disable=broad-except
      continue
    for override in overrides:
      node, parts = config, override.split('.')
      for depth, part in enumerate(parts):
        if not isinstance(node, config_dict.ConfigDict):
          if hasattr(node, part):
            break  # An attribute of an object value (a dataclass): not a key problem.
          parent = '.'.join(parts[:depth])
          return (f'--{name}.{override}: {name}.{parent} is a {type(node).__name__}, not a group '
                  f'of keys; set it whole, e.g. --{name}.{parent}={_example(node)}')
        if part in node:
          node = node[part]
          continue
        missing = '.'.join(parts[:depth + 1])
        close = _nearest(override, keys)
        if close:
          hint = 'did you mean ' + ' or '.join(f'--{name}.{k}' for k in close) + '?'
        else:
          level = '.'.join(parts[:depth])
          hint = (f'the keys of {name}{"." + level if level else ""} are '
                  f'{", ".join(sorted(node.keys()))}.')
        return f'--{name}.{override}: {name} has no key {missing}; {hint}'
  return None


def _example(value: Any) -> str:
  """A value as it is written on the command line (tuples without spaces, quoted)."""
  if isinstance(value, (tuple, list)):
    return "'(" + ','.join(str(v) for v in value) + ")'"
  return repr(value)


def _verbose_in(argv: list[str]) -> bool:
  """Whether argv asks for --verbose (flags are not parsed yet when parsing them fails)."""
  verbose = False
  for arg in argv[1:]:
    if re.fullmatch(r'--?verbose(=(true|True|1))?', arg):
      verbose = True
    elif re.fullmatch(r'--?noverbose|--?verbose=(false|False|0)', arg):
      verbose = False
  return verbose


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistyped config key as a one-line user error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError):  # What ml_collections raises for an unknown key.
    message = unknown_config_key(argv)
    if message is None or _verbose_in(argv):
      raise
    sys.stderr.flush()
    print(one_line(UserError(message)) + '  (--verbose shows the traceback)', file=sys.stderr,
          flush=True)
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], Any]) -> None:
  """absl.app.run(main), with user errors as one line on stderr and exit code 1."""

  def wrapped(argv: list[str]) -> Any:
    if not flags.FLAGS.verbose:
      quiet_library_logs()
    try:
      return main(argv)
    except (UserError, *USER_ERRORS) as e:
      if flags.FLAGS.verbose:
        raise
      sys.stderr.flush()
      print(one_line(e) + '  (--verbose shows the traceback)', file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)

  app.run(wrapped, flags_parser=_parse_flags)

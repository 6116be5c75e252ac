"""Flags shared by the launchers: path flags that expand `~`, --help, --verbose, one-line errors.

Launchers run `cli.run(main)`, which adds `--verbose` (passed on to `runtime.configure`: without
it messages are plain lines, with it absl's prefixed log lines and the libraries' details),
answers `--help` / `-h` / `--helpfull` on stdout with exit status 0, and parses with
`parse_flags` (a config override naming no setting, `--config.optimizer.lrr=1`, or a config file
that does not load is one line, not a traceback). File and folder flags come from
`DEFINE_path` / `DEFINE_multi_path`, which expand `~` (the shell leaves it as is in
`--workdir=~/runs`).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags


def _config_error_message(error: BaseException, argv: list[str]) -> str:
  """One line for an error ml_collections raised while parsing `argv`'s config flags."""
  if isinstance(error, SyntaxError):
    return f"cannot load config file {error.filename} (line {error.lineno}: {error.msg})"
  # ml_collections raises KeyError("'key'\nDid you mean ...?") for an override naming no
  # setting, or an AttributeError wrapping that KeyError.
  inner = error
  while isinstance(inner, AttributeError) and inner.args and isinstance(inner.args[0], KeyError):
    inner = inner.args[0]
  if isinstance(inner, KeyError):
    key, _, hint = str(inner.args[0] if inner.args else "").partition("\n")
    key = key.strip("'\"")
    names = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")]
    given = [n for n in names if "." in n and key in n.split(".")[1:]]
    where = given[0] if given else "a config override"
    return f"{where}: the config has no setting {key!r}" + (f"; {hint}" if hint else "")
  return f"{type(error).__name__}: {error}"


class _PathParser(flags.ArgumentParser):
  """Parses a path flag, expanding `~` and `~user` (the shell leaves `--workdir=~/runs` as is)."""

  def parse(self, argument):
    return os.path.expanduser(argument)

  def flag_type(self):
    return "path"


def DEFINE_path(name: str, default: str | None, help: str, **kwargs):  # pylint: disable=invalid-name,redefined-builtin
  """`flags.DEFINE_string` for a file or folder: `--name=~/x` means the home folder's x."""
  flags.disclaim_key_flags()  # the flag belongs to the launcher calling this (its --help)
  return flags.DEFINE(_PathParser(), name, default, help, serializer=flags.ArgumentSerializer(),
                      **kwargs)


def DEFINE_multi_path(name: str, default: list[str] | None, help: str, **kwargs):  # pylint: disable=invalid-name,redefined-builtin
  """`flags.DEFINE_multi_string` whose values are expanded like `DEFINE_path`'s."""
  flags.disclaim_key_flags()
  return flags.DEFINE_multi(_PathParser(), flags.ArgumentSerializer(), name, default, help,
                            **kwargs)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)`: absl's parsing, with config errors in one line.

  absl reports a bad flag value in one line but lets anything else ml_collections raises while
  loading a config file or applying an override reach the user as a traceback (a misspelt
  `--config.optimizer.lrr=1` is an AttributeError); those exit the same way, status 1.
  """
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  asked = [a for a in options if a in ("--help", "-h", "-?", "--helpshort", "--helpfull")]
  if asked:
    app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, SyntaxError, TypeError, ValueError, NameError,
          ImportError) as e:
    sys.stderr.write(f"FATAL Flags parsing error: {_config_error_message(e, argv)}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with `parse_flags` and `--verbose`: every launcher's `__main__` block."""
  if "verbose" not in flags.FLAGS:
    flags.disclaim_key_flags()  # --verbose belongs to the launcher, so its --help lists it
    flags.DEFINE_bool("verbose", False, "Show log details (timestamps, sources) and libraries' "
                      "messages; without it messages are plain lines.")
  app.run(main, flags_parser=parse_flags)


def verbose() -> bool:
  """The value of `--verbose` (after `run` parsed the flags)."""
  return bool(flags.FLAGS["verbose"].value) if "verbose" in flags.FLAGS else False

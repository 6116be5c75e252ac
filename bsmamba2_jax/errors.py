"""The errors raised for bad input anywhere in bsmamba2-jax, each a one-line message.

A message names the file (or setting) and the problem, so a launcher can print it as it is and
exit; nothing from deep inside JAX, Orbax or libsndfile should reach a user as a traceback.
All are ValueErrors: callers that only care about "bad input" catch that.
"""
from __future__ import annotations

import logging
import sys


class CheckpointError(ValueError):
  """A checkpoint or export that cannot be read, or does not fit the model."""


class InputError(ValueError):
  """An input audio file that cannot be separated."""


def one_line(error: BaseException) -> str:
  """`Type: first line of the message` (at most 200 characters of it), for wrapping errors of
  other libraries (Orbax, TensorStore, pickle) into one of ours."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def ignore_abandoned_reads() -> None:
  """Silences what Orbax's abandoned reads print after a failed restore has been reported.

  When one array of a checkpoint cannot be read, Orbax gives up and closes its event loop while
  TensorStore is still reading the others. Their completions then call into the closed loop
  (Python prints each `RuntimeError: Event loop is closed` as an unraisable exception), and the
  reads that failed as well end as tasks whose exception nobody retrieves (asyncio logs "Task
  exception was never retrieved" with a traceback, whenever they are collected, even after the
  one-line error). Called once a restore has failed, this filters exactly those two out, the
  first from `sys.unraisablehook` (keeping the previous hook for everything else), the second
  from the "asyncio" logger, for the process's life.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_UnretrievedFilter())
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


class _UnretrievedFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" records."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)

"""Files written so that no reader ever sees half of one: a temporary name, then a rename.

A crash, a full disk or Ctrl-C leaves the previous file (or none) and no temporary file behind.
`os.replace` is atomic within one file system, which the temporary file shares with its target.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Mapping


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; it replaces `path` when the body ends normally and is
  removed when the body raises (whatever the exception)."""
  tmp = f"{path}.{os.getpid()}.partial"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, content: Mapping[str, Any], **dump_options: Any) -> None:
  """Writes `content` as JSON to `path` atomically (indent 1 unless `dump_options` say)."""
  dump_options.setdefault("indent", 1)
  with replacing(path) as tmp, open(tmp, "w") as f:
    json.dump(content, f, **dump_options)

"""Downloading a file once, completely and verified: resumable HTTP with sha256, atomically.

`fetch(url, path, sha256=..., size=...)` leaves either nothing or the verified file at `path`:
bytes go to `<path>.part` (kept between attempts, so a cut transfer resumes with an HTTP Range
request where the server allows it), are checked against the size and the sha256, and only then
renamed onto `path`. Two processes fetching the same file take turns on a lock of its folder
(`locked`), so they end with one good copy and the second finds it done. Google Drive answers a large file with
an HTML page asking to confirm; its form is followed once. An HTML or empty answer where a
checkpoint should be, a 404, no network or a full disk is a `DownloadError` whose message says
what happened; the caller adds how to place the file by hand.
"""
from __future__ import annotations

import contextlib
import hashlib
import html.parser
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

CHUNK = 1 << 20
TIMEOUT_S = 60
ATTEMPTS = 3  # a transfer cut this many times in one call is left to resume on the next
USER_AGENT = "bsmamba2-jax"


class DownloadError(ValueError):
  """A download that did not give the expected file (one line, the URL in it)."""


def sha256_of(path: str) -> str:
  """The hex sha256 of the file at `path`."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
  """An exclusive flock on the folder `folder` while the body runs (nothing without fcntl): no
  lock file is left behind, and a process that dies releases it."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


class _DriveForm(html.parser.HTMLParser):
  """The action and hidden inputs of Google Drive's "download anyway" form, if the page has one."""

  def __init__(self):
    super().__init__()
    self.action, self.fields, self._in_form = None, {}, False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "form" and "download" in (attrs.get("id", "") + attrs.get("action", "")):
      self.action, self._in_form = attrs.get("action"), True
    elif tag == "input" and self._in_form and attrs.get("name"):
      self.fields[attrs["name"]] = attrs.get("value", "")

  def handle_endtag(self, tag):
    if tag == "form":
      self._in_form = False


def _looks_like_html(head: bytes) -> bool:
  start = head.lstrip()[:15].lower()
  return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _open(url: str, start: int):
  """The response for `url` from byte `start` (a Range request when start > 0)."""
  headers = {"User-Agent": USER_AGENT}
  if start:
    headers["Range"] = f"bytes={start}-"
  try:
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                  timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # nothing left past `start`: the part file is complete
      return None
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise DownloadError(f"{url}: cannot connect ({reason})") from None


def _confirmed(url: str, page: bytes) -> str | None:
  """The URL Google Drive's confirmation page asks to load, or None if `page` is not one."""
  form = _DriveForm()
  form.feed(page.decode("utf-8", "replace"))
  if form.action:
    return f"{urllib.parse.urljoin(url, form.action)}?{urllib.parse.urlencode(form.fields)}"
  return None


def _transfer(url: str, part: str, *, size: int | None, progress: bool,
              desc: str) -> int | None:
  """Appends what `url` holds past the bytes already in `part` (restarting if the server ignores
  the Range request); follows Google Drive's confirmation page once. Returns the whole file's
  size as the server gave it (None where it did not say)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  for _ in range(2):  # the second pass follows a confirmation page
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and start >= size:
      return size
    response = _open(url, start)
    if response is None:
      return size
    with response:
      resumed = start and response.status == 206
      total = response.length
      first = response.read(CHUNK)
      if not first and not resumed:
        raise DownloadError(f"{url}: the server answered with no data")
      if not resumed and _looks_like_html(first):
        page = first + response.read(4 * CHUNK)
        confirmed = _confirmed(url, page)
        if confirmed is None or confirmed == url:
          raise DownloadError(f"{url}: the server answered with a web page, not the file "
                              "(a login or quota page, or the file is not shared)")
        url = confirmed
        continue
      expected = size or ((total or 0) + (start if resumed else 0)) or None
      with open(part, "ab" if resumed else "wb") as out, tqdm(
          total=expected, initial=start if resumed else 0, unit="B", unit_scale=True,
          unit_divisor=1024, desc=desc, disable=not progress, leave=False) as bar:
        block = first
        while block:
          out.write(block)
          bar.update(len(block))
          try:
            block = response.read(CHUNK)
          except (http.client.HTTPException, OSError):  # cut: what arrived stays, to resume
            return expected
    return expected
  raise DownloadError(f"{url}: the server kept answering with a confirmation page")


def fetch(url: str, path: str, *, sha256: str | None, size: int | None = None,
          progress: bool = True, desc: str | None = None) -> str:
  """`path`, downloaded from `url` unless it is already there; verified against `size` and
  `sha256` before it gets its name. Where they are not known (None: an entry whose publishers
  give neither), the size the server states is verified instead, and the sha256 found is logged
  so that it can be pinned. A cut transfer is resumed (up to ATTEMPTS times here; what
  arrived stays in `<path>.part` for the next call). Raises DownloadError, `path` untouched.
  The caller holds `locked(folder of path)` when processes may fetch it at once."""
  part = path + ".part"
  if os.path.exists(path):
    return path
  try:
    for attempt in range(ATTEMPTS):
      before = os.path.getsize(part) if os.path.exists(part) else 0
      stated = _transfer(url, part, size=size, progress=progress,
                         desc=desc or os.path.basename(path))
      size = size or stated
      got = os.path.getsize(part) if os.path.exists(part) else 0
      if size is None or got >= size or got == before or attempt == ATTEMPTS - 1:
        break
    if size is not None and got != size:
      if got > size:  # more than the file has: a wrong file; the next attempt starts afresh
        os.remove(part)
      raise DownloadError(f"{url}: got {got:,} bytes, expected {size:,}"
                          + (" (the transfer was cut; run again to resume it)" if got < size
                             else ""))
    digest = sha256_of(part)
    if sha256 is None:
      logging.warning("%s: no sha256 is published for this file; the one received (%s bytes) has "
                      "sha256 %s", url, f"{got:,}", digest)
    elif digest != sha256:
      os.remove(part)
      raise DownloadError(f"{url}: sha256 {digest} does not match the expected {sha256}")
    os.replace(part, path)
  except OSError as e:  # a full disk, no permission
    with contextlib.suppress(OSError):
      os.remove(part)
    raise DownloadError(f"{url}: cannot write {part} ({e.strerror or e})") from None
  return path

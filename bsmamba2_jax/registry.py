"""Named pretrained models: fetched once, verified, converted once, then used offline.

The registry is `models.toml` beside this file, one `[models.NAME]` table per model (url,
sha256, size, license, source, notes; `manual`: a page to download it by hand; hop_length,
audio_channels, use_ema: what the converter needs to know), plus the file that
`BSMAMBA2_REGISTRY` names, whose tables add or replace entries. `BSMAMBA2_HOME` (default
`~/.cache/bsmamba2_jax`) holds

  downloads/<name>/<file>   the published file, verified (sha256, size) before it gets its name
  models/<name>/            its conversion to an inference export (`exports`), made once

`pretrained(name)` returns the export, fetching and converting it first when it is not cached;
once cached it makes no request at all. A failure names the model, the URL, what happened and how
to place the file by hand, and leaves nothing in the cache but a resumable partial download.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
import urllib.parse
from typing import Mapping

from bsmamba2_jax import download, exports
from bsmamba2_jax.errors import CheckpointError

REGISTRY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.toml")
DEFAULT_MODEL = "bsmamba2-vocals"


class RegistryError(ValueError):
  """An unknown model, a registry file that cannot be read, or a model that cannot be fetched."""


@dataclasses.dataclass(frozen=True)
class Model:
  """One registry entry (the fields of a `[models.NAME]` table). `sha256 = ""` and no `size`:
  neither is published; the download is then checked against the size its server states."""
  name: str
  url: str
  sha256: str
  size: int | None = None
  license: str = "not stated"
  source: str = ""
  notes: str = ""
  manual: str = ""
  hop_length: int = 441
  audio_channels: int | None = None
  use_ema: bool = False

  @property
  def file_name(self) -> str:
    """The downloaded file's name: the URL's last path part if it names a file, else NAME.ckpt."""
    base = os.path.basename(urllib.parse.urlparse(self.url).path)
    return base if "." in base else f"{self.name}.ckpt"


def home(environ: Mapping[str, str] = os.environ) -> str:
  """The folder of downloads and converted models: BSMAMBA2_HOME, or ~/.cache/bsmamba2_jax."""
  chosen = environ.get("BSMAMBA2_HOME")
  if chosen:
    return os.path.expanduser(chosen)
  cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "bsmamba2_jax")


def _read(path: str) -> dict[str, Model]:
  """The [models.*] tables of the TOML file at `path`; RegistryError naming it if they are bad."""
  try:
    with open(path, "rb") as f:
      tables = tomllib.load(f).get("models", {})
  except (OSError, tomllib.TOMLDecodeError) as e:
    raise RegistryError(f"{path}: cannot read the model registry ({e})") from None
  known = {f.name for f in dataclasses.fields(Model)} - {"name"}
  models = {}
  for name, table in tables.items():
    unknown = sorted(set(table) - known) if isinstance(table, dict) else []
    missing = [k for k in ("url", "sha256") if k not in table] if isinstance(table, dict) else []
    if not isinstance(table, dict) or unknown or missing:
      raise RegistryError(f"{path}: [models.{name}] " + (
          f"has unknown keys {unknown}" if unknown else f"lacks {', '.join(missing)}"
          if missing else "is not a table"))
    models[name] = Model(name=name, **table)
  return models


def models(environ: Mapping[str, str] = os.environ) -> dict[str, Model]:
  """Every registered model: the shipped registry, then BSMAMBA2_REGISTRY's entries over it."""
  found = _read(REGISTRY_FILE)
  extra = environ.get("BSMAMBA2_REGISTRY")
  if extra:
    found.update(_read(os.path.expanduser(extra)))
  return found


def entry(name: str, environ: Mapping[str, str] = os.environ) -> Model:
  """The registered model `name`; RegistryError listing the names if there is none."""
  found = models(environ)
  if name not in found:
    raise RegistryError(f"unknown model {name!r}; choose from {', '.join(sorted(found))} "
                        "(--list_models), or give --checkpoint=PATH")
  return found[name]


def export_dir(model: Model, environ: Mapping[str, str] = os.environ) -> str:
  return os.path.join(home(environ), "models", model.name)


def download_path(model: Model, environ: Mapping[str, str] = os.environ) -> str:
  return os.path.join(home(environ), "downloads", model.name, model.file_name)


def is_cached(model: Model, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the converted export is there (its config.json is written last)."""
  return os.path.isfile(os.path.join(export_dir(model, environ), exports.CONFIG_FILE))


def pretrained(name: str, *, progress: bool = True,
               environ: Mapping[str, str] = os.environ) -> str:
  """The export of the registered model `name`, fetched, verified and converted first if it is
  not cached. Raises RegistryError in one line (nothing cached but a resumable .part file)."""
  model = entry(name, environ)
  target = export_dir(model, environ)
  if is_cached(model, environ):
    return target
  path = download_path(model, environ)
  folder = os.path.dirname(path)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise RegistryError(f"model {name}: cannot make {folder} ({e.strerror or e}); set "
                        "BSMAMBA2_HOME to a folder you can write") from None
  with download.locked(folder):  # a second process waits, then finds the export made
    if is_cached(model, environ):
      return target
    try:
      download.fetch(model.url, path, sha256=model.sha256 or None, size=model.size,
                     progress=progress, desc=name)
    except download.DownloadError as e:
      raise RegistryError(f"model {name}: {e}; {_by_hand(model, path)}") from None
    if os.path.isdir(target):  # an earlier conversion that never finished
      shutil.rmtree(target, ignore_errors=True)
    channels = {} if model.audio_channels is None else dict(audio_channels=model.audio_channels)
    try:
      exports.convert_checkpoint(path, target, use_ema=model.use_ema,
                                 hop_length=model.hop_length, **channels)
    except (CheckpointError, OSError) as e:
      raise RegistryError(f"model {name}: the downloaded file does not convert ({e})") from None
  return target


def _by_hand(model: Model, path: str) -> str:
  """How to place the file by hand, for an error message."""
  where = model.manual or model.url
  digest = f"sha256 {model.sha256}" if model.sha256 else "no sha256 published"
  return f"to install it by hand, download {where} ({digest}) and put it at {path}, then run again"


def listing(environ: Mapping[str, str] = os.environ) -> str:
  """The registered models as a text table: name, size, cached or not, licence, source, notes."""
  rows = [("name", "size", "cached", "license", "source / notes")]
  for name, model in sorted(models(environ).items()):
    size = f"{model.size / 1e6:.1f} MB" if model.size else "?"
    cached = "yes" if is_cached(model, environ) else "no"
    about = "; ".join(filter(None, [model.source, model.notes]))
    rows.append((name + (" (default)" if name == DEFAULT_MODEL else ""), size, cached,
                 model.license, about))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                   for r in rows)

"""Where separation reads and writes: input discovery and output templates.

Inputs are files, folders (searched recursively through links, each folder once) and globs;
files found in folders or by globs need an audio extension and must not lie in the output folder
(a second run must not separate the first run's stems). Outputs follow a template relative to
the output folder, `{track}/{stem}.{ext}` by default, which must stay inside it.
`is_within` is also the dataset's rule for folders that would be listed as tracks
(`data_pipeline.musdb`), which is why it lives here, beside the inference path.
"""
from __future__ import annotations

import glob
import os
import string
from typing import Sequence

from bsmamba2_jax.errors import InputError

# What folder and glob searches take as audio: libsndfile's formats, then FFmpeg's (PyAV).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                    ".aifc", ".m4a", ".mp4", ".aac", ".webm", ".weba", ".mka", ".wma",
                    ".alac", ".ac3", ".caf")
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
# Output template fields: the input's name without extension, its extension, the name of its
# folder, the stem and the output extension (the first two and the last two as in demucs).
TEMPLATE_FIELDS = ("track", "trackext", "folder", "stem", "ext")


def is_within(path: str, folder: str) -> bool:
  """Whether `path` lies in `folder` or below, links resolved."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def find_inputs(patterns: Sequence[str],
                exclude: str | None = None) -> tuple[list[str], dict[str, str]]:
  """Expands files, folders (recursively) and globs (folders they match are searched too).

  Files found in folders or by globs must have an audio extension and must not lie under
  `exclude` (the output folder: a second run does not separate the first run's stems); a file
  named directly is taken as it is. Returns (sorted paths, each file once however it was
  spelled, and {pattern: problem} for the patterns that matched nothing).
  """
  def excluded(path: str) -> bool:
    return exclude is not None and is_within(path, exclude)

  def searched(path: str) -> list[str]:
    if excluded(path):
      return []
    if os.path.isfile(path):
      return [path] if path.lower().endswith(AUDIO_EXTENSIONS) else []
    matches, visited = [], {os.path.realpath(path)}
    for root, folders, names in os.walk(path, followlinks=True):
      # Not entered: the output folder, and folders seen before (symlink loops, two links).
      kept = []
      for f in folders:
        real = os.path.realpath(os.path.join(root, f))
        if not excluded(os.path.join(root, f)) and real not in visited:
          visited.add(real)
          kept.append(f)
      folders[:] = kept
      matches += [os.path.join(root, name) for name in names
                  if name.lower().endswith(AUDIO_EXTENSIONS)]
    return matches

  found, missing = [], {}
  for pattern in patterns:
    if os.path.isfile(pattern):
      found.append(pattern)
      continue
    extensions = ", ".join(AUDIO_EXTENSIONS)
    if os.path.isdir(pattern):
      matches = searched(pattern)
      if excluded(pattern):
        problem = (f"folder lies inside the output folder {exclude}, whose files are never "
                   "searched for inputs; name the files, or choose another output folder")
      else:
        besides = (" besides the output folder's" if exclude is not None
                   and is_within(exclude, pattern) else "")
        problem = f"folder holds no audio files{besides} ({extensions})"
    else:
      hits = glob.glob(pattern, recursive=True)
      matches = [p for match in hits for p in searched(match)]
      problem = (f"matches no audio files ({extensions})" if hits
                 else "no such file, folder or match")
    if not matches:
      missing[pattern] = f"{pattern}: {problem}"
    found += matches
  unique = {}
  for path in sorted(os.path.normpath(p) for p in found):
    unique.setdefault(os.path.realpath(path), path)
  return sorted(unique.values()), missing


def _path_problem(relative: str) -> str | None:
  """Why `relative` (a template, or one filled in) is not a file path inside the output folder:
  "no file name" (it ends in '/', '.' or '..'), "outside" (absolute, or with '..'), or None."""
  parts = relative.replace("\\", "/").split("/")
  if os.path.isabs(relative) or parts[0] == "" or ".." in parts:
    return "outside"
  return "no file name" if parts[-1] in ("", ".") else None


def output_paths(input_path: str, output_dir: str, template: str, ext: str,
                 stems: Sequence[str]) -> dict[str, str]:
  """The output file of each stem: `output_dir/template` with the `TEMPLATE_FIELDS`.

  Raises InputError when the filled-in template is not a file path inside `output_dir` (an
  empty {trackext} or {folder} at its start would make it absolute, a trailing '/' or '.'
  names no file)."""
  track, trackext = os.path.splitext(os.path.basename(input_path))
  folder = os.path.basename(os.path.dirname(os.path.abspath(input_path)))
  outputs = {}
  for stem in stems:
    try:
      relative = template.format(track=track, trackext=trackext.lstrip("."), folder=folder,
                                 stem=stem, ext=ext)
    except (ValueError, IndexError, KeyError, AttributeError) as e:
      raise InputError(f"{input_path}: output template {template!r} does not apply: {e}") from None
    if _path_problem(relative):
      raise InputError(f"{input_path}: output template {template!r} gives {relative!r}, which "
                       "is not a file inside the output folder (an empty field?)")
    outputs[stem] = os.path.join(output_dir, relative)
  return outputs


def check_template(template: str):
  """Raises ValueError unless `template` uses only `TEMPLATE_FIELDS` and has {stem}."""
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  except ValueError as e:
    raise ValueError(f"bad output template {template!r}: {e}") from None
  unknown = fields - set(TEMPLATE_FIELDS)
  if unknown:
    raise ValueError(f"output template {template!r} uses unknown field(s) {sorted(unknown)}; "
                     f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
  if "stem" not in fields:
    raise ValueError(f"output template {template!r} must contain {{stem}} (one file per stem)")
  try:
    template.format(track="track", trackext="wav", folder="folder", stem="vocals", ext="wav")
  except (ValueError, IndexError, KeyError, AttributeError) as e:
    raise ValueError(f"bad output template {template!r}: {e}") from None
  problem = _path_problem(template)
  if problem == "no file name":
    raise ValueError(f"output template {template!r} must end in a file name")
  if problem:
    raise ValueError(f"output template {template!r} must stay inside the output folder: a "
                     "relative path without '..'")

"""The benchmark report: runs sections, checks the targets, draws plots, writes JSON + markdown.

A section is a module `experiments.benchmarks.<name>` with `run() -> (rows, markdown)`, or
`run(mode) -> (rows, markdown)` when it has sizes per mode ("smoke": microscopic shapes for
tests, "default": fits ~10 minutes on the 2-core CPU, "full": paper sizes, "gpu": the sizes of
one lent accelerator, ~10 minutes on an H100). Mode "gpu" reaches only the sections that list it
in their `MODES`; any other section runs in "default" there (`section_mode`). A section that
raises (or is missing) is recorded with its error and the report goes on.

Files, never overwriting an earlier report of the same day: `<dir>/<date>-<host>[-k].json`
(`sections`: every row with its raw repeats; `section_info`: texts, errors, wall seconds;
`targets`; `complete`), `.md` (the same as tables), both rewritten after every section, and
PNG plots `...-scaling.png`, `...-chunk-sweep.png`, `...-peers.png` when their sections ran.
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import os
import platform
import socket
import time
import traceback
from typing import Any

from experiments.benchmarks import common

MODES = ("smoke", "default", "full", "gpu")

# (name, required ratio, how it is read from the rows); see `targets`.
TARGETS = (("chunked fwd+bwd vs JAX sequential fwd+bwd (8 s time path)", 10.0),
           ("chunked fwd+bwd vs torch per-step loop fwd+bwd (8 s time path)", 50.0),
           ("paper training step, fraction of the fp32 matmul rate", 0.40))


def section_mode(module: Any, mode: str) -> str:
  """The mode `module` runs in under the report's `mode`: "gpu" only where the section lists it
  in its `MODES`, else "default"; every other mode as it is."""
  if mode == "gpu" and "gpu" not in getattr(module, "MODES", ()):
    return "default"
  return mode


def run_section(name: str, mode: str) -> dict:
  """{"rows", "text", "wall_s", "error", "mode"} of one section; errors are caught and
  recorded. `mode`: the mode the section ran in (`section_mode`)."""
  start = time.perf_counter()
  used = mode
  try:
    module = importlib.import_module(f"experiments.benchmarks.{name}")
    used = section_mode(module, mode)
    if "mode" in inspect.signature(module.run).parameters:
      rows, text = module.run(mode=used)
    else:
      rows, text = module.run()
    error = None
  except Exception as e:  # pylint: disable=broad-except  (a failing section must not stop it)
    rows, text = [], ""
    error = dict(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
  return dict(rows=rows, text=text, wall_s=time.perf_counter() - start, error=error, mode=used)


def _find(rows: list[dict], **match: Any) -> dict | None:
  """The first row whose fields equal `match` and that has a time, else None."""
  for row in rows:
    if all(row.get(k) == v for k, v in match.items()) and row.get("median_s"):
      return row
  return None


def targets(sections: dict[str, list[dict]]) -> list[dict]:
  """The issue's targets from the `scan`, `peers` and `limit` rows: measured, required, holds.

  Chunked vs sequential is read at the paper's time-path shape (62 × 801, the `scan` section;
  sequential on a few sequences, scaled) when that ran, else from `peers` (2 of the 62).
  """
  scan, peers, limit = (sections.get(k, []) for k in ("scan", "peers", "limit"))
  peer_chunked, peer_sequential, loop = (
      _find(peers, direction="fwd+bwd", **match) for match in (
          dict(peer="jax", method="chunked"), dict(peer="jax", method="sequential"),
          dict(peer="torch loop")))
  full = dict(path="time 62x801", direction="fwd+bwd")
  chunked, sequential = (_find(scan, method=m, **full) for m in ("chunked", "sequential"))
  if chunked and sequential:
    versus_sequential = sequential["full_s"] / chunked["full_s"]
    where_sequential = f"62 × 801 (sequential on {sequential['batch']}, scaled)"
  else:
    versus_sequential = (peer_sequential["median_s"] / peer_chunked["median_s"]
                         if peer_chunked and peer_sequential else None)
    where_sequential = (f"{peer_chunked['sequences']} of 62 sequences" if peer_chunked
                        else "scan and peers not measured")
  # The paper step as trained with the most steps per call (train.steps_per_execution) measured.
  steps = [r for r in limit if r.get("preset") == "paper" and r.get("what") == "train step"
           and r.get("median_s")]
  train = max(steps, key=lambda r: r.get("steps_per_call", 1), default=None)
  single = _find(limit, preset="paper", what="train step", steps_per_call=1)
  measured = [
      versus_sequential,
      loop["median_s"] / peer_chunked["median_s"] if peer_chunked and loop else None,
      train.get("of_matmul") if train else None]
  where = [
      where_sequential,
      f"{peer_chunked['sequences']} of 62 sequences" if peer_chunked and loop
      else "peers not measured",
      _paper_step_setting(train, single) if train else _why_not(limit)]
  out = []
  for (name, required), value, note in zip(TARGETS, measured, where):
    out.append(dict(target=name, required=required, measured=value,
                    holds=None if value is None else bool(value >= required),
                    margin=None if value is None else value / required, setting=note))
  return out


def _paper_step_setting(train: dict, single: dict | None) -> str:
  """The setting of the paper step's row, with the one-step-per-call figure beside it."""
  setting = f"{train['audio_s']:g} s stereo, batch 1"
  k = train.get("steps_per_call", 1)
  if k > 1:
    setting += f", {k} steps per call"
    if single:
      setting += f" (1 per call: {single['of_matmul']:.3f})"
  return setting


def _why_not(limit: list[dict]) -> str:
  """Why the paper training step has no time: its row's `skipped` reason, or not run."""
  for row in limit:
    if row.get("preset") == "paper" and row.get("what") == "train step" and row.get("skipped"):
      return f"paper train step {row['audio_s']:g} s not run: {row['skipped']}"
  return "limit not measured"


def plot(sections: dict[str, list[dict]], stem: str) -> list[str]:
  """PNG plots of the sections that ran; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  scaling = [r for r in sections.get("scaling", []) if r.get("median_s_62")]
  if scaling:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in scaling):
      for direction, style in (("fwd", "--"), ("fwd+bwd", "-")):
        line = sorted((r for r in scaling if r["method"] == method and r["direction"] == direction
                       and not r["sweep"]), key=lambda r: r["audio_s"])
        if line:
          label = f"{method} {direction}"
          ax_t.plot([r["audio_s"] for r in line], [r["median_s_62"] for r in line], style,
                    marker="o", label=label)
          ax_m.plot([r["audio_s"] for r in line], [r["peak_gb_62"] for r in line], style,
                    marker="o", label=label)
    for ax, ylabel in ((ax_t, "seconds (62 sequences)"), (ax_m, "peak GB (temp + output)")):
      ax.set(xscale="log", yscale="log", xlabel="audio seconds", ylabel=ylabel)
      ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("ssd_scan at the time-path shape vs audio length")
    paths.append(_save(fig, f"{stem}-scaling.png"))
    sweep = [r for r in scaling if r["sweep"]]
    if sweep:
      fig, ax = plt.subplots(figsize=(5.5, 4))
      for direction in ("fwd", "fwd+bwd"):
        line = sorted((r for r in sweep if r["direction"] == direction),
                      key=lambda r: r["chunk_size"])
        ax.plot([r["chunk_size"] for r in line], [r["median_s_62"] for r in line], marker="o",
                label=direction)
      ax.set(xscale="log", xlabel="chunk size Q", ylabel="seconds (62 sequences)",
             title=f"chunked ssd_scan, {sweep[0]['audio_s']:g} s")
      ax.set_xticks([r["chunk_size"] for r in line], [str(r["chunk_size"]) for r in line])
      ax.legend()
      paths.append(_save(fig, f"{stem}-chunk-sweep.png"))
  peers = [r for r in sections.get("peers", []) if r.get("peer") == "jax"
           and (r.get("vs_torch_loop") or r.get("vs_torch_chunked"))]
  if peers:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['method']}\n{r['direction']}" for r in peers]
    for offset, key in ((-0.2, "vs_torch_loop"), (0.2, "vs_torch_chunked")):
      ax.bar([i + offset for i in range(len(peers))], [r.get(key) or 0 for r in peers], 0.4,
             label=key.replace("_", " "))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(peers)), labels, fontsize=8)
    ax.set(yscale="log", ylabel="torch seconds / JAX seconds", title="JAX ssd_scan vs PyTorch")
    ax.legend()
    paths.append(_save(fig, f"{stem}-peers.png"))
  return paths


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def _unused_stem(output_dir: str, name: str) -> str:
  """`output_dir/name`, or `name-2`, `name-3`, ... when a report of that name exists."""
  stem, k = os.path.join(output_dir, name), 1
  while any(os.path.exists(stem + ext) for ext in (".json", ".md")):
    k += 1
    stem = os.path.join(output_dir, f"{name}-{k}")
  return stem


def _write(report: dict, stem: str) -> None:
  """`stem`.json (everything, raw repeats included) and `stem`.md (the tables)."""
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(stem + ".md", "w") as f:
    f.write(markdown(report))


def cpu_description(cpuinfo: str | None = None) -> str:
  """The CPU model and its widest vector extensions, e.g. "AMD EPYC, avx2 fma" or "AMD EPYC,
  avx512f avx512_bf16": CPU timings and the matmul rate differ by that (the same 2-core VM
  type ran a 2048² fp32 matmul at 200 GFLOP/s with AVX-512 and 113 without). Read from
  /proc/cpuinfo (Linux); "" where it cannot be read."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return ""
  fields = dict(line.split(":", 1) for line in cpuinfo.splitlines()[:40] if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set(fields.get("flags", "").split())
  wanted = ("avx512f", "avx512_bf16", "amx_tile") if "avx512f" in flags else ("avx2", "fma")
  isa = " ".join(f for f in wanted if f in flags)
  return ", ".join(filter(None, [fields.get("model name", ""), isa]))


def markdown(report: dict) -> str:
  """The whole report as markdown: header, targets, then every section (or its error)."""
  device, kind = report["devices"][0], report.get("device_kind")
  if kind and not device.startswith(kind):  # "cuda:0 NVIDIA H200", but not "cpu:0 cpu"
    device = f"{device} {kind}"
  machine = ", ".join(filter(None, [report["machine"], report.get("cpu")]))
  lines = [f"# Benchmark {report['date']} on {report['host']} ({machine}, "
           f"{report['cpu_count']} CPUs, jax {report['jax']}, {device}), "
           f"mode `{report['mode']}`" + ("" if report["complete"] else " (incomplete)"), "",
           f"XLA_FLAGS: `{report.get('xla_flags') or '(none)'}`, GLIBC_TUNABLES: "
           f"`{report.get('glibc_tunables') or '(none)'}`", "", "## Targets", "",
           common.format_table(report["targets"], ["target", "required", "measured", "holds",
                                                   "margin", "setting"])]
  for name, section in report["section_info"].items():
    used = section.get("mode", report["mode"])
    lines += ["", f"## {name} ({section['wall_s']:.0f} s"
              + ("" if used == report["mode"] else f", mode `{used}`") + ")", ""]
    if section["error"]:
      lines.append(f"**failed**: `{section['error']['message']}` (traceback in the JSON)")
    else:
      lines.append(section["text"])
  return "\n".join(lines) + "\n"


def build(sections: list[str], mode: str, output_dir: str, *, verbose: bool = True) -> dict:
  """Runs `sections` in `mode`, writes JSON/markdown/PNGs to `output_dir`; returns the report."""
  import jax

  if mode not in MODES:
    raise ValueError(f"benchmark: unknown mode {mode!r}; choose from {MODES}")
  report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                host=socket.gethostname(), machine=platform.processor() or platform.machine(),
                cpu=cpu_description(),
                cpu_count=os.cpu_count(), jax=jax.__version__,
                devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), mode=mode, sections={},
                section_info={}, targets=targets({}), plots=[], complete=False)
  os.makedirs(output_dir, exist_ok=True)
  stem = _unused_stem(output_dir, f"{datetime.date.today().isoformat()}-{report['host']}")
  _write(report, stem)  # claims the name; rewritten after every section, so a crash keeps rows
  for name in sections:
    result = run_section(name, mode)
    report["sections"][name] = result.pop("rows")
    report["section_info"][name] = result
    if verbose:
      body = result["text"] if not result["error"] else f"failed: {result['error']['message']}"
      print(f"\n## {name} ({result['wall_s']:.0f} s)\n\n{body}", flush=True)
    report["targets"] = targets(report["sections"])
    _write(report, stem)
  report["plots"] = plot(report["sections"], stem)
  report["complete"] = True
  _write(report, stem)
  if verbose:
    print("\n## Targets\n\n" + common.format_table(
        report["targets"], ["target", "required", "measured", "holds", "margin", "setting"]))
    print(f"\nwrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in report["plots"]))
  report["stem"] = stem
  return report

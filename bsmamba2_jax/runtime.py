"""Process-wide settings for programs: `configure()`, the first line of every launcher's `main`.

Importing bsmamba2_jax changes nothing in the process. A program (each `python -m
experiments.<launcher>`, or your own script) opts in to these settings by calling `configure()`
before it runs any JAX computation:

1. XLA:CPU flags. Under jaxlib 0.10 `--xla_cpu_experimental_ynn_fusion_type=` is added to
   `XLA_FLAGS`: that release routes reductions, elementwise ops and small dots through YNNPACK
   fusions that run this model's scan and training step markedly slower on CPU
   (docs/performance.md). Programs that only run the model forward (`inference=True`:
   separation, evaluation, the web page) get `=individual_dot` instead: standalone dots still
   go to YNNPACK, whose bf16 × bf16 → float32 dot runs at twice the rate of XLA's own on a CPU
   with bf16 dot units (the "mixed" precision's matmuls), and fusions stay off. A value you set
   in `XLA_FLAGS` yourself wins. XLA reads the variable
   when JAX starts its backend, so `configure()` refuses to run after that.
2. The persistent compilation cache (`compilation_cache=True`): compiled programs are kept in
   `$XDG_CACHE_HOME/bsmamba2_jax/xla` (`~/.cache/...`), so a resumed or repeated run does not
   compile its steps again. `BSMAMBA2_COMPILATION_CACHE=<folder>` moves it, `=0` turns it off,
   and JAX's own `JAX_COMPILATION_CACHE_DIR` wins over both. Benchmarks leave it off: their rows
   time compilation.
3. stdout prints file names that are not UTF-8 (kept by Python as surrogates) as their bytes,
   as Python does in the C locale, instead of failing on them.
4. Messages (`verbose=False`): log records print as plain lines ("warning: ...", "error: ...",
   information as it is), without absl's timestamp, thread id and file:line, and the libraries'
   own information below warnings (Orbax's, say) is left out. `verbose=True` keeps absl's
   prefixed lines with everything.

Not done here, because glibc reads it only when a process starts: malloc on transparent huge
pages. XLA:CPU maps fresh buffers for every call and with 4-KiB pages the kernel faults each
page in; large CPU steps then spend much of their time in the kernel. Opt in by starting the
program with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, transparent huge pages
"madvise" or "always"); docs/performance.md has what it buys.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from typing import Mapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


# YNNPACK's share under jaxlib 0.10: nothing for training, standalone dots for inference.
YNN_TRAINING, YNN_INFERENCE = "", "individual_dot"


def xla_flags(flags: str, jaxlib_version: str | None, inference: bool = False) -> str:
  """`flags` (the current XLA_FLAGS) with YNNPACK fusions turned off under jaxlib 0.10 (but for
  standalone dots with `inference`), unless the flag is already there (the user's choice)."""
  if YNN_FLAG in flags or not (jaxlib_version or "").startswith("0.10."):
    return flags
  return f"{flags} {YNN_FLAG}={YNN_INFERENCE if inference else YNN_TRAINING}".strip()


# CPU feature flags that mean native bf16 dot products: AVX512_BF16 and AMX on x86 (Linux's
# /proc/cpuinfo names), the BF16 extension on Arm (Linux "bf16", macOS FEAT_BF16).
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> set[str]:
  """The feature flags of a /proc/cpuinfo text (x86 "flags", Arm "Features" lines)."""
  flags: set[str] = set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip().lower() in ("flags", "features"):
      flags.update(value.split())
  return flags


def cpu_has_bf16_dots() -> bool:
  """Whether this machine's CPU has native bf16 dot instructions (False when it cannot tell)."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      return bool(cpu_flags(f.read()) & BF16_DOT_FLAGS)
  except OSError:
    pass
  if sys.platform == "darwin":
    import subprocess  # pylint: disable=g-import-not-at-top
    try:
      out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                           text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
      return False
    return out.strip() == "1"
  return False


def compilation_cache_dir(environ: Mapping[str, str]) -> str | None:
  """The folder of the persistent compilation cache under `environ`, or None to leave JAX's
  setting alone (turned off, or JAX_COMPILATION_CACHE_DIR set)."""
  chosen = environ.get("BSMAMBA2_COMPILATION_CACHE", "")
  if chosen == "0" or environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  if chosen:
    return chosen
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(
      environ.get("HOME") or os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "bsmamba2_jax", "xla")


def _backend_started() -> bool:
  """Whether JAX has started a backend (after which XLA_FLAGS is not read again)."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


class _PlainFormatter(logging.Formatter):
  """A record as a plain line: the message, after "warning: " / "error: " where it is one."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info and not record.exc_text:
      record.exc_text = self.formatException(record.exc_info)
    if record.exc_text:
      message = f"{message}\n{record.exc_text}"
    if record.levelno >= logging.ERROR:
      return f"error: {message}"
    return f"warning: {message}" if record.levelno >= logging.WARNING else message


def _ours_or_important(record: logging.LogRecord) -> bool:
  """Records of this project (the root logger: it logs through `logging.*`) and warnings."""
  return record.name == "root" or record.levelno >= logging.WARNING


def _plain_messages() -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(_PlainFormatter())
  handler.addFilter(_ours_or_important)


def configure(*, compilation_cache: bool = True, verbose: bool = False,
              inference: bool = False) -> None:
  """Makes the settings of this module's docstring for the current process (call it once, first
  in `main`; `inference`: the program runs the model forward only). Raises RuntimeError if JAX
  has already started its backend."""
  if _backend_started():
    raise RuntimeError("runtime.configure() must run before the first JAX computation: XLA "
                       "reads XLA_FLAGS when JAX starts its backend")
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = None
  flags = xla_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_version, inference)
  if flags:
    os.environ["XLA_FLAGS"] = flags
  if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(errors="surrogateescape")
  if not verbose:
    _plain_messages()
  if compilation_cache:
    _use_compilation_cache(compilation_cache_dir(os.environ))


def _use_compilation_cache(folder: str | None) -> None:
  """Points JAX's persistent cache at `folder` if it can be written; says so if not."""
  if folder is None:
    return
  try:
    os.makedirs(folder, exist_ok=True)
    writable = os.access(folder, os.W_OK)
  except OSError:
    writable = False
  if not writable:
    logging.warning("compilation cache off: cannot write %s (set BSMAMBA2_COMPILATION_CACHE to "
                    "another folder, or 0)", folder)
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", folder)

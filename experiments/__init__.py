"""absl launchers, configs and benchmarks of bsmamba2-jax.

Launchers share these settings, made before any of them starts JAX:

- importing `bsmamba2_jax` first sets its XLA:CPU flags (see `bsmamba2_jax._tune_xla_cpu`);
- `python -m experiments.<launcher>` (and the console scripts of `CONSOLE_SCRIPTS`, the same
  programs) restarts itself once with glibc's malloc on transparent
  huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, see `huge_pages_environment`): XLA:CPU
  allocates fresh buffers on every call, and with 4-KiB pages the kernel faults in every page
  each time. On the 2-core VM a 211-MB elementwise op went 89 -> 22 ms, the chunked scan's
  fwd+bwd at 62 x 801 4.8 -> 2.5 s and the paper 1-s training step 26 -> 20 s (runs minutes
  apart). Set BSMAMBA2_HUGE_PAGES=0 to opt out, or set the tunable yourself to use it in your
  own process (glibc reads it when the process starts);
- a launcher's stdout prints file names that are not UTF-8 as their bytes (`errors=
  "surrogateescape"`, as Python does in the C locale) instead of failing on them;
- launchers parse their flags with `parse_flags` (a config override naming no setting,
  `--config.optimizer.lrr=1`, or a config file that does not load is one line, not a
  traceback), and their path flags (`DEFINE_path`, `DEFINE_multi_path`) expand `~`, which the
  shell leaves as is in `--workdir=~/runs`;
- `python -m experiments.<launcher>` (all but `benchmark`, whose rows time compilation) keeps
  compiled programs in JAX's persistent cache (see `compilation_cache_dir`), so a resumed or
  repeated run does not compile them again: the tiny training launch of 3 steps took 56 s cold
  and 26 s warm on the 2-core VM; the paper training step compiles for about 20 s on that CPU
  and about 2 minutes on an H200.
"""
import os
import platform
import sys

from absl import flags

# Flags defined through DEFINE_path belong to the launcher that calls it, so --help lists them.
flags.disclaim_key_flags()

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# pyproject.toml's [project.scripts]: script name -> the launcher module it runs.
CONSOLE_SCRIPTS = {"bsmamba2-separate": "experiments.separate"}


def _launcher(orig_argv) -> str | None:
  """The launcher module `orig_argv` runs: `python -m experiments.<name>` or a console script
  (`python /path/bin/bsmamba2-separate ...`, as its shebang starts it); None for anything else."""
  if "-m" in orig_argv:
    after = orig_argv.index("-m") + 1
    module = orig_argv[after] if after < len(orig_argv) else ""
    return module if module.startswith("experiments.") else None
  script = os.path.basename(orig_argv[1]) if len(orig_argv) > 1 else ""
  return CONSOLE_SCRIPTS.get(script)


def huge_pages_environment(environ, orig_argv, thp_setting, libc):
  """The environment to restart a launcher with, or None to run on as is.

  Args:
    environ: the process environment (mapping).
    orig_argv: `sys.orig_argv`, to tell `python -m experiments.<name>` from anything else.
    thp_setting: contents of THP_SETTING ("always [madvise] never"), "" if unreadable.
    libc: `platform.libc_ver()`, e.g. ("glibc", "2.36"); the tunable exists from glibc 2.35.
  """
  if environ.get("BSMAMBA2_HUGE_PAGES", "1") == "0" or _launcher(orig_argv) is None:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  name, version = libc
  if ("glibc.malloc.hugetlb" in tunables
      or "[never]" in thp_setting or "[" not in thp_setting or name != "glibc"):
    return None
  try:
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE]))}


def _relaunch_with_huge_pages():
  """Replaces this process by the same command under `huge_pages_environment`, if it asks to.

  Runs while `python -m` is still importing this package (sys.argv[0] == "-m") or a console
  script's first import is, so nothing else has started: no JAX, no threads, no output.
  """
  starting = sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0]) in CONSOLE_SCRIPTS
  if not starting or not sys.platform.startswith("linux"):
    return
  try:
    with open(THP_SETTING) as f:
      thp_setting = f.read()
  except OSError:
    thp_setting = ""
  environ = huge_pages_environment(os.environ, sys.orig_argv, thp_setting, platform.libc_ver())
  if environ is not None:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)


_relaunch_with_huge_pages()

# Launchers print paths; a file name that is not UTF-8 (kept by Python as surrogates) is printed
# as its own bytes, as in the C locale, instead of failing under a strict UTF-8 stdout.
if _launcher(getattr(sys, "orig_argv", [])) is not None and hasattr(sys.stdout, "reconfigure"):
  sys.stdout.reconfigure(errors="surrogateescape")


def compilation_cache_dir(environ, orig_argv) -> str | None:
  """The persistent compilation cache a launcher uses, or None to leave JAX's setting alone.

  BSMAMBA2_COMPILATION_CACHE names the folder, or is 0 to turn the cache off; by default
  `$XDG_CACHE_HOME/bsmamba2_jax/xla` (`~/.cache/...`). JAX_COMPILATION_CACHE_DIR, if set, wins;
  `python -m experiments.benchmark` and anything that is not a launcher get None. JAX keys every
  entry by the program, backend, flags and versions; delete the folder to reclaim its space.
  """
  module = _launcher(orig_argv)
  chosen = environ.get("BSMAMBA2_COMPILATION_CACHE", "")
  if (module is None or module.startswith("experiments.benchmark") or chosen == "0"
      or environ.get("JAX_COMPILATION_CACHE_DIR")):
    return None
  if chosen:
    return chosen
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(
      environ.get("HOME") or os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "bsmamba2_jax", "xla")


def _use_compilation_cache():
  """Points JAX at `compilation_cache_dir`, if it applies and the folder can be written."""
  cache = compilation_cache_dir(os.environ, getattr(sys, "orig_argv", []))
  if cache is None:
    return
  try:
    os.makedirs(cache, exist_ok=True)
    writable = os.access(cache, os.W_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"compilation cache off: cannot write {cache} (set BSMAMBA2_COMPILATION_CACHE to "
          "another folder, or 0)", file=sys.stderr)
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", cache)

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
  return flags.DEFINE(_PathParser(), name, default, help, serializer=flags.ArgumentSerializer(),
                      **kwargs)


def DEFINE_multi_path(name: str, default: list[str] | None, help: str, **kwargs):  # pylint: disable=invalid-name,redefined-builtin
  """`flags.DEFINE_multi_string` whose values are expanded like `DEFINE_path`'s."""
  return flags.DEFINE_multi(_PathParser(), flags.ArgumentSerializer(), name, default, help,
                            **kwargs)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)`: absl's parsing, with config errors in one line.

  absl reports a bad flag value in one line but lets anything else ml_collections raises while
  loading a config file or applying an override reach the user as a traceback (a misspelt
  `--config.optimizer.lrr=1` is an AttributeError); those exit the same way, status 1.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, SyntaxError, TypeError, ValueError, NameError,
          ImportError) as e:
    sys.stderr.write(f"FATAL Flags parsing error: {_config_error_message(e, argv)}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


import bsmamba2_jax  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position

_use_compilation_cache()

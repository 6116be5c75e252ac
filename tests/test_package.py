"""Package-level behaviour: what `import bsmamba2_jax` does to the process."""
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import pytest

from experiments import (CONSOLE_SCRIPTS, THP_SETTING, compilation_cache_dir,
                         huge_pages_environment)

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SHOW = "import os, bsmamba2_jax; print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", SHOW], env=env, check=True, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  return out.stdout.strip()


@pytest.mark.skipif(not importlib.metadata.version("jaxlib").startswith("0.10."),
                    reason="the YNNPACK flag is only set under jaxlib 0.10")
def test_import_turns_off_ynn_fusions_and_keeps_other_flags():
  assert _flags_after_import(None) == f"{FLAG}="
  assert _flags_after_import("--xla_force_host_platform_device_count=2") == (
      f"--xla_force_host_platform_device_count=2 {FLAG}=")


def test_import_keeps_a_ynn_setting_the_user_chose():
  assert _flags_after_import(f"{FLAG}=dot") == f"{FLAG}=dot"


LAUNCH = ["python", "-m", "experiments.train", "--workdir=w"]
MADVISE = "always [madvise] never\n"
GLIBC = ("glibc", "2.36")


SCRIPT = ["/venv/bin/python3", "/venv/bin/bsmamba2-separate", "--input=song.wav"]


def test_console_scripts_are_the_launchers_pyproject_names():
  import tomllib
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert {name: target.split(":")[0] for name, target in scripts.items()} == CONSOLE_SCRIPTS


def test_launchers_restart_on_huge_pages_and_keep_other_tunables():
  env = huge_pages_environment({"HOME": "/h"}, LAUNCH, MADVISE, GLIBC)
  assert env == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert huge_pages_environment({"HOME": "/h"}, SCRIPT, MADVISE, GLIBC) == env
  env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, LAUNCH, MADVISE,
                               GLIBC)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, argv, thp, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LAUNCH, MADVISE, GLIBC),  # the user's choice
    ({"BSMAMBA2_HUGE_PAGES": "0"}, LAUNCH, MADVISE, GLIBC),                  # opted out
    ({}, ["python", "-m", "pytest"], MADVISE, GLIBC),                        # not a launcher
    ({}, ["python", "-c", "pass"], MADVISE, GLIBC),
    ({}, ["python", "/venv/bin/other-tool"], MADVISE, GLIBC),
    ({}, ["python", "-m"], MADVISE, GLIBC),
    ({}, LAUNCH, "always madvise [never]\n", GLIBC),                         # THP off
    ({}, LAUNCH, "", GLIBC),                                                 # no THP at all
    ({}, LAUNCH, MADVISE, ("glibc", "2.31")),                                # no such tunable
    ({}, LAUNCH, MADVISE, ("", "")),                                         # musl and others
])
def test_launchers_run_on_unchanged_when_huge_pages_do_not_apply(environ, argv, thp, libc):
  assert huge_pages_environment(environ, argv, thp, libc) is None


def test_a_launcher_really_runs_with_the_tunable(tmp_path):
  """`python -m experiments.benchmark` records the GLIBC_TUNABLES it ran under."""
  try:
    with open(THP_SETTING) as f:
      thp = f.read()
  except OSError:
    pytest.skip("no transparent huge pages on this system")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BSMAMBA2_HUGE_PAGES")}
  subprocess.run([sys.executable, "-m", "experiments.benchmark", "--mode=smoke", "--only=data",
                  f"--output_dir={tmp_path}"], env=env, check=True, capture_output=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  [report] = tmp_path.glob("*.json")
  recorded = json.loads(report.read_text())["glibc_tunables"]
  expected = huge_pages_environment(env, ["python", "-m", "experiments.benchmark"], thp,
                                    platform.libc_ver())
  assert recorded == ("" if expected is None else expected["GLIBC_TUNABLES"])


@pytest.mark.parametrize("environ, argv, expected", [
    ({"HOME": "/h"}, LAUNCH, "/h/.cache/bsmamba2_jax/xla"),
    ({"HOME": "/h", "XDG_CACHE_HOME": "/c"}, LAUNCH, "/c/bsmamba2_jax/xla"),
    ({"BSMAMBA2_COMPILATION_CACHE": "/mine"}, LAUNCH, "/mine"),
    ({"HOME": "/h"}, SCRIPT, "/h/.cache/bsmamba2_jax/xla"),                # console script
    ({"BSMAMBA2_COMPILATION_CACHE": "0"}, LAUNCH, None),                    # opted out
    ({"JAX_COMPILATION_CACHE_DIR": "/jax"}, LAUNCH, None),                  # JAX's own setting
    ({}, ["python", "-m", "experiments.benchmark"], None),                  # times compiles
    ({}, ["python", "-m", "pytest"], None),                                 # not a launcher
    ({}, ["python", "-c", "pass"], None),
])
def test_launchers_keep_compiled_programs_where_asked(environ, argv, expected):
  assert compilation_cache_dir(environ, argv) == expected


def test_a_launcher_runs_on_without_a_writable_cache(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("")  # a file where the folder should go
  env = {**os.environ, "BSMAMBA2_COMPILATION_CACHE": str(blocked / "xla")}
  proc = subprocess.run([sys.executable, "-m", "experiments.separate", "--helpshort"], env=env,
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert "--checkpoint" in proc.stdout + proc.stderr, proc.stderr  # absl printed its help
  assert f"compilation cache off: cannot write {blocked / 'xla'}" in proc.stderr


def _train_launch(tmp_path, *flags, config=None):
  """Runs the training launcher with `config` (default: tiny) and `flags`; returns the finished
  process."""
  repo = os.path.dirname(os.path.dirname(__file__))
  config = config or os.path.join(repo, "experiments", "configs", "tiny.py")
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
       f"--config={config}", *flags], capture_output=True, text=True, timeout=300, cwd=repo)


@pytest.mark.parametrize("flag, expected", [
    ("--config.optimizer.lrr=1", '--config.optimizer.lrr: the config has no setting \'lrr\'; '
                                 'Did you mean "lr" instead of "lrr"?'),
    ("--config.nothere.x=1", "--config.nothere.x: the config has no setting 'nothere'"),
])
def test_a_config_override_naming_no_setting_is_one_line(tmp_path, flag, expected):
  proc = _train_launch(tmp_path, flag)
  assert proc.returncode == 1
  assert f"FATAL Flags parsing error: {expected}\n" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was made


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return {\n")
  proc = _train_launch(tmp_path, config=broken)
  assert proc.returncode == 1
  assert f"FATAL Flags parsing error: cannot load config file {broken} (line 2:" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_path_flags_expand_the_home_folder():
  from absl import flags

  from experiments import DEFINE_multi_path, DEFINE_path
  values = flags.FlagValues()
  DEFINE_path("workdir", "runs", "", flag_values=values)
  DEFINE_multi_path("input", None, "", flag_values=values)
  values(["prog", "--workdir=~/runs", "--input=~/a.wav", "--input", "b/~c.wav"])
  home = os.path.expanduser("~")
  assert values.workdir == os.path.join(home, "runs")
  assert values.input == [os.path.join(home, "a.wav"), "b/~c.wav"]
  values.unparse_flags()
  values(["prog"])
  assert values.workdir == "runs"  # the default, as given


@pytest.mark.parametrize("launcher, names", [
    ("evaluate", ("checkpoint", "data_dir", "output_dir")),
    ("separate", ("input", "checkpoint", "output_dir")),
])
def test_help_lists_each_launchers_path_flags(launcher, names):
  """Flags made by DEFINE_path belong to the launcher, whose --help lists only its own."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{launcher}", "--help"],
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  for name in names:
    assert f"\n  --{name}: " in proc.stdout, proc.stdout

"""What importing the package does to a process (nothing), and the settings programs opt in to
(`runtime.configure`), the launchers' flag helpers and their one-line errors."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from bsmamba2_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("tensorflow", "tensorflow_datasets", "tensorboard", "matplotlib", "torch",
             "data_pipeline")


def _python(code, env=None, timeout=300):
  """Runs `code` in a fresh interpreter at the repository root; returns the finished process."""
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# What the interpreter holds after an import: the environment, JAX's settings, stdout's
# identity and error handler, and the modules loaded. `import jax` itself sets two variables
# (TF_CPP_MIN_LOG_LEVEL, TPU_SKIP_MDS_QUERY): the snapshot is taken after it.
SNAPSHOT = """
import json, os, sys
import jax

def snapshot():
  settings = {k: repr(v) for k, v in jax.config.values.items()}
  return dict(env=dict(os.environ), jax=settings, stdout=[id(sys.stdout), sys.stdout.errors],
              pid=os.getpid())
"""


@pytest.mark.integration
def test_importing_the_inference_api_changes_nothing_and_loads_no_training_stack():
  proc = _python(SNAPSHOT + textwrap.dedent("""
      print("started", flush=True)  # printed twice if the import re-executed the interpreter
      before = snapshot()
      import bsmamba2_jax
      from bsmamba2_jax import BSMamba2, ModelConfig, Separator, load_model, separate_files
      after = snapshot()
      print(json.dumps(dict(same=before == after, before=before, after=after,
                            loaded=sorted(m for m in sys.modules if m.split(".")[0] in
                                          {FORBIDDEN}))))
      """).replace("{FORBIDDEN}", repr(set(FORBIDDEN))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  started, result = proc.stdout.strip().splitlines()
  assert started == "started"
  result = json.loads(result)
  assert result["before"]["env"] == result["after"]["env"]
  assert result["before"]["jax"] == result["after"]["jax"]
  assert result["same"], result
  assert result["loaded"] == []


@pytest.mark.integration
def test_importing_any_module_of_the_package_changes_nothing():
  proc = _python(SNAPSHOT + textwrap.dedent("""
      import importlib, pkgutil
      before = snapshot()
      import bsmamba2_jax
      names = [m.name for m in pkgutil.walk_packages(bsmamba2_jax.__path__, "bsmamba2_jax.")]
      for name in names:
        importlib.import_module(name)
      after = snapshot()
      changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
      print(json.dumps(dict(names=names, changed=changed)))
      """))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "bsmamba2_jax.training.loop" in result["names"] and len(result["names"]) > 20
  assert result["changed"] == {}


@pytest.mark.parametrize("flags, version, expected", [
    ("", "0.10.2", f"{runtime.YNN_FLAG}="),
    ("--xla_force_host_platform_device_count=2", "0.10.2",
     f"--xla_force_host_platform_device_count=2 {runtime.YNN_FLAG}="),
    (f"{runtime.YNN_FLAG}=dot", "0.10.2", f"{runtime.YNN_FLAG}=dot"),  # the user's choice
    ("", "0.12.0", ""),  # jaxlib 0.12 needs nothing
    ("--foo", None, "--foo"),
])
def test_xla_flags_turn_off_ynn_fusions_under_jaxlib_0_10_only(flags, version, expected):
  assert runtime.xla_flags(flags, version) == expected


def test_inference_programs_keep_ynnpack_for_standalone_dots():
  assert runtime.xla_flags("", "0.10.2", inference=True) == f"{runtime.YNN_FLAG}=individual_dot"
  assert runtime.xla_flags(f"{runtime.YNN_FLAG}=", "0.10.2", inference=True) == f"{runtime.YNN_FLAG}="
  assert runtime.xla_flags("", "0.12.0", inference=True) == ""


@pytest.mark.parametrize("environ, expected", [
    ({"HOME": "/h"}, "/h/.cache/bsmamba2_jax/xla"),
    ({"HOME": "/h", "XDG_CACHE_HOME": "/c"}, "/c/bsmamba2_jax/xla"),
    ({"BSMAMBA2_COMPILATION_CACHE": "/mine"}, "/mine"),
    ({"BSMAMBA2_COMPILATION_CACHE": "0"}, None),                    # opted out
    ({"JAX_COMPILATION_CACHE_DIR": "/jax"}, None),                  # JAX's own setting wins
])
def test_the_compilation_cache_goes_where_asked(environ, expected):
  assert runtime.compilation_cache_dir(environ) == expected


@pytest.mark.integration
def test_configure_makes_the_settings_and_refuses_to_come_too_late(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["BSMAMBA2_COMPILATION_CACHE"] = str(tmp_path / "cache")
  proc = _python(textwrap.dedent("""
      import importlib.metadata, os, sys
      import jax
      from bsmamba2_jax import runtime
      runtime.configure(compilation_cache=True)
      print(os.environ.get("XLA_FLAGS", ""), jax.config.jax_compilation_cache_dir,
            sys.stdout.errors, importlib.metadata.version("jaxlib"))
      jax.numpy.zeros(1).block_until_ready()  # the backend starts
      try:
        runtime.configure()
      except RuntimeError as e:
        print(e)
      """), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, second = proc.stdout.strip().splitlines()
  flags, cache, errors, jaxlib = first.split(" ")
  assert flags == runtime.xla_flags("", jaxlib) or (flags == "" and not jaxlib.startswith("0.10"))
  assert cache == str(tmp_path / "cache") and errors == "surrogateescape"
  assert second.startswith("runtime.configure() must run before the first JAX computation")


@pytest.mark.integration
def test_launchers_restart_nothing_huge_pages_are_opt_in(tmp_path):
  """`python -m experiments.benchmark` records the GLIBC_TUNABLES and XLA_FLAGS it ran under:
  the environment as given (no restart with other settings), plus the XLA:CPU flag."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "BSMAMBA2_HUGE_PAGES", "XLA_FLAGS")}
  for tunables in (None, "glibc.malloc.hugetlb=1"):
    run_env = dict(env, **({"GLIBC_TUNABLES": tunables} if tunables else {}))
    out = tmp_path / str(tunables)
    subprocess.run([sys.executable, "-m", "experiments.benchmark", "--mode=smoke", "--only=data",
                    f"--output_dir={out}"], env=run_env, check=True, capture_output=True,
                   cwd=REPO, timeout=300)
    [report] = out.glob("*.json")
    report = json.loads(report.read_text())
    assert report["glibc_tunables"] == (tunables or "")
    import importlib.metadata
    assert report["xla_flags"] == runtime.xla_flags("", importlib.metadata.version("jaxlib"))


@pytest.mark.integration
def test_a_launcher_runs_on_without_a_writable_cache(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("")  # a file where the folder should go
  env = {**os.environ, "BSMAMBA2_COMPILATION_CACHE": str(blocked / "xla")}
  import numpy as np
  import soundfile as sf
  song = tmp_path / "song.wav"
  sf.write(song, np.zeros((100, 2), np.float32), 44100)
  proc = subprocess.run([sys.executable, "-m", "experiments.separate", str(song),
                         "--checkpoint=none"], env=env, capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 2, proc.stderr
  assert f"compilation cache off: cannot write {blocked / 'xla'}" in proc.stderr
  assert "none: no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def _train_launch(tmp_path, *flags, config=None):
  """Runs the training launcher with `config` (default: tiny) and `flags`; returns the finished
  process."""
  config = config or os.path.join(REPO, "experiments", "configs", "tiny.py")
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
       f"--config={config}", *flags], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return {\n")
  proc = _train_launch(tmp_path, config=broken)
  assert proc.returncode == 1
  assert f"FATAL Flags parsing error: cannot load config file {broken} (line 2:" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_a_model_field_that_cannot_make_a_model_is_one_line(tmp_path):
  proc = _train_launch(tmp_path, "--config.model.headdim=7")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "train: config.model: invalid ModelConfig: expand*dim = 64 is not a multiple of headdim 7")


def test_path_flags_expand_the_home_folder():
  from absl import flags

  from experiments import cli
  values = flags.FlagValues()
  cli.DEFINE_path("workdir", "runs", "", flag_values=values)
  cli.DEFINE_multi_path("input", None, "", flag_values=values)
  values(["prog", "--workdir=~/runs", "--input=~/a.wav", "--input", "b/~c.wav"])
  home = os.path.expanduser("~")
  assert values.workdir == os.path.join(home, "runs")
  assert values.input == [os.path.join(home, "a.wav"), "b/~c.wav"]
  values.unparse_flags()
  values(["prog"])
  assert values.workdir == "runs"  # the default, as given


@pytest.mark.integration
@pytest.mark.parametrize("launcher, names", [
    ("evaluate", ("checkpoint", "data_dir", "output_dir")),
    ("separate", ("input", "checkpoint", "output_dir")),
])
def test_help_lists_each_launchers_path_flags(launcher, names):
  """Flags made by DEFINE_path belong to the launcher, whose --help lists only its own."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{launcher}", "--help"],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0  # --help is not an error
  for name in names:
    assert re.search(rf"\n  (-\w,)?--{name}: ", proc.stdout), proc.stdout


@pytest.mark.parametrize("cpuinfo,expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\nbogomips : 1\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),
    ("", False)])
def test_bf16_dot_units_are_read_from_the_cpu_flags(cpuinfo, expected):
  assert bool(runtime.cpu_flags(cpuinfo) & runtime.BF16_DOT_FLAGS) is expected
  assert isinstance(runtime.cpu_has_bf16_dots(), bool)

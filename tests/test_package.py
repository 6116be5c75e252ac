"""Package-level behaviour: what `import bsmamba2_jax` does to the process."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

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

"""Running the real entry point, `python train.py ...`, as a subprocess (one helper for every
test that does): CPU only, with `devices` simulated devices (None: the platform's default, one)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices=None) -> dict:
  out = dict(os.environ, JAX_PLATFORMS="cpu")
  out.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices are for the in-process tests
  if devices is not None:
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return out


def command(*args) -> list[str]:
  return [sys.executable, "train.py", *args]  # run in the checkout's root, as the README does


def run(*args, devices=None, cwd=ROOT, timeout=300, check=False) -> subprocess.CompletedProcess:
  """`python train.py *args` in `cwd`; with `check`, a non-zero exit fails the test showing the
  command's output."""
  p = subprocess.run(command(*args), cwd=cwd, env=env(devices), capture_output=True,
                     text=True, timeout=timeout)
  if check:
    assert p.returncode == 0, (f"train.py {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def popen(*args, devices=None, cwd=ROOT) -> subprocess.Popen:
  """`python train.py *args` running in the background, stdout and stderr merged."""
  return subprocess.Popen(command(*args), cwd=cwd, env=env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

"""Running `python -m r1jax.launch` as a subprocess from the reliability tests.

The test environment from tests/conftest.py (JAX_PLATFORMS, the shared compilation cache, XLA's
fast-compile flag) is passed on, with 2 simulated devices instead of 8: the runs still shard
(replicated leaves, a 2-way data axis) and orbax's per-replica slicing on save stays cheap.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
SHRUNK_R1 = os.path.join(HERE, "r1_tiny_shrunk.py")
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.py")
from r1jax.runlog import TIMING_KEYS  # noqa: F401  (the reliability tests import it from here)


def env(devices: int = 2, **extra: str) -> dict:
  out = dict(os.environ, **extra)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", out.get("XLA_FLAGS", ""))
  out["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return out


def start(args, log_path: str, devices: int = 2, **extra_env: str) -> subprocess.Popen:
  """The launcher in the background, stdout and stderr appended to `log_path`."""
  log = open(log_path, "ab")
  try:
    return subprocess.Popen([sys.executable, "-m", "r1jax.launch", *args], cwd=ROOT,
                            env=env(devices, **extra_env), stdout=log,
                            stderr=subprocess.STDOUT)
  finally:
    log.close()  # the child holds its own descriptor


def run(args, timeout: float = 300, devices: int = 2) -> subprocess.CompletedProcess:
  """The launcher to completion, output captured (text)."""
  return subprocess.run([sys.executable, "-m", "r1jax.launch", *args], cwd=ROOT,
                        env=env(devices), capture_output=True, text=True, timeout=timeout)


def tail(path: str, n: int = 3000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except FileNotFoundError:
    return ""

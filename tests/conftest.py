"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, and XLA:CPU's fast
compile mode (the suite is dominated by compiles of small graphs; optimization level 0 compiles
~5x faster and runs ~2x slower), plus a persistent compilation cache shared by the test
processes (launcher subprocesses of the resume tests reuse each other's compiles)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "r1jax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

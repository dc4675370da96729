"""Test-session set-up: 8 fake CPU devices so sharding tests see a real mesh.

The flag must be in the environment before jax initialises its backend, which is
why it is set here, at import time of the first conftest.
"""
import os
import tempfile

# The tests check numbers, not speed, and most of their time is XLA
# compiling: without LLVM optimisation it compiles about a third faster here
# (e.g. the tiny RL step 14.2 s -> 9.3 s). Subprocesses get the same flags
# through `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


for _flag in ("--xla_force_host_platform_device_count=8", FAST_COMPILE):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session: the pipeline tests run
# the same stages several times (and in subprocesses, which inherit this).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="ketchup-jax-cache-"))

"""Test-session set-up: 8 fake CPU devices so sharding tests see a real mesh.

The flag must be in the environment before jax initialises its backend, which is
why it is set here, at import time of the first conftest.
"""
import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session: the pipeline tests run
# the same stages several times (and in subprocesses, which inherit this).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="ketchup-jax-cache-"))

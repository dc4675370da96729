"""JAX's multi-controller runtime: start-up, process layout, host <-> global.

One ketchup_jax run may span several processes (one per TPU VM host, one per
GPU node, or several CPU processes on one machine). Every process runs the
same program; `jax.distributed.initialize` connects them, after which
`jax.devices()` lists the devices of all processes and a jitted function on
arrays sharded over all of them runs as one SPMD program (XLA collectives over
ICI/DCN on TPU, NCCL on GPU, gloo on CPU).

How a run finds its peers (`config.distributed.initialize`):

* `"auto"` (default): an explicit coordinator (config fields or the
  `KETCHUP_COORDINATOR_ADDRESS` / `KETCHUP_NUM_PROCESSES` /
  `KETCHUP_PROCESS_ID` environment variables) is used when given; otherwise a
  TPU pod slice or a SLURM job with several tasks is detected by JAX itself
  (`jax.distributed.initialize()` without arguments); otherwise the run is one
  process and nothing is initialised.
* `"explicit"`: the coordinator address, process count and process id must be
  given (config or environment).
* `"cluster"`: always `jax.distributed.initialize()` without arguments, so
  that JAX's own cluster detection (Cloud TPU, SLURM, Open MPI, ...) finds the
  peers; what the TPU pod and SLURM scripts in `launch/` use.
* `"never"`: one process, whatever the environment says.

The helpers below are what the pipeline needs to stay correct with several
processes: `barrier`, `any_process`, `to_host` (gathers a sharded array to
every process), `batch_rows` and `put_batch` (each process feeds only its rows
of a global batch).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ("auto", "explicit", "cluster", "never")
ENV_COORDINATOR = "KETCHUP_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KETCHUP_NUM_PROCESSES"
ENV_PROCESS_ID = "KETCHUP_PROCESS_ID"
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  if not re.fullmatch(r"\d+", value):
    raise ValueError(f"environment variable {name} must be a non-negative "
                     f"int, got {value!r}")
  return int(value)


def resolve(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """The arguments of `jax.distributed.initialize`, or None for one process.

  Args:
    cfg: `config.distributed` (fields `initialize`, `coordinator_address`,
      `num_processes`, `process_id`); None means all defaults.

  Returns:
    None (single process, do not initialise), `{}` (let JAX detect a TPU pod or
    SLURM job), or `{coordinator_address, num_processes, process_id}`.

  Raises:
    ValueError: naming the bad field and its allowed values.
  """
  cfg = dict(cfg or {})
  mode = cfg.get("initialize", "auto")
  if mode not in MODES:
    raise ValueError(f"config.distributed.initialize must be one of {MODES}, "
                     f"got {mode!r}")
  address = cfg.get("coordinator_address", "") or os.environ.get(
      ENV_COORDINATOR, "")
  num = cfg.get("num_processes", 0)
  pid = cfg.get("process_id", -1)
  if isinstance(num, bool) or not isinstance(num, int) or num < 0:
    raise ValueError(f"config.distributed.num_processes must be an int >= 1 "
                     f"(0 = from the environment), got {num!r}")
  if isinstance(pid, bool) or not isinstance(pid, int) or pid < -1:
    raise ValueError(f"config.distributed.process_id must be an int >= 0 "
                     f"(-1 = from the environment), got {pid!r}")
  num = num or _int_env(ENV_NUM_PROCESSES) or 0
  if pid == -1:
    env_pid = _int_env(ENV_PROCESS_ID)
    pid = -1 if env_pid is None else env_pid
  if address and not _ADDRESS.match(address):
    raise ValueError(f"config.distributed.coordinator_address must be "
                     f"'HOST:PORT' (e.g. '10.0.0.2:8476'), got {address!r}")
  if mode == "never":
    return None
  if mode == "cluster":
    return {}
  explicit = bool(address) or num > 0 or pid >= 0
  if mode == "explicit" or explicit:
    missing = [name for name, bad in (("coordinator_address", not address),
                                      ("num_processes", num < 1),
                                      ("process_id", pid < 0)) if bad]
    if missing:
      raise ValueError(
          f"config.distributed: {', '.join(missing)} not set; an explicit "
          f"multi-process start needs coordinator_address, num_processes and "
          f"process_id (config fields or ${ENV_COORDINATOR}, "
          f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
    if pid >= num:
      raise ValueError(f"config.distributed.process_id must be < "
                       f"num_processes={num}, got {pid}")
    return dict(coordinator_address=address, num_processes=num,
                process_id=pid)
  if _detected_cluster():
    return {}
  return None


def _detected_cluster() -> bool:
  """A TPU pod slice or a multi-task SLURM job, where JAX finds its peers."""
  env = os.environ
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in tpu_hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
  return bool(env.get("SLURM_JOB_ID")) and tasks.isdigit() and int(tasks) > 1


def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
  """Connects this process to its peers, if the config/environment asks.

  Must run before anything touches a JAX backend. Safe to call twice (the
  second call does nothing).

  Args:
    cfg: `config.distributed` (see `resolve`).

  Returns:
    True when `jax.distributed` is (now) initialised.
  """
  args = resolve(cfg)
  if jax.distributed.is_initialized():
    return True
  if args is None:
    return False
  if _cpu_only():
    # CPU collectives across processes go through gloo (TCP).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(%s)",
               ", ".join(f"{k}={v!r}" for k, v in args.items()) or
               "auto-detect")
  jax.distributed.initialize(**args)
  return True


def _cpu_only() -> bool:
  platforms = (os.environ.get("JAX_PLATFORMS") or
               str(jax.config.jax_platforms or ""))
  return platforms.strip().lower() == "cpu"


def layout() -> str:
  """One line: this process, its host and devices, and the global picture."""
  local = jax.local_devices()
  return (f"process {jax.process_index()}/{jax.process_count()} on "
          f"{socket.gethostname()}: {len(local)} local "
          f"{local[0].platform} device(s) (ids "
          f"{[d.id for d in local]}) of {jax.device_count()} in all")


def mesh_layout(mesh: jax.sharding.Mesh) -> str:
  """Which mesh coordinates this process's devices hold."""
  mine = {d.id for d in jax.local_devices()}
  coords = [tuple(int(i) for i in idx)
            for idx, d in np.ndenumerate(mesh.devices) if d.id in mine]
  return (f"mesh {dict(mesh.shape)}; process {jax.process_index()} holds "
          f"{len(coords)} position(s) {coords[:8]}"
          f"{' ...' if len(coords) > 8 else ''}")


def barrier(name: str) -> None:
  """All processes wait here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (one small collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


def to_host(x: Any) -> np.ndarray:
  """The whole value of `x` as numpy on every process (gathers if sharded)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def max_over_processes(x: np.ndarray) -> np.ndarray:
  """The elementwise maximum of an int array over all processes (host side).

  Every process must call it at the same point, with the same shape.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)


def batch_rows(sharding: jax.sharding.Sharding,
               batch_size: int) -> tuple[int, int]:
  """The rows `[start, stop)` of a global batch that this process feeds.

  Args:
    sharding: The batch sharding (leading dimension = rows).
    batch_size: Global rows.

  Returns:
    The contiguous row range held by this process's devices.

  Raises:
    ValueError: if this process's rows are not one contiguous block (a mesh
      whose data axes interleave processes).
  """
  indices = sharding.addressable_devices_indices_map((batch_size,))
  rows = set()
  for index in indices.values():
    rows.update(range(*index[0].indices(batch_size)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {sorted(rows)}, not "
        f"one contiguous block; order the mesh so that each process's devices "
        f"are adjacent on the data axes")
  return start, stop


def put_batch(local: Mapping[str, np.ndarray],
              sharding: jax.sharding.Sharding,
              batch_size: int) -> dict[str, jax.Array]:
  """Assembles global arrays from each process's rows of the batch.

  Args:
    local: This process's rows (`batch_rows`) of every feature.
    sharding: The batch sharding.
    batch_size: Global rows.

  Returns:
    Global arrays of `batch_size` rows, sharded by `sharding`.
  """
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (batch_size,) + v.shape[1:]) for k, v in local.items()}

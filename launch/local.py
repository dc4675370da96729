"""Runs N copies of a ketchup_jax command as one multi-process JAX job on this machine.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        -m ketchup_jax.main --config=configs/smoke.py --workdir=runs/mp2

Each copy is `python <args after -->` with the coordinator on 127.0.0.1 (a free
port), `KETCHUP_NUM_PROCESSES` / `KETCHUP_PROCESS_ID` set, the CPU backend with
`--xla_force_host_platform_device_count=D` fake devices, and gloo collectives.
Output of process i goes to `<log_dir>/process_<i>.log` (default: the terminal,
process 0 only, the rest to files in a temporary directory).

If any process fails, or the whole job runs past `--timeout`, every process
(and everything it started) is killed; the exit status is the first non-zero
one (124 on timeout). Only the loopback address is used.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # the process group we created
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def launch(args: list[str], *, processes: int, devices_per_process: int,
           timeout: float, log_dir: str | None = None,
           python: str = sys.executable, env: dict[str, str] | None = None,
           quiet: bool = False) -> int:
  """Starts the processes, waits for all, returns the exit status."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f"--processes and --devices_per_process must be >= 1, "
                     f"got {processes}, {devices_per_process}")
  log_dir = log_dir or tempfile.mkdtemp(prefix="ketchup-local-")
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env)
  flags = " ".join(f for f in base.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  base.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=(flags + f" --xla_force_host_platform_device_count="
                 f"{devices_per_process}").strip(),
      KETCHUP_COORDINATOR_ADDRESS=address,
      KETCHUP_NUM_PROCESSES=str(processes))
  procs: list[subprocess.Popen] = []
  logs = []
  if not quiet:
    print(f"launch: {processes} processes x {devices_per_process} CPU devices, "
          f"coordinator {address}, logs in {log_dir}", file=sys.stderr,
          flush=True)
  try:
    for i in range(processes):
      log = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
      logs.append(log)
      procs.append(subprocess.Popen(
          [python] + args, env=dict(base, KETCHUP_PROCESS_ID=str(i)),
          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        _kill(procs)
        return failed[0]
      if all(c == 0 for c in codes):
        return 0
      if time.monotonic() > deadline:
        _kill(procs)
        return 124
      time.sleep(0.1)
  except BaseException:
    _kill(procs)
    raise
  finally:
    for log in logs:
      log.close()
    if not quiet:
      for i in range(len(procs)):
        print(f"launch: process {i} exited {procs[i].returncode}; log "
              f"{os.path.join(log_dir, f'process_{i}.log')}", file=sys.stderr)


def main(argv: list[str]) -> int:
  if "--" not in argv:
    print("usage: python launch/local.py [--processes=N] "
          "[--devices_per_process=D] [--timeout=S] [--log_dir=DIR] -- "
          "<python args>", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser()
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=3600.0)
  parser.add_argument("--log_dir", default=None)
  opts = parser.parse_args(argv[:split])
  # SIGTERM (e.g. a test's own timeout) unwinds through launch(), which kills
  # every process it started.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  code = launch(argv[split + 1:], processes=opts.processes,
                devices_per_process=opts.devices_per_process,
                timeout=opts.timeout, log_dir=opts.log_dir)
  log = os.path.join(opts.log_dir, "process_0.log") if opts.log_dir else None
  if log and os.path.exists(log) and code:
    with open(log, encoding="utf-8", errors="replace") as f:
      sys.stderr.write(f.read()[-3000:])
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

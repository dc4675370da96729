"""One run at a time per run directory: `DIR/run.lock`.

`hold(DIR)` takes the lock before a run writes anything in `DIR` and gives it
back when the run ends, however it ends. A second run on the same `DIR`
(a resubmitted job overlapping its predecessor) is refused with one line
naming the directory and the holder (pid, host), before it writes anything.

How it works:

* The lock is an exclusive `flock` on `DIR/run.lock`, which the kernel drops
  when the holder exits by any means, kill -9 included. The file records
  the holder (`{"pid", "host", "started"}`) for the refusal message, and its
  modification time is touched every `HEARTBEAT_S` seconds while it is held.
* A file that still names a holder when the lock is free was left by a run
  that did not end cleanly (kill -9, a second SIGTERM): it is taken over
  with a warning naming the old holder. Where the old holder is on another
  host and its heartbeat is younger than `STALE_AFTER_S` (a filesystem whose
  locks do not reach across hosts), the run is refused instead. Where the
  filesystem has no `flock` at all, the record alone decides: a live pid on
  this host, or a fresh heartbeat from another host, refuses.
* A clean exit deletes the file.
* With several JAX processes (one multi-host run), process 0 takes the lock
  for all of them and every process learns the outcome (one collective), so
  the run's own processes never refuse one another.
* Re-entrant within a process: the sweep holds a run's directory across
  `pipeline.run` and its own evaluation of that run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Iterator

from absl import logging
import jax

from ketchup_jax import distributed

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0

# realpath of DIR -> [lock or None (process != 0), nesting depth].
_HELD: dict[str, list[Any]] = {}


class RunLockError(ValueError):
  """Another run holds the directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _describe(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}")


class RunLock:
  """The lock of one run directory (see the module docstring).

  Args:
    directory: The run directory; created if missing.
  """

  def __init__(self, directory: str | os.PathLike[str]):
    self.directory = os.path.abspath(os.fspath(directory))
    self.path = os.path.join(self.directory, LOCK_NAME)
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _refuse(self, holder: dict[str, Any], why: str = "") -> RunLockError:
    return RunLockError(
        f"run directory {self.directory} is in use by another run: "
        f"{_describe(holder)}{why} (lock file {self.path}); wait for it to "
        f"end, or give this run another --workdir")

  def _read(self, fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
      holder = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
      holder = {"pid": "?", "host": "?", "started": f"? ({raw[:60]!r})"}
    return holder if isinstance(holder, dict) else {}

  def _open_locked(self) -> tuple[int, bool]:
    """(fd of the lock file, whether flock is held); raises if it is taken."""
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._read(fd)
        os.close(fd)
        raise self._refuse(holder) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          os.close(fd)
          raise
        return fd, False  # no flock on this filesystem: the record decides
      try:  # the holder deletes the file as it lets go: lock the live one
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          return fd, True
      except FileNotFoundError:
        pass
      os.close(fd)
    raise RunLockError(f"could not lock {self.path}: it kept being replaced")

  def acquire(self) -> None:
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ValueError(f"run directory {self.directory} exists and is not a "
                       f"directory")
    os.makedirs(self.directory, exist_ok=True)
    fd, flocked = self._open_locked()
    try:
      holder = self._read(fd)
      if holder:
        here = holder.get("host") == socket.gethostname()
        age = time.time() - os.fstat(fd).st_mtime
        pid = holder.get("pid")
        if not here and age < STALE_AFTER_S:
          raise self._refuse(holder, f", alive {age:.0f} s ago")
        if not flocked and here and isinstance(pid, int) and _alive(pid):
          raise self._refuse(holder)
        logging.warning(
            "%s was left by a run that did not end cleanly (%s, last seen "
            "%.0f s ago, the process is gone); taking it over",
            self.path, _describe(holder), age)
      me = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc)
                       .isoformat(timespec="seconds")}
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, args=(fd,),
                                       daemon=True,
                                       name=f"runlock {self.directory}")
    self._heartbeat.start()

  def _beat(self, fd: int) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(fd)
      except OSError:
        pass

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    self._heartbeat.join()  # no touch of a closed (or reused) descriptor
    try:
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.remove(self.path)  # before unlocking: see `_open_locked`
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # drops the flock
      self._fd = None


@contextlib.contextmanager
def hold(directory: str | os.PathLike[str]) -> Iterator[None]:
  """Holds `directory`'s lock for the block (process 0 for all processes).

  Call it after `distributed.initialize`: it asks JAX for the process index.

  Raises:
    RunLockError: another run holds it (on every process of this run).
  """
  key = os.path.realpath(os.fspath(directory))
  if key in _HELD:  # already ours (the sweep around pipeline.run)
    _HELD[key][1] += 1
    try:
      yield
    finally:
      _HELD[key][1] -= 1
    return
  lock, error = None, None
  if jax.process_index() == 0:
    lock = RunLock(directory)
    try:
      lock.acquire()
    except (ValueError, OSError) as e:
      lock, error = None, e
  # A collective: every process of this run learns whether process 0 has it.
  if distributed.any_process(error is not None):
    raise error if error is not None else RunLockError(
        f"process 0 could not lock the run directory {key}; see its error")
  _HELD[key] = [lock, 1]
  try:
    yield
  finally:
    del _HELD[key]
    if lock is not None:
      lock.release()

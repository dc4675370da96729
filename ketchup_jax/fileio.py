"""Writes a full disk cannot half-do: whole files, whole lines.

Every file the package writes itself goes through `write_to`, so a full disk
is met in one place (the tests inject `OSError(errno.ENOSPC)` there):

* `atomic_write(path, data)`: a temporary file next to `path`, renamed over
  it when complete; `path` holds the old contents or the new, never part.
* `atomic_file(path)`: the same for a library that writes to a file name.
* `append_line(path, line)`: a line appended whole, or the file cut back to
  its previous length.

A write that fails for lack of space raises `DiskFullError`, one line naming
the path and the space left on its filesystem.

A leaf module: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import IO, Any, Iterator

# Out of space, or out of quota (the usual limit on shared cluster disks).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class DiskFullError(OSError):
  """A write failed for lack of space; the message names path and free space."""

  def __str__(self) -> str:
    return self.strerror or super().__str__()


def free_bytes(path: str | os.PathLike[str]) -> int | None:
  """Bytes free on the filesystem of `path` (its nearest existing parent)."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def _size(n: int | None) -> str:
  if n is None:
    return "unknown"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


def is_disk_full(e: BaseException) -> bool:
  """Whether `e`, or an exception it was raised from, is ENOSPC / EDQUOT.

  Libraries that write in native code (Orbax's TensorStore) report it as
  text, so the message is matched too.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
      return True
    if any(text in str(e) for text in _FULL_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def disk_full(path: str | os.PathLike[str]) -> DiskFullError:
  """The error for a write to `path` that ran out of space."""
  path = os.path.abspath(os.fspath(path))
  return DiskFullError(
      errno.ENOSPC,
      f"no space left on device writing {path} ({_size(free_bytes(path))} "
      f"free on its filesystem); free some space and rerun the same command "
      f"to resume")


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike[str]) -> Iterator[None]:
  """Turns an out-of-space failure inside the block into `disk_full(path)`."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if is_disk_full(e):
      raise disk_full(path) from e
    raise


def write_to(f: IO, data: str | bytes) -> None:
  """Writes `data` to the open file `f`: the one place our bytes go to disk."""
  if isinstance(data, str):
    f.write(data)
    return
  view = memoryview(data)
  while view:  # an unbuffered file may take part of it per call
    view = view[f.write(view):]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary path; what is written there replaces `path` at the end.

  For writers that take a file name (safetensors). On any failure the
  temporary file goes and `path` is left as it was.
  """
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with naming_full_disk(path):
    try:
      yield tmp
      os.replace(tmp, path)
    finally:
      if os.path.lexists(tmp):
        os.remove(tmp)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
  """Replaces `path` with `data` (str: UTF-8) all at once, or not at all."""
  text = isinstance(data, str)
  with atomic_file(path) as tmp:
    with open(tmp, "w" if text else "wb",
              **({"encoding": "utf-8"} if text else {})) as f:
      write_to(f, data)
      f.flush()
      os.fsync(f.fileno())


def append_line(path: str | os.PathLike[str], line: str) -> None:
  """Appends `line` + newline whole; on failure cuts the file back."""
  path = os.fspath(path)
  data = (line + "\n").encode("utf-8")
  with naming_full_disk(path):
    with open(path, "ab", buffering=0) as f:  # nothing left in a buffer
      start = f.tell()
      try:
        write_to(f, data)
      except BaseException:
        f.truncate(start)  # needs no space
        raise


def read_json(path: str, expected: str) -> Any:
  """The JSON in `path`; a ValueError naming the file if it is not JSON.

  Args:
    path: The file.
    expected: What it should hold, for the error (e.g. "the model's HF
      config.json").
  """
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; expected a file holding "
                     f"{expected}")
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}"
                     ) from None

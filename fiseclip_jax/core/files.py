"""The one way this package writes a file: whole, to a temporary name beside it, then renamed.

A crash, a kill or a full disk leaves the old file or the new one, never half of one, and no
temporary file: it is created exclusively under a name nobody else uses (so it never clobbers a
user's file) and removed on every failure path.
"""
from __future__ import annotations

import os
import tempfile
from typing import Union

_UMASK = os.umask(0)      # read once (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write(path: str, data: Union[str, bytes], *, fsync: bool = True) -> None:
  """Write `data` (text as UTF-8, or bytes) to `path` through a temporary file and a rename.

  The folder is created if missing. An OSError names `path` (not the temporary name).
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  if os.path.isdir(path):
    raise IsADirectoryError(21, "is a folder, expected a file path", path)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)          # mkstemp's 0600 -> what open() would have given
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError) and e.filename in (None, tmp):
      raise type(e)(e.errno, e.strerror, path) from e
    raise

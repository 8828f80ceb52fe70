"""A run's --out folder: made ready once, by `prepare_out`, for every program (DESIGN.md §13).

A run's identity (the settings its numbers depend on) is stored in its record (results.json for
the benchmark programs, run.json for the folder scorer). `--resume` under another identity is
refused with the differing settings named, before anything is touched; a new run into a folder
holding an earlier one needs `--resume` or `--overwrite`, and `--overwrite` removes only the
earlier run's own outputs.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Dict, List, Optional

from fiseclip_jax.outputs.files import json_safe

# What a run writes into --out (and --overwrite removes); nothing else there is touched.
RUN_OUTPUTS = ("results.json", "results.csv", "scores", "curves", "maps", "masks", "scores.csv",
               "scores.log.csv", "skipped.csv", "run.json", "report.html", "report",
               "known_good.csv")


class RunFolderError(ValueError):
  """--out cannot take this run as asked (the message says which flag to change)."""


class RunMismatch(RunFolderError):
  """--resume found a run with other settings; the message lists the differing keys."""


class RecordError(ValueError):
  """A run record that cannot be read; it is left as it is."""


LOCK = ".fiseclip.lock"
_LOCKS: Dict[str, int] = {}      # folder -> the open descriptor holding its lock (this process)


def lock(out: str) -> None:
  """Exclusive use of --out for this process's life: a second run into the same folder is refused,
  naming the first. An flock, so a killed run leaves nothing stuck (the kernel releases it)."""
  key = os.path.realpath(out)
  if key in _LOCKS:
    return
  path = os.path.join(out, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
    os.close(fd)
    raise RunFolderError(f"--out {out} is in use by another run ({holder}): wait for it to end, "
                         "or use another --out") from None
  os.ftruncate(fd, 0)
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
  _LOCKS[key] = fd


def check_writable(out: str) -> None:
  """--out must be a folder this process can create and write in.

  The probe file has a unique name: every process of a multi-host run checks the same folder.
  """
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out, prefix=".fiseclip_write_test") as f:
      f.write("ok")
  except OSError as e:
    raise RunFolderError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def read_record(path: str, needs: Optional[str] = None) -> Optional[dict]:
  """The JSON record at path (None if there is none); `needs`: a key it must hold."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); it was left as it is: "
                      "move it away or use another --out") from None
  if not isinstance(doc, dict) or (needs is not None and not isinstance(doc.get(needs), dict)):
    raise RecordError(f"{path} is not a record of this program (no {needs or 'object'!r}); it "
                      "was left as it is: move it away or use another --out")
  return doc


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def identity_diff(old: dict, new: dict) -> List[str]:
  """'key: old -> new' for every setting that differs between two run identities."""
  a, b = _flat(json_safe(old)), _flat(json_safe(new))
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume(doc: dict, identity: dict, where: str) -> None:
  """Refuse to resume a run whose identity differs, naming every differing setting."""
  old = doc.get("identity")
  if old is None:
    raise RunMismatch(f"--resume: {where} holds a run without a stored identity (an older "
                      "version wrote it); nothing was changed: use another --out or --overwrite")
  diff = identity_diff(old, identity)
  if diff:
    raise RunMismatch(f"--resume: {where} holds a run with other settings ({'; '.join(diff)}); "
                      "nothing was changed: rerun with its settings, use another --out, or "
                      "--overwrite to replace it")


def earlier_outputs(out: str) -> List[str]:
  """The names of RUN_OUTPUTS present in out."""
  return [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]


def remove_outputs(out: str) -> None:
  """--overwrite: remove an earlier run's own outputs (nothing else in the folder)."""
  for name in earlier_outputs(out):
    path = os.path.join(out, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def prepare_out(out: str, identity: dict, *, resume: bool, overwrite: bool, record: str,
                needs: Optional[str] = None, exclusive: bool = True) -> Optional[dict]:
  """Make --out ready for a run; the earlier run's record when resuming it, else None.

  record: the file name holding the run's identity; needs: a key that record must hold. The
  folder is locked for this process (exclusive; off for the other processes of a multi-host run,
  which share process 0's folder and write nothing). With resume and a record: its identity must
  equal `identity` (else RunMismatch, nothing touched). Otherwise an earlier run's outputs are
  refused unless overwrite, which removes them. The caller writes the new record.
  """
  if resume and overwrite:
    raise RunFolderError("--resume and --overwrite exclude each other")
  check_writable(out)
  path = os.path.join(out, record)
  doc = read_record(path, needs) if resume else None
  if doc is not None:
    check_resume(doc, identity, out)
  earlier = earlier_outputs(out) if doc is None else []
  if earlier and not overwrite:
    what = (f"outputs of a run ({', '.join(earlier)}) but no {record} to resume from"
            if resume else f"an earlier run ({', '.join(earlier)})")
    advice = ("pass --overwrite to replace them" if resume else
              "pass --resume to continue it, --overwrite to replace it")
    raise RunFolderError(f"--out {out} holds {what}: {advice}, or another --out")
  if resume and doc is None and not earlier:
    sys.stderr.write(f"warning: --resume: {out} holds no run to resume; starting a new run\n")
  if exclusive:              # after the read-only checks: a refused run touches nothing
    lock(out)
  if earlier:
    remove_outputs(out)
  return doc

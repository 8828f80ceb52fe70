"""The folder scorer's long-running log: per-image rows appended and flushed batch by batch.

A kill loses at most the batch being written; `--resume` keeps the complete batches (DESIGN.md §13).
"""
from __future__ import annotations

import csv
import os
from typing import List, Sequence

from fiseclip_jax.outputs.files import write_csv
from fiseclip_jax.outputs.run_folder import RecordError

TORN = "\x00torn"          # stands for a line that is not UTF-8 (never a batch id)


class BatchLog:
  """An append-only CSV of per-image rows, written and flushed to disk batch by batch.

  Each batch's rows are followed by an end row ("#end", batch, n); on reading, a batch without its
  end row (a kill in the middle of writing) is dropped, so a resumed run redoes it whole.
  """

  def __init__(self, path: str, columns: Sequence[str]):
    self.path, self.columns = path, list(columns)

  def read(self) -> List[List[dict]]:
    """The complete batches already in the log, in order: a list of row dicts per batch."""
    if not os.path.isfile(self.path):
      return []
    with open(self.path, "rb") as f:
      raw = f.read().splitlines(keepends=True)
    lines = []
    for line in raw:                          # a line that is not UTF-8 is torn: its batch is redone
      try:
        lines.append(line.decode("utf-8"))
      except UnicodeDecodeError:
        lines.append(TORN + "\n")
    rows = list(csv.reader(lines))
    if not rows or rows[0] != ["batch"] + self.columns:
      raise RecordError(f"{self.path}: not a log of this program (header {rows[:1]}); it was left "
                        "as it is: move it away or use another --out")
    batches, current = [], []
    for row in rows[1:]:
      if row and row[0] == "#end":
        if len(row) == 3 and row[2].isdigit() and int(row[2]) == len(current):
          batches.append(current)
        current = []
      elif len(row) == len(self.columns) + 1:
        current.append(dict(zip(self.columns, row[1:])))
      else:
        current = []                          # a torn line: the batch is incomplete
    return batches

  def rewrite(self, batches: List[List[dict]]) -> None:
    """Keep only these complete batches (drops a torn tail before appending again)."""
    rows = [["batch"] + self.columns]
    for i, batch in enumerate(batches):
      rows += [[i] + [r[c] for c in self.columns] for r in batch] + [["#end", i, len(batch)]]
    write_csv(self.path, rows)

  def append(self, batch_id: int, rows: List[Sequence]) -> None:
    new = not os.path.isfile(self.path)
    try:
      with open(self.path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        if new:
          w.writerow(["batch"] + self.columns)
        w.writerows([[batch_id] + list(r) for r in rows])
        w.writerow(["#end", batch_id, len(rows)])
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:                      # a full disk says which file it could not write
      if e.filename is None:
        raise type(e)(e.errno, e.strerror, self.path) from e
      raise

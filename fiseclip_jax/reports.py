"""What a run leaves on disk: results.json / results.csv, per-image CSVs, the run's identity.

Every file is written whole to a temporary name and renamed, so a crash leaves either the old or
the new file, never half of one. A run's identity (the settings its numbers depend on) is stored
with its results; resuming under another identity is refused before anything is touched.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

METRIC_COLUMNS = (("pixel", "auroc"), ("pixel", "f1_max"), ("pixel", "ap"), ("pixel", "aupro"),
                  ("image", "auroc"), ("image", "f1_max"), ("image", "ap"))
HEADERS = ("px-AUROC", "px-F1max", "px-AP", "AU-PRO", "im-AUROC", "im-F1max", "im-AP")
RESULTS_JSON = "results.json"
# What a run writes into --out (and --overwrite removes); nothing else there is touched.
RUN_OUTPUTS = ("results.json", "results.csv", "scores", "maps", "scores.csv", "scores.log.csv",
               "skipped.csv", "run.json", "report.html", "report")


class RunMismatch(ValueError):
  """--resume found a run with other settings; the message lists the differing keys."""


def atomic_write(path: str, text: str) -> None:
  """Write text to path through a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def json_safe(x):
  """NaN -> null, NumPy scalars -> Python numbers, tuples -> lists (strict JSON)."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return None if np.isnan(x) else float(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def write_json(path: str, doc: dict) -> None:
  atomic_write(path, json.dumps(json_safe(doc), indent=2, sort_keys=True, allow_nan=False) + "\n")


def csv_text(rows: Iterable[Sequence]) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue()


def _fmt(x) -> str:
  return "   -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:6.1f}"


def table(results: Dict[str, dict]) -> str:
  """The paper's Table 1 columns, per category, in percent."""
  width = max([len("category")] + [len(c) for c in results])
  lines = [f"{'category':<{width}}  " + "  ".join(f"{h:>8}" for h in HEADERS)]
  for cat, r in results.items():
    m = r.get("metrics", {})
    row = [m.get(level, {}).get(key) for level, key in METRIC_COLUMNS]
    lines.append(f"{cat:<{width}}  " + "  ".join(f"{_fmt(v):>8}" for v in row))
  return "\n".join(lines)


def mean_metrics(results: Dict[str, dict]) -> Dict[str, Dict[str, Optional[float]]]:
  """Mean over categories of each metric (undefined ones do not count)."""
  out: Dict[str, Dict[str, Optional[float]]] = {}
  for level, key in METRIC_COLUMNS:
    vals = [r.get("metrics", {}).get(level, {}).get(key) for r in results.values()]
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    out.setdefault(level, {})[key] = float(np.mean(vals)) if vals else None
  return out


def write_results(out_dir: str, header: dict, results: Dict[str, dict]) -> None:
  """results.json (identity, config, versions, per category and mean) and results.csv."""
  doc = dict(header)
  doc["categories"] = results
  doc["mean"] = mean_metrics(results) if results else {}
  write_json(os.path.join(out_dir, RESULTS_JSON), doc)
  rows = [["category"] + [f"{lvl}_{key}" for lvl, key in METRIC_COLUMNS] + ["n_images", "images_per_s"]]
  for cat, r in list(results.items()) + [("mean", {"metrics": doc["mean"]})]:
    vals = [r["metrics"].get(lvl, {}).get(key) for lvl, key in METRIC_COLUMNS]
    rows.append([cat] + ["" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.6f}" for v in vals]
                + [r.get("n_images", ""), f"{r['timing']['images_per_s']:.3f}" if "timing" in r else ""])
  atomic_write(os.path.join(out_dir, "results.csv"), csv_text(rows))


SCORE_COLUMNS = ("path", "label", "score", "n_ref", "seclip_only")


def score_rows(paths: Sequence[str], labels, scores, n_ref, seclip_only,
               extra: Optional[Dict[str, Sequence]] = None) -> List[list]:
  """Per-image rows sorted by path, header first (the columns of every per-image CSV)."""
  extra = extra or {}
  header = list(SCORE_COLUMNS) + list(extra)
  rows = [[p, int(l), f"{float(s):.8f}", int(r), int(bool(o))] + [col[i] for col in extra.values()]
          for i, (p, l, s, r, o) in enumerate(zip(paths, labels, scores, n_ref, seclip_only))]
  return [header] + sorted(rows, key=lambda row: row[0])


def write_scores(path: str, rows: List[list]) -> None:
  atomic_write(path, csv_text(rows))


def load_run(out_dir: str) -> Optional[dict]:
  """The results.json of an earlier run in out_dir, None if there is none; a corrupt file is an
  error that leaves it in place."""
  path = os.path.join(out_dir, RESULTS_JSON)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except json.JSONDecodeError as e:
    raise json.JSONDecodeError(f"{path} is not valid JSON ({e.msg}); it was left as it is: "
                               "move it away or use another --out", e.doc, e.pos) from None
  if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict):
    raise ValueError(f"{path} is not a results file of this program (no 'categories'); "
                     "it was left as it is")
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


def earlier_outputs(out_dir: str) -> List[str]:
  """The names of RUN_OUTPUTS present in out_dir."""
  return [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out_dir, n))]


def remove_outputs(out_dir: str) -> None:
  """--overwrite: remove an earlier run's own outputs (nothing else in the folder)."""
  for name in earlier_outputs(out_dir):
    path = os.path.join(out_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


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
    with open(self.path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
    if not rows or rows[0] != ["batch"] + self.columns:
      raise ValueError(f"{self.path}: not a log of this program (header {rows[:1]}); it was left "
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
    atomic_write(self.path, csv_text(rows))

  def append(self, batch_id: int, rows: List[Sequence]) -> None:
    new = not os.path.isfile(self.path)
    with open(self.path, "a", newline="", encoding="utf-8") as f:
      w = csv.writer(f, lineterminator="\n")
      if new:
        w.writerow(["batch"] + self.columns)
      w.writerows([[batch_id] + list(r) for r in rows])
      w.writerow(["#end", batch_id, len(rows)])
      f.flush()
      os.fsync(f.fileno())

"""A benchmark run's numbers: results.json / results.csv (per category and mean), per-image CSVs,
the paper's table. Written atomically (`files.py`)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from fiseclip_jax.outputs.files import write_csv, write_json

METRIC_COLUMNS = (("pixel", "auroc"), ("pixel", "f1_max"), ("pixel", "ap"), ("pixel", "aupro"),
                  ("image", "auroc"), ("image", "f1_max"), ("image", "ap"))
HEADERS = ("px-AUROC", "px-F1max", "px-AP", "AU-PRO", "im-AUROC", "im-F1max", "im-AP")
RESULTS_JSON = "results.json"


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
  write_csv(os.path.join(out_dir, "results.csv"), rows)


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
  write_csv(path, rows)

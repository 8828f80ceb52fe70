"""File formats every output uses: strict JSON (NaN as null) and CSV text, written atomically."""
from __future__ import annotations

import csv
import io
import json
from typing import Iterable, Sequence

import numpy as np

from fiseclip_jax.core.files import atomic_write


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


def json_text(doc) -> str:
  return json.dumps(json_safe(doc), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str, doc: dict) -> None:
  atomic_write(path, json_text(doc))


def csv_text(rows: Iterable[Sequence]) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue()


def write_csv(path: str, rows: Iterable[Sequence]) -> None:
  atomic_write(path, csv_text(rows))

"""The curves of a benchmark category as an SVG figure (ROC, precision-recall, PRO side by side),
drawn with matplotlib without pyplot and kept while what it shows is unchanged.

Each panel carries its chance baseline: the diagonal on ROC, the positive share on PR (image and
pixel), PRO = FPR on the PRO panel, so a curve is read against what random ranking gives.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
from typing import Optional, Tuple

import numpy as np

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs.page import get, number

MISSING_MATPLOTLIB = "report.html needs matplotlib (a requirement of fiseclip-jax): pip install matplotlib"
# Every curve a category's figure can hold: kind (the SVG gid is "curve-<kind>"), where it sits in
# curves/<cat>.json (level, curve, x key, y key), the metric its legend quotes, and its panel.
CURVES = (("image-roc", "image", "roc", "fpr", "tpr", "auroc", "image AUROC", 0),
          ("pixel-roc", "pixel", "roc", "fpr", "tpr", "auroc", "pixel AUROC", 0),
          ("image-pr", "image", "pr", "recall", "precision", "ap", "image AP", 1),
          ("pixel-pr", "pixel", "pr", "recall", "precision", "ap", "pixel AP", 1),
          ("pro", "pixel", "pro", "fpr", "pro", "aupro", "AU-PRO", 2))
PANELS = (("ROC", "false positive rate", "true positive rate"),
          ("Precision-recall", "recall", "precision"),
          ("PRO (FPR < 0.3)", "FPR, rescaled to [0, 1]", "per-region overlap"))
COLOURS = {"image": "#2866a8", "pixel": "#d2473c", "pro": "#7a4fa3"}
TICKS = (0, 0.25, 0.5, 0.75, 1)


class ReportUnavailable(RuntimeError):
  """report.html cannot be built here (matplotlib, an optional extra, is not installed)."""


def curve_points(curves: Optional[dict], kind: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(x, y) of one curve kind, or None where it is absent, null, malformed or shorter than 2."""
  spec = next(c for c in CURVES if c[0] == kind)
  curve = get(curves, spec[1], spec[2])
  if not isinstance(curve, dict):
    return None
  try:
    x = np.asarray(curve.get(spec[3]), dtype=np.float64)
    y = np.asarray(curve.get(spec[4]), dtype=np.float64)
  except (TypeError, ValueError):
    return None
  if x.ndim != 1 or x.shape != y.shape or x.size < 2:
    return None
  keep = np.isfinite(x) & np.isfinite(y)
  return (x[keep], y[keep]) if keep.sum() >= 2 else None


# ---------------------------------------------------------------------------------------------
# Figures.

def require_matplotlib() -> None:
  """ReportUnavailable where matplotlib cannot be imported (checked before anything is written)."""
  _pyplot_free_figure()


def _pyplot_free_figure():
  """matplotlib's Figure class, or ReportUnavailable. A bare Figure (no pyplot) needs no display
  and no global backend switch, and is freed like any object, so nothing accumulates."""
  try:
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure
  except ImportError:
    raise ReportUnavailable(MISSING_MATPLOTLIB) from None
  return Figure


def legend_label(kind: str, metrics: Optional[dict]) -> str:
  """'image AUROC 97.3': the curve's name and the metric it integrates to, in percent."""
  spec = next(c for c in CURVES if c[0] == kind)
  value = number(get(metrics, spec[1], spec[5]))
  return spec[6] if value is None else f"{spec[6]} {100 * value:.1f}"


def curves_figure(curves: Optional[dict], metrics: Optional[dict], chance: Optional[dict] = None):
  """(Figure, number of curves drawn): ROC, PR and PRO side by side; absent curves are skipped.
  chance: {"image": p, "pixel": p}, the positive shares PR's baselines are drawn at."""
  Figure = _pyplot_free_figure()
  fig = Figure(figsize=(10.2, 3.4))
  axes = fig.subplots(1, 3)
  drawn = [0, 0, 0]
  for kind, level, _, _, _, _, _, panel in CURVES:
    points = curve_points(curves, kind)
    if points is None:
      continue
    colour = COLOURS["pro" if kind == "pro" else level]
    line, = axes[panel].plot(*points, lw=1.6, color=colour, label=legend_label(kind, metrics),
                             solid_joinstyle="round")
    line.set_gid(f"curve-{kind}")
    drawn[panel] += 1
  for i, (ax, (title, xlabel, ylabel)) in enumerate(zip(axes, PANELS)):
    if i == 0:
      ax.plot([0, 1], [0, 1], lw=0.8, ls=(0, (3, 3)), color="#9aa0a6", label="chance")
    if i == 1:
      for level in ("image", "pixel"):
        p = number(get(chance, level))
        if p is not None:
          base, = ax.plot([0, 1], [p, p], lw=0.9, ls=(0, (3, 3)), color=COLOURS[level],
                          label=f"{level} chance {100 * p:.1f}")
          base.set_gid(f"chance-{level}-pr")
    if i == 2:           # a random map: PRO = FPR, which runs to 0.3 over the rescaled axis
      ax.plot([0, 1], [0, 0.3], lw=0.8, ls=(0, (3, 3)), color="#9aa0a6", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xticks=TICKS, yticks=TICKS, xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, lw=0.5, color="#e3e6ea")
    ax.tick_params(labelsize=8, length=2)
    for side in ("top", "right"):
      ax.spines[side].set_visible(False)
    if drawn[i]:
      ax.legend(loc="lower right" if i != 1 else "lower left", fontsize=8, frameon=False)
    else:
      ax.text(0.5, 0.5, "not available", ha="center", va="center", color="#9aa0a6",
              transform=ax.transAxes)
  # Fixed margins, not tight_layout: that lays every label out again and doubles the cost.
  fig.subplots_adjust(left=0.055, right=0.975, bottom=0.15, top=0.91, wspace=0.3)
  return fig, sum(drawn)


def figure_svg(fig, key: str) -> str:
  """The figure as SVG text: text stays text (smaller, crisp), no date, ids fixed by key."""
  import matplotlib
  buf = io.StringIO()
  with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": key,
                              "font.family": ["DejaVu Sans", "sans-serif"]}):
    fig.savefig(buf, format="svg", metadata={"Date": None, "Identifier": key})
  return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
  """A digest of this file: an edit to how figures are drawn redraws the cached ones."""
  try:
    with open(__file__, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return ""


def figure_key(curves: Optional[dict], metrics: Optional[dict], chance: Optional[dict] = None) -> str:
  """A digest of everything a figure shows, so an unchanged category's figure is not redrawn."""
  import matplotlib
  doc = {"curves": curves, "metrics": metrics, "chance": chance, "code": _code_digest(),
         "matplotlib": matplotlib.__version__}
  return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def svg_is_current(path: str, key: str) -> bool:
  """Whether the SVG at path was drawn from the inputs that key digests."""
  try:
    with open(path, encoding="utf-8") as f:
      head = f.read(4096)
  except (OSError, UnicodeDecodeError):
    return False
  return f"<dc:identifier>{key}</dc:identifier>" in head


def write_curves_svg(path: str, curves: Optional[dict], metrics: Optional[dict],
                     chance: Optional[dict] = None) -> int:
  """Write (or keep, if current) a category's curves figure; the number of curves it holds. With
  no curve at all no figure is kept (and a stale one is removed)."""
  n_present = sum(curve_points(curves, c[0]) is not None for c in CURVES)
  if n_present == 0:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return 0
  key = figure_key(curves, metrics, chance)
  if svg_is_current(path, key):
    return n_present
  fig, n = curves_figure(curves, metrics, chance)
  atomic_write(path, figure_svg(fig, key).encode("utf-8"))
  return n

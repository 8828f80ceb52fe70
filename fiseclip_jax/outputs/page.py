"""The pieces both HTML pages are made of (the benchmark's report.html and the folder scorer's
review page): escaping, numbers, metric shading against chance, a score histogram, the colour bar
of the overlays, the stylesheet and the document around them. Pure functions of what they show;
no JavaScript, no fonts or files to fetch, links relative, so a page works from a zip or a disk.
"""
from __future__ import annotations

import html
import importlib.resources
import json
import os
import urllib.parse
from typing import Optional, Sequence, Tuple

import numpy as np

from fiseclip_jax.outputs import overlays

# The chance level of each metric (what a model that ranks at random, or flags every image, gets):
# AUROC 0.5; F1-max is at least the F1 of flagging everything, 2p / (1 + p); AP the positive share
# p; AU-PRO (FPR < 0.3, rescaled) of a random map 0.15, as its PRO equals its FPR.
AUPRO_CHANCE = 0.15


# ---------------------------------------------------------------------------------------------
# Reading files that may be missing or malformed.

def read_json(path: str) -> Optional[dict]:
  """The JSON object in path, or None if it is absent or not a readable JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError):
    return None
  return doc if isinstance(doc, dict) else None


def get(d, *keys):
  """d[k0][k1]..., None where any level is missing or not a dict."""
  for k in keys:
    if not isinstance(d, dict):
      return None
    d = d.get(k)
  return d


def number(x) -> Optional[float]:
  """A finite float, or None (null, NaN, text, ...)."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x) if np.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Text.

def esc(x) -> str:
  return html.escape(str(x), quote=True)


def href(rel_path: str) -> str:
  """A relative path as an attribute value: '/'-separated, percent-encoded, HTML-escaped."""
  return esc(urllib.parse.quote(rel_path.replace(os.sep, "/")))


def pct(x) -> str:
  v = number(x)
  return "-" if v is None else f"{100 * v:.1f}"


def num(x) -> str:
  v = number(x)
  return "-" if v is None else f"{v:.4g}"


def plural(n: int, word: str, many: Optional[str] = None) -> str:
  """'1 image', '2 images' ('category' -> 'categories' with many given)."""
  return f"{n} {word if n == 1 else (many or word + 's')}"


# ---------------------------------------------------------------------------------------------
# Metrics against chance.

def chance_level(key: str, positive_share: Optional[float]) -> Optional[float]:
  """What a metric (auroc, f1_max, ap, aupro) is worth by chance; None where it depends on a
  positive share that is unknown."""
  if key == "auroc":
    return 0.5
  if key == "aupro":
    return AUPRO_CHANCE
  p = number(positive_share)
  if p is None or not 0.0 < p <= 1.0:
    return None
  return 2 * p / (1 + p) if key == "f1_max" else p if key == "ap" else None


def shade(value, chance: Optional[float]) -> str:
  """A cell's style and title: green deepening with the share of the way from chance to perfect,
  a pale red at or below chance, none where chance is unknown (a raw value says nothing)."""
  v = number(value)
  if v is None:
    return ""
  if chance is None:
    return ' title="chance level unknown"'
  title = f' title="chance {100 * chance:.1f}"'
  if v <= chance + 1e-12:
    return f' class="chance" style="background:rgba(210,71,60,0.16)"{title}'
  gain = min((v - chance) / max(1.0 - chance, 1e-12), 1.0)
  return f' style="background:rgba(46,160,90,{0.04 + 0.5 * gain ** 2:.3f})"{title}'


# ---------------------------------------------------------------------------------------------
# Pictures drawn as inline SVG.

def histogram_svg(groups: Sequence[Tuple[str, Sequence[float], str]],
                  lines: Sequence[Tuple[float, str, str]] = (), bins: int = 30,
                  width: int = 560, height: int = 170, gid: str = "histogram") -> str:
  """Overlaid step histograms of score groups (label, values, colour) on one axis, with vertical
  lines (value, label, colour) for thresholds; '' when there is no finite score."""
  finite = [np.asarray([v for v in vals if number(v) is not None], float) for _, vals, _ in groups]
  every = np.concatenate(finite + [np.asarray([number(v) for v, _, _ in lines
                                               if number(v) is not None], float)])
  if not sum(f.size for f in finite):
    return ""
  lo, hi = float(every.min()), float(every.max())
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)
  counts = [np.histogram(f, edges)[0] for f in finite]
  top = max(1, max(int(c.max()) for c in counts if c.size))
  left, right, bottom, head = 34, 10, 26, 22
  w, h = width - left - right, height - bottom - head
  x = lambda v: left + (v - lo) / (hi - lo) * w
  y = lambda c: head + h - c / top * h
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" id="{esc(gid)}" '
           f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
           f'<line x1="{left}" y1="{head + h}" x2="{left + w}" y2="{head + h}" stroke="#98a2b3"/>',
           f'<text x="{left - 4}" y="{head + 4}" text-anchor="end" class="tick">{top}</text>',
           f'<text x="{left - 4}" y="{head + h}" text-anchor="end" class="tick">0</text>']
  for v, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
    parts.append(f'<text x="{x(v):.1f}" y="{head + h + 14}" text-anchor="{anchor}" '
                 f'class="tick">{v:.3g}</text>')
  legend_x = left
  for (label, _, colour), c in zip(groups, counts):
    pts = [f"{x(edges[0]):.1f},{y(0):.1f}"]
    for i, k in enumerate(c):
      pts += [f"{x(edges[i]):.1f},{y(k):.1f}", f"{x(edges[i + 1]):.1f},{y(k):.1f}"]
    pts.append(f"{x(edges[-1]):.1f},{y(0):.1f}")
    parts.append(f'<polygon class="bars" points="{" ".join(pts)}" fill="{colour}" '
                 f'fill-opacity="0.28" stroke="{colour}" stroke-width="1.3"><title>{esc(label)}: '
                 f'{int(c.sum())}</title></polygon>')
    parts.append(f'<rect x="{legend_x}" y="5" width="10" height="10" fill="{colour}"/>'
                 f'<text x="{legend_x + 14}" y="14" class="key">{esc(label)} ({int(c.sum())})</text>')
    legend_x += 24 + 7 * len(f"{label} ({int(c.sum())})")
  for v, label, colour in lines:
    if number(v) is None:
      continue
    parts.append(f'<line class="threshold" x1="{x(v):.1f}" y1="{head - 2}" x2="{x(v):.1f}" '
                 f'y2="{head + h}" stroke="{colour}" stroke-width="1.6" stroke-dasharray="4 3">'
                 f'<title>{esc(label)} {v:.4g}</title></line>')
    parts.append(f'<text x="{legend_x}" y="14" class="key" fill="{colour}">┆ {esc(label)} '
                 f'{v:.3g}</text>')
    legend_x += 24 + 7 * len(f"{label} {v:.3g}")
  parts.append(f'<text x="{left + w}" y="{height - 2}" text-anchor="end" class="tick">'
               "anomaly score</text></svg>")
  return "".join(parts)


def _rgb(c) -> str:
  return f"rgb({c[0]},{c[1]},{c[2]})"


def legend_html(lo: float, hi: float, threshold: Optional[float], what: str,
                ground_truth: bool) -> str:
  """The overlays' key: the colour bar from lo to hi (transparent at the bottom, where the part
  shows through), a tick at the threshold, and what the contour and the green line mean."""
  stops = ", ".join(f"{_rgb(c)} {100 * u:.0f}%" for u, c in overlays.legend_stops())
  tick = ""
  if number(threshold) is not None and lo <= threshold <= hi and hi > lo:
    tick = (f'<span class="tick-mark" style="left:{100 * (threshold - lo) / (hi - lo):.2f}%" '
            f'title="threshold {threshold:.4g}"></span>')
  keys = [f'<span class="key"><i style="background:{_rgb(overlays.CONTOUR)}" class="line"></i>'
          f"contour: map ≥ {num(threshold)} ({esc(what)})</span>"] if number(threshold) is not \
      None else []
  if ground_truth:
    keys.append(f'<span class="key"><i style="background:{_rgb(overlays.GROUND_TRUTH)}" '
                'class="line"></i>ground truth</span>')
  return (f'<div class="legend"><div class="colourbar"><div class="ramp" '
          f'style="background:linear-gradient(to right, {stops})">{tick}</div>'
          f'<div class="ends"><span>{lo:.3g}</span><span>map value</span><span>{hi:.3g}</span>'
          f'</div><div class="dim small">the colour fades out towards {lo:.3g}, where the part '
          f'shows as it is</div></div>{"".join(keys)}</div>')


# ---------------------------------------------------------------------------------------------
# The document.

def style() -> str:
  """The pages' stylesheet, shipped beside this module (report.css) and inlined."""
  return importlib.resources.files("fiseclip_jax.outputs").joinpath("report.css").read_text(
      encoding="utf-8")


def document(title: str, body: str, footer: str) -> str:
  """A whole self-contained page around body."""
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
          f"<title>{esc(title)}</title><style>{style()}</style></head>\n"
          f"<body><main>\n{body}\n<footer>{esc(footer)}</footer>\n</main></body></html>\n")

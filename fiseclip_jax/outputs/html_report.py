"""report.html: a run's numbers, curves and example maps on one page, for a person to look at.

Built from what a benchmark run leaves in its --out folder (results.json, curves/<cat>.json,
report/<cat>/examples.json and the thumbnails it names) and rebuilt after every category, so any
subset of categories (none included) makes a page and every optional piece may be missing. The page
is self-contained (inline CSS, no JavaScript, no fonts to fetch) and links only by relative paths,
so the folder can be moved, zipped or opened from disk. Every file is written whole to a temporary
name and renamed (`core.files.atomic_write`): a kill leaves the old file or the new one.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import html
import importlib.resources
import io
import json
import os
import re
import urllib.parse
from typing import Dict, List, Optional, Tuple

import numpy as np

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs.results import HEADERS, METRIC_COLUMNS, RESULTS_JSON, mean_metrics

REPORT_HTML = "report.html"
MISSING_MATPLOTLIB = "report.html needs matplotlib: pip install 'fiseclip-jax[viz]'"
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
EXAMPLE_ROWS = (("good_highest", "Highest-scoring good images",
                 "normal images the model found most anomalous (false-alarm risk)"),
                ("defective_lowest", "Lowest-scoring defective images",
                 "defective images the model found least anomalous (missed-defect risk)"))


class ReportUnavailable(RuntimeError):
  """report.html cannot be built here (matplotlib, an optional extra, is not installed)."""


# ---------------------------------------------------------------------------------------------
# Reading what the run left (every piece optional).

def read_json(path: str) -> Optional[dict]:
  """The JSON object in path, or None if it is absent or not a readable JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError):
    return None
  return doc if isinstance(doc, dict) else None


def _get(d, *keys):
  """d[k0][k1]..., None where any level is missing or not a dict."""
  for k in keys:
    if not isinstance(d, dict):
      return None
    d = d.get(k)
  return d


def _number(x) -> Optional[float]:
  """A finite float, or None (null, NaN, text, ...)."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x) if np.isfinite(x) else None


def curve_points(curves: Optional[dict], kind: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(x, y) of one curve kind, or None where it is absent, null, malformed or shorter than 2."""
  spec = next(c for c in CURVES if c[0] == kind)
  curve = _get(curves, spec[1], spec[2])
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


def safe_name(cat: str) -> bool:
  """Whether a category name can be a single folder name (no separators, not '.' or '..')."""
  return bool(cat) and cat not in (".", "..") and "/" not in cat and os.sep not in cat \
      and "\0" not in cat


# ---------------------------------------------------------------------------------------------
# Figures.

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
  value = _number(_get(metrics, spec[1], spec[5]))
  return spec[6] if value is None else f"{spec[6]} {100 * value:.1f}"


def curves_figure(curves: Optional[dict], metrics: Optional[dict]):
  """(Figure, number of curves drawn): ROC, PR and PRO side by side; absent curves are skipped."""
  Figure = _pyplot_free_figure()
  fig = Figure(figsize=(10.2, 3.4))
  axes = fig.subplots(1, 3)
  n = 0
  for kind, level, _, _, _, _, _, panel in CURVES:
    points = curve_points(curves, kind)
    if points is None:
      continue
    colour = COLOURS["pro" if kind == "pro" else level]
    line, = axes[panel].plot(*points, lw=1.6, color=colour, label=legend_label(kind, metrics),
                             solid_joinstyle="round")
    line.set_gid(f"curve-{kind}")
    n += 1
  for i, (ax, (title, xlabel, ylabel)) in enumerate(zip(axes, PANELS)):
    if i == 0:
      ax.plot([0, 1], [0, 1], lw=0.8, ls=(0, (3, 3)), color="#9aa0a6")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xticks=TICKS, yticks=TICKS, xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, lw=0.5, color="#e3e6ea")
    ax.tick_params(labelsize=8, length=2)
    for side in ("top", "right"):
      ax.spines[side].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="lower right" if i != 1 else "lower left", fontsize=8, frameon=False)
    else:
      ax.text(0.5, 0.5, "not available", ha="center", va="center", color="#9aa0a6",
              transform=ax.transAxes)
  # Fixed margins, not tight_layout: that lays every label out again and doubles the cost.
  fig.subplots_adjust(left=0.055, right=0.975, bottom=0.15, top=0.91, wspace=0.3)
  return fig, n


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


def figure_key(curves: Optional[dict], metrics: Optional[dict]) -> str:
  """A digest of everything a figure shows, so an unchanged category's figure is not redrawn."""
  import matplotlib
  doc = {"curves": curves, "metrics": metrics, "code": _code_digest(),
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


def write_curves_svg(path: str, curves: Optional[dict], metrics: Optional[dict]) -> int:
  """Write (or keep, if current) a category's curves figure; the number of curves it holds. With
  no curve at all no figure is kept (and a stale one is removed)."""
  n_present = sum(curve_points(curves, c[0]) is not None for c in CURVES)
  if n_present == 0:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return 0
  key = figure_key(curves, metrics)
  if svg_is_current(path, key):
    return n_present
  fig, n = curves_figure(curves, metrics)
  atomic_write(path, figure_svg(fig, key).encode("utf-8"))
  return n


# ---------------------------------------------------------------------------------------------
# HTML pieces (each a pure function of the data it shows).

def esc(x) -> str:
  return html.escape(str(x), quote=True)


def href(rel_path: str) -> str:
  """A relative path as an attribute value: '/'-separated, percent-encoded, HTML-escaped."""
  return esc(urllib.parse.quote(rel_path.replace(os.sep, "/")))


def anchor(cat: str) -> str:
  """The id of a category's section: other characters as '.<hex>', so no two names share one."""
  return "cat-" + re.sub(r"[^A-Za-z0-9_-]", lambda m: f".{ord(m.group()):x}", cat)


def pct(x) -> str:
  v = _number(x)
  return "-" if v is None else f"{100 * v:.1f}"


def num(x) -> str:
  v = _number(x)
  return "-" if v is None else f"{v:.4g}"


def shade(x) -> str:
  """A cell style whose green deepens with the metric, so strong and weak categories stand out."""
  v = _number(x)
  if v is None:
    return ""
  return f' style="background:rgba(46,160,90,{0.04 + 0.5 * min(max(v, 0.0), 1.0) ** 3:.3f})"'


def _asked_fpr(at_fpr):
  """The FPR a threshold was asked for (what the column means), else the one it reached."""
  asked = _number(_get(at_fpr, "asked_fpr"))
  return asked if asked is not None else _number(_get(at_fpr, "fpr"))


def _fpr_label(fprs: List[float]) -> str:
  """'@ FPR 5%' when every category used one FPR, else '@ FPR'."""
  unique = sorted(set(fprs))
  return f"@ FPR {100 * unique[0]:g}%" if len(unique) == 1 else "@ FPR"


def metrics_table(categories: Dict[str, dict], mean: dict) -> str:
  """Table 1's columns in percent, then images, SeCLIP-only images and speed, then thresholds."""
  fprs = [_asked_fpr(_get(r, "thresholds", "image_at_fpr")) for r in categories.values()]
  fprs = [f for f in fprs if f is not None]
  groups = (("metrics, percent", HEADERS), ("run", ("images", "SeCLIP-only", "img/s")),
            ("thresholds, anomaly score", ("im-F1max", "px-F1max", f"im {_fpr_label(fprs)}")))
  top = "".join(f'<th colspan="{len(cols)}" class="group">{esc(g)}</th>' for g, cols in groups)
  sub = "".join(f"<th>{esc(c)}</th>" for _, cols in groups for c in cols)
  rows = [_table_row(f'<a href="#{anchor(cat)}">{esc(cat)}</a>', r, len(set(fprs)) > 1)
          for cat, r in categories.items()]
  if categories:
    mean_r = {"metrics": mean,
              "n_images": sum(int(_number(r.get("n_images")) or 0) for r in categories.values()),
              "seclip_only": {"total": sum(int(_number(_get(r, "seclip_only", "total")) or 0)
                                           for r in categories.values())}}
    rows.append(_table_row("mean", mean_r, False).replace("<tr>", '<tr class="mean">', 1))
  else:
    n_cols = 1 + sum(len(cols) for _, cols in groups)
    rows.append(f'<tr><td colspan="{n_cols}" class="empty">no category finished yet</td></tr>')
  return (f'<table class="metrics"><thead><tr><th rowspan="2">category</th>{top}</tr>'
          f"<tr>{sub}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def _table_row(name_html: str, r: dict, show_fpr: bool) -> str:
  m = r.get("metrics") if isinstance(r, dict) else None
  cells = [f"<td{shade(_get(m, lvl, key))}>{pct(_get(m, lvl, key))}</td>"
           for lvl, key in METRIC_COLUMNS]
  so = r.get("seclip_only") or {}
  so_title = esc(f"no candidates: {num(_get(so, 'no_candidates'))}, "
                 f"all masked: {num(_get(so, 'all_masked'))}")
  at_fpr = _get(r, "thresholds", "image_at_fpr")
  fpr = _asked_fpr(at_fpr)
  fpr_note = f" @{100 * fpr:g}%" if show_fpr and fpr is not None else ""
  run = [num(r.get("n_images")), f'<span title="{so_title}">{num(_get(so, "total"))}</span>',
         num(_get(r, "timing", "images_per_s"))]
  thresholds = [num(_get(r, "thresholds", "image_f1_max")),
                num(_get(r, "thresholds", "pixel_f1_max")),
                num(_get(at_fpr, "threshold")) + esc(fpr_note)]
  return (f'<tr><th scope="row">{name_html}</th>' + "".join(cells)
          + "".join(f'<td class="aux">{e}</td>' for e in run)
          + "".join(f'<td class="aux thr">{e}</td>' for e in thresholds) + "</tr>")


def header_html(doc: dict, generated: str, links: List[Tuple[str, str]]) -> str:
  """Title, dataset, time of generation, checkpoint, versions and links to the raw results."""
  dataset = doc.get("dataset") or "benchmark"
  ck = doc.get("checkpoint") or {}
  weights, sha = _get(ck, "weights"), _get(ck, "sha256")
  facts = [("generated", f'<span class="generated">{esc(generated)}</span>')]
  if weights:
    facts.append(("weights", f'<span title="{esc(weights)}">{esc(os.path.basename(str(weights)))}'
                             "</span>"))
  if sha:
    facts.append(("sha256", f'<code title="{esc(sha)}">{esc(str(sha)[:12])}</code>'))
  versions = doc.get("versions")
  if isinstance(versions, dict) and versions:
    facts.append(("versions", esc(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))))
  if links:
    facts.append(("raw", " · ".join(f'<a href="{href(p)}">{esc(name)}</a>' for name, p in links)))
  dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in facts)
  # The programs name random weights "random:<model>:seed<n>" (--random_weights, the demo).
  warn = ('<p class="warn"><b>RANDOM WEIGHTS</b>: the pipeline ran end to end on an untrained '
          "model; the numbers below are meaningless.</p>"
          if str(weights or "").startswith("random:") else "")
  return (f"<header><h1>FiSeCLIP-JAX <span class=\"dim\">·</span> {esc(dataset)}</h1>"
          f'<dl class="facts">{dl}</dl>{warn}</header>')


def _value(v) -> str:
  if isinstance(v, (list, tuple)):
    return ",".join(str(x) for x in v)
  return "default" if v is None else str(v)


def config_html(config: Optional[dict]) -> str:
  """The method's settings as name/value chips (all of them: each is a knob of the paper)."""
  if not isinstance(config, dict) or not config:
    return ""
  chips = "".join(f'<span class="chip"><b>{esc(k)}</b> {esc(_value(v))}</span>'
                  for k, v in config.items() if not isinstance(v, dict))
  return f'<section class="card"><h2>Settings</h2><div class="chips">{chips}</div></section>'


def examples_html(out_dir: str, examples: Optional[dict]) -> str:
  """Two rows of thumbnails (each already shows its heat map) with score and file name."""
  if not isinstance(examples, dict):
    return ""
  parts = []
  for key, title, note in EXAMPLE_ROWS:
    items = examples.get(key)
    if not isinstance(items, list) or not items:
      continue
    figs = "".join(_thumb(out_dir, it) for it in items if isinstance(it, dict))
    parts.append(f'<h3>{esc(title)} <span class="dim">{esc(note)}</span></h3>'
                 f'<div class="thumbs">{figs}</div>')
  return "".join(parts)


def _thumb(out_dir: str, item: dict) -> str:
  path = str(item.get("path") or "")
  name = str(item.get("name") or os.path.basename(path) or "?")
  caption = (f'<figcaption><b>{esc(num(item.get("score")))}</b> '
             f'<span title="{esc(path)}">{esc(name)}</span></figcaption>')
  image = item.get("image")
  full = (image if os.path.isabs(image) else os.path.join(out_dir, image)) \
      if isinstance(image, str) and image else None
  if full is None or not os.path.isfile(full):
    return f'<figure><div class="noimg">no thumbnail</div>{caption}</figure>'
  rel = os.path.relpath(full, out_dir)
  return (f'<figure><img src="{href(rel)}" alt="{esc(name)}" loading="lazy">{caption}</figure>')


def category_html(out_dir: str, cat: str, r: dict, n_curves: int, svg_rel: Optional[str],
                  examples: Optional[dict]) -> str:
  """A category's section: a one-line summary, its curves and its example maps."""
  m = r.get("metrics") if isinstance(r, dict) else None
  facts = [f"{num(r.get('n_images'))} images"]
  facts += [f"{name} {pct(_get(m, lvl, key))}" for name, lvl, key in
            (("im-AUROC", "image", "auroc"), ("px-AUROC", "pixel", "auroc"),
             ("AU-PRO", "pixel", "aupro")) if _number(_get(m, lvl, key)) is not None]
  if _number(_get(r, "seclip_only", "total")):
    facts.append(f"SeCLIP-only {num(_get(r, 'seclip_only', 'total'))}")
  if _number(_get(r, "timing", "seconds")) is not None:
    facts.append(f"{num(_get(r, 'timing', 'seconds'))} s")
  if isinstance(r.get("bank"), list) and r["bank"]:
    facts.append(f"bank of {len(r['bank'])}")
  body = [f'<p class="dim">{esc(" · ".join(facts))}</p>']
  if svg_rel and n_curves:
    body.append(f'<img class="curves" src="{href(svg_rel)}" alt="{esc(cat)} curves">')
  else:
    body.append('<p class="note">No curves for this category (none written, or no defective '
                "image to draw them from).</p>")
  body.append(examples_html(out_dir, examples))
  skipped = r.get("skipped")
  if isinstance(skipped, list) and skipped:
    items = "".join(f"<li>{esc(p)}</li>" for p in skipped)
    body.append(f"<details><summary>{len(skipped)} skipped image(s)</summary><ul>{items}</ul>"
                "</details>")
  return (f'<section class="card" id="{anchor(cat)}"><h2>{esc(cat)}</h2>' + "".join(body)
          + "</section>")




def style() -> str:
  """The page's stylesheet, shipped beside this module (report.css) and inlined."""
  return importlib.resources.files("fiseclip_jax.outputs").joinpath("report.css").read_text(encoding="utf-8")


def page_html(doc: dict, body: List[str], generated: str, links: List[Tuple[str, str]]) -> str:
  """The whole page around the sections."""
  dataset = doc.get("dataset") or "benchmark"
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
          f"<title>FiSeCLIP-JAX report: {esc(dataset)}</title><style>{style()}</style></head>\n"
          f"<body><main>\n{header_html(doc, generated, links)}\n" + "\n".join(body)
          + "\n<footer>written by fiseclip_jax.outputs.html_report; numbers in percent unless noted; "
          "thresholds are raw anomaly scores</footer>\n</main></body></html>\n")


# ---------------------------------------------------------------------------------------------

def write_report(out_dir: str) -> str:
  """Build <out_dir>/report.html (and report/<cat>/curves.svg) from the run's files; its path.

  Cheap to call after every category: a category's figure is redrawn only when its curves or
  metrics changed. Raises ReportUnavailable, before writing anything, where matplotlib is missing.
  """
  _pyplot_free_figure()
  doc = read_json(os.path.join(out_dir, RESULTS_JSON)) or {}
  cats = doc.get("categories")
  categories = {str(k): v for k, v in cats.items() if isinstance(v, dict)} \
      if isinstance(cats, dict) else {}
  mean = doc.get("mean")
  if not isinstance(mean, dict) or not mean:
    mean = mean_metrics({k: v for k, v in categories.items() if isinstance(v.get("metrics"), dict)})
  sections = []
  for cat, r in categories.items():
    n, svg_rel, examples = 0, None, None
    if safe_name(cat):
      curves = read_json(os.path.join(out_dir, "curves", f"{cat}.json"))
      svg_rel = os.path.join("report", cat, "curves.svg")
      n = write_curves_svg(os.path.join(out_dir, svg_rel), curves, r.get("metrics"))
      examples = read_json(os.path.join(out_dir, "report", cat, "examples.json"))
    sections.append(category_html(out_dir, cat, r, n, svg_rel, examples))
  links = [(name, name) for name in (RESULTS_JSON, "results.csv")
           if os.path.isfile(os.path.join(out_dir, name))]
  generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
  table = (f'<section class="card"><h2>Metrics <span class="dim">{len(categories)} '
           f"categor{'y' if len(categories) == 1 else 'ies'}</span></h2>"
           f"{metrics_table(categories, mean)}</section>")
  body = [table, config_html(doc.get("config"))] + sections
  path = os.path.join(out_dir, REPORT_HTML)
  atomic_write(path, page_html(doc, body, generated, links).encode("utf-8"))
  return path

"""report.html: a run's numbers, curves and example maps on one page, for a person to look at.

Built from what a benchmark run leaves in its --out folder (results.json, curves/<cat>.json,
scores/<cat>.csv, report/<cat>/examples.json and the pictures it names) and rebuilt after every
category, so any subset of categories (none included) makes a page and every optional piece may be
missing. Metrics are shaded against their chance level (AUROC 50, F1-max the F1 of flagging every
image, AP and the PR baseline the positive share); each category shows its curves, a histogram of
its image scores with the thresholds, the counts at the F1-max threshold, a row per defect type, the
overlays' colour key, and three rows of examples (false-alarm risk, missed, caught) linking to
their full-size overlay and original. The page is self-contained (`page.py`) and links only by
relative paths. Every file is written whole and renamed (`core.files.atomic_write`).
"""
from __future__ import annotations

import csv
import datetime
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs import page
from fiseclip_jax.outputs.curves_figure import require_matplotlib, write_curves_svg
from fiseclip_jax.outputs.page import (chance_level, esc, get, href, num,
                                       number, pct, plural, read_json, shade)
from fiseclip_jax.outputs.results import HEADERS, METRIC_COLUMNS, RESULTS_JSON, mean_metrics

REPORT_HTML = "report.html"
EXAMPLE_ROWS = (("good_highest", "Highest-scoring good images",
                 "normal images the model found most anomalous (false-alarm risk)"),
                ("defective_lowest", "Lowest-scoring defective images",
                 "defective images the model found least anomalous (missed-defect risk)"),
                ("defective_highest", "Highest-scoring defective images",
                 "defects the model caught most clearly"))
GOOD_COLOUR, DEFECT_COLOUR = "#2866a8", "#d2473c"


def safe_name(cat: str) -> bool:
  """Whether a category name can be a single folder name (no separators, not '.' or '..')."""
  return bool(cat) and cat not in (".", "..") and "/" not in cat and os.sep not in cat \
      and "\0" not in cat



def anchor(cat: str) -> str:
  """The id of a category's section: other characters as '.<hex>', so no two names share one."""
  return "cat-" + re.sub(r"[^A-Za-z0-9_-]", lambda m: f".{ord(m.group()):x}", cat)



def category_chances(r: dict) -> Dict[Tuple[str, str], Optional[float]]:
  """Each table metric's chance level for a category, from its positive shares."""
  share = r.get("positive_share") if isinstance(r, dict) else None
  return {(lvl, key): chance_level(key, get(share, lvl)) for lvl, key in METRIC_COLUMNS}


def _asked_fpr(at_fpr):
  """The FPR a threshold was asked for (what the column means), else the one it reached."""
  asked = number(get(at_fpr, "asked_fpr"))
  return asked if asked is not None else number(get(at_fpr, "fpr"))


def _fpr_label(fprs: List[float]) -> str:
  """'@ FPR 5%' when every category used one FPR, else '@ FPR'."""
  unique = sorted(set(fprs))
  return f"@ FPR {100 * unique[0]:g}%" if len(unique) == 1 else "@ FPR"


def metrics_table(categories: Dict[str, dict], mean: dict) -> str:
  """Table 1's columns in percent, then images, SeCLIP-only images and speed, then thresholds;
  in a box that scrolls sideways on a narrow screen."""
  fprs = [_asked_fpr(get(r, "thresholds", "image_at_fpr")) for r in categories.values()]
  fprs = [f for f in fprs if f is not None]
  groups = (("metrics, percent", HEADERS), ("run", ("images", "SeCLIP-only", "img/s")),
            ("thresholds, anomaly score", ("im-F1max", "px-F1max", f"im {_fpr_label(fprs)}")))
  top = "".join(f'<th colspan="{len(cols)}" class="group">{esc(g)}</th>' for g, cols in groups)
  sub = "".join(f"<th>{esc(c)}</th>" for _, cols in groups for c in cols)
  chances = {cat: category_chances(r) for cat, r in categories.items()}
  rows = [_table_row(f'<a href="#{anchor(cat)}">{esc(cat)}</a>', r, len(set(fprs)) > 1, chances[cat])
          for cat, r in categories.items()]
  if categories:
    mean_r = {"metrics": mean,
              "n_images": sum(int(number(r.get("n_images")) or 0) for r in categories.values()),
              "seclip_only": {"total": sum(int(number(get(r, "seclip_only", "total")) or 0)
                                           for r in categories.values())}}
    # The mean of the metrics against the mean of their chance levels (both means over the same
    # categories; unknown where any category's is).
    mean_chance = {}
    for col in METRIC_COLUMNS:
      cs = [chances[c][col] for c, r in categories.items()
            if number(get(r, "metrics", *col)) is not None]
      mean_chance[col] = float(np.mean(cs)) if cs and None not in cs else None
    rows.append(_table_row("mean", mean_r, False, mean_chance).replace("<tr>", '<tr class="mean">', 1))
  else:
    n_cols = 1 + sum(len(cols) for _, cols in groups)
    rows.append(f'<tr><td colspan="{n_cols}" class="empty">no category finished yet</td></tr>')
  return (f'<div class="scroll"><table class="metrics"><thead><tr><th rowspan="2">category</th>'
          f"{top}</tr><tr>{sub}</tr></thead>\n<tbody>\n" + "\n".join(rows)
          + "\n</tbody></table></div>"
          '<p class="dim small">Green: above chance, deeper the nearer to 100; red: at or below '
          "chance (AUROC 50; F1-max: the F1 of flagging every image; AP: the positive share; "
          "AU-PRO 15). Hover a cell for its chance level.</p>")


def _table_row(name_html: str, r: dict, show_fpr: bool, chances: dict) -> str:
  m = r.get("metrics") if isinstance(r, dict) else None
  cells = [f"<td{shade(get(m, lvl, key), chances.get((lvl, key)))}>{pct(get(m, lvl, key))}</td>"
           for lvl, key in METRIC_COLUMNS]
  so = r.get("seclip_only") or {}
  so_title = esc(f"no candidates: {num(get(so, 'no_candidates'))}, "
                 f"all masked: {num(get(so, 'all_masked'))}")
  at_fpr = get(r, "thresholds", "image_at_fpr")
  fpr = _asked_fpr(at_fpr)
  fpr_note = f" @{100 * fpr:g}%" if show_fpr and fpr is not None else ""
  run = [num(r.get("n_images")), f'<span title="{so_title}">{num(get(so, "total"))}</span>',
         num(get(r, "timing", "images_per_s"))]
  thresholds = [num(get(r, "thresholds", "image_f1_max")),
                num(get(r, "thresholds", "pixel_f1_max")),
                num(get(at_fpr, "threshold")) + esc(fpr_note)]
  return (f'<tr><th scope="row">{name_html}</th>' + "".join(cells)
          + "".join(f'<td class="aux">{e}</td>' for e in run)
          + "".join(f'<td class="aux thr">{e}</td>' for e in thresholds) + "</tr>")


def header_html(doc: dict, generated: str, links: List[Tuple[str, str]]) -> str:
  """Title, dataset, time of generation, checkpoint, versions and links to the raw results."""
  dataset = doc.get("dataset") or "benchmark"
  ck = doc.get("checkpoint") or {}
  weights, sha = get(ck, "weights"), get(ck, "sha256")
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


def read_scores(path: str) -> Optional[Tuple[List[float], List[float]]]:
  """(good scores, defective scores) of a category's scores/<cat>.csv, or None."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error):
    return None
  good, bad = [], []
  for row in rows:
    try:
      score, label = float(row["score"]), int(row["label"])
    except (KeyError, TypeError, ValueError):
      continue
    (bad if label == 1 else good if label == 0 else []).append(score)
  return (good, bad) if good or bad else None


def scores_html(r: dict, scores: Optional[Tuple[List[float], List[float]]]) -> str:
  """The image scores' histogram (good, defective) with the thresholds, and the counts at F1-max."""
  parts = []
  if scores is not None:
    t_f1 = get(r, "thresholds", "image_f1_max")
    t_fpr = get(r, "thresholds", "image_at_fpr", "threshold")
    fpr = _asked_fpr(get(r, "thresholds", "image_at_fpr"))
    lines = [(t_f1, "F1-max", "#1f2328")]
    if number(t_fpr) is not None and fpr is not None:
      lines.append((t_fpr, f"FPR {100 * fpr:g}%", "#8a6d00"))
    parts.append(page.histogram_svg([("good", scores[0], GOOD_COLOUR),
                                     ("defective", scores[1], DEFECT_COLOUR)], lines))
  c = r.get("confusion_at_f1_max")
  if isinstance(c, dict) and all(number(c.get(k)) is not None for k in ("tp", "fp", "fn", "tn")):
    tp, fp, fn, tn = (int(c[k]) for k in ("tp", "fp", "fn", "tn"))
    parts.append('<table class="small-table confusion"><caption>at the image F1-max threshold '
                 f'{esc(num(get(r, "thresholds", "image_f1_max")))}</caption><tr><th></th>'
                 "<th>flagged</th><th>passed</th></tr>"
                 f'<tr><th scope="row">defective</th><td class="ok">{tp} caught</td>'
                 f'<td class="bad">{fn} missed</td></tr>'
                 f'<tr><th scope="row">good</th><td class="bad">{fp} false alarm'
                 f'{"" if fp == 1 else "s"}</td><td class="ok">{tn} passed</td></tr></table>')
  return f'<div class="row">{"".join(parts)}</div>' if parts else ""


def defects_html(by_defect) -> str:
  """A row per defect type: images, caught at F1-max, score range, AUROC against the good ones."""
  if not isinstance(by_defect, dict) or not by_defect:
    return ""
  rows = []
  for d, row in by_defect.items():
    if not isinstance(row, dict):
      continue
    n, flagged = number(row.get("n")), number(row.get("flagged"))
    caught = "-" if flagged is None or n is None else (
        f"{int(flagged)} of {int(n)} flagged" if d == "good" else f"{int(flagged)} of {int(n)}")
    rows.append(f'<tr><th scope="row">{esc(d)}</th><td>{num(n)}</td><td>{esc(caught)}</td>'
                f'<td>{num(row.get("min"))} – {num(row.get("max"))}</td><td>{num(row.get("mean"))}</td>'
                f'<td>{pct(row.get("auroc")) if d != "good" else ""}</td></tr>')
  return ('<div class="scroll"><table class="small-table"><caption>per defect type (caught: '
          "flagged at the image F1-max threshold)</caption><tr><th>type</th><th>images</th>"
          "<th>caught</th><th>score range</th><th>mean</th><th>im-AUROC vs good</th></tr>"
          + "".join(rows) + "</table></div>")


def examples_html(out_dir: str, examples: Optional[dict]) -> str:
  """Rows of example overlays, each linking to its full-size overlay and original."""
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


def _existing(out_dir: str, rel) -> Optional[str]:
  """rel (a path under out_dir) if it names a file there, else None."""
  if not isinstance(rel, str) or not rel or os.path.isabs(rel):
    return None
  return rel if os.path.isfile(os.path.join(out_dir, rel)) else None


def _thumb(out_dir: str, item: dict) -> str:
  path = str(item.get("path") or "")
  name = str(item.get("name") or os.path.basename(path) or "?")
  links = [(label, _existing(out_dir, item.get(k))) for label, k in (("full size", "full"),
                                                                      ("original", "original"))]
  links_html = " · ".join(f'<a href="{href(rel)}">{esc(label)}</a>' for label, rel in links if rel)
  caption = (f'<figcaption><b>{esc(num(item.get("score")))}</b> '
             f'<span class="name" title="{esc(path)}">{esc(name)}</span>'
             + (f'<span class="links">{links_html}</span>' if links_html else "") + "</figcaption>")
  thumb = _existing(out_dir, item.get("image"))
  if thumb is None:
    return f'<figure><div class="noimg">no thumbnail</div>{caption}</figure>'
  full = links[0][1] or thumb
  return (f'<figure><a href="{href(full)}"><img src="{href(thumb)}" alt="{esc(name)}" '
          f'loading="lazy"></a>{caption}</figure>')


def legend_for(r: dict) -> str:
  scale = r.get("overlay_scale") if isinstance(r, dict) else None
  lo, hi = number(get(scale, "lo")), number(get(scale, "hi"))
  if lo is None or hi is None:
    return ""
  return page.legend_html(lo, hi, number(get(scale, "contour")),
                          "the pixel F1-max threshold, picked on the test labels", True)


def category_html(out_dir: str, cat: str, r: dict, n_curves: int, svg_rel: Optional[str],
                  examples: Optional[dict], scores=None) -> str:
  """A category's section: a one-line summary, curves, scores, defect types, examples."""
  m = r.get("metrics") if isinstance(r, dict) else None
  n = number(r.get("n_images"))
  facts = [plural(int(n), "image") if n is not None else "- images"]
  facts += [f"{name} {pct(get(m, lvl, key))}" for name, lvl, key in
            (("im-AUROC", "image", "auroc"), ("px-AUROC", "pixel", "auroc"),
             ("AU-PRO", "pixel", "aupro")) if number(get(m, lvl, key)) is not None]
  if number(get(r, "seclip_only", "total")):
    facts.append(f"SeCLIP-only {num(get(r, 'seclip_only', 'total'))}")
  if number(get(r, "timing", "seconds")) is not None:
    facts.append(f"{num(get(r, 'timing', 'seconds'))} s")
  if isinstance(r.get("bank"), list) and r["bank"]:
    facts.append(f"bank of {len(r['bank'])}")
  body = [f'<p class="dim">{esc(" · ".join(facts))}</p>']
  if svg_rel and n_curves:
    body.append(f'<a href="{href(svg_rel)}"><img class="curves" src="{href(svg_rel)}" '
                f'alt="{esc(cat)} curves"></a>')
  else:
    body.append('<p class="note">No curves for this category (none written, or no defective '
                "image to draw them from).</p>")
  body += [scores_html(r, scores), defects_html(r.get("by_defect")), legend_for(r),
           examples_html(out_dir, examples)]
  skipped = r.get("skipped")
  if isinstance(skipped, list) and skipped:
    items = "".join(f"<li>{esc(p)}</li>" for p in skipped)
    body.append(f"<details><summary>{plural(len(skipped), 'skipped image')}</summary>"
                f"<ul>{items}</ul></details>")
  return (f'<section class="card" id="{anchor(cat)}"><h2>{esc(cat)}</h2>' + "".join(body)
          + "</section>")


# ---------------------------------------------------------------------------------------------

def write_report(out_dir: str) -> str:
  """Build <out_dir>/report.html (and report/<cat>/curves.svg) from the run's files; its path.

  Cheap to call after every category: a category's figure is redrawn only when its curves or
  metrics changed. Raises ReportUnavailable, before writing anything, where matplotlib is missing.
  """
  require_matplotlib()
  doc = read_json(os.path.join(out_dir, RESULTS_JSON)) or {}
  cats = doc.get("categories")
  categories = {str(k): v for k, v in cats.items() if isinstance(v, dict)} \
      if isinstance(cats, dict) else {}
  mean = doc.get("mean")
  if not isinstance(mean, dict) or not mean:
    mean = mean_metrics({k: v for k, v in categories.items() if isinstance(v.get("metrics"), dict)})
  sections = []
  for cat, r in categories.items():
    n, svg_rel, examples, scores = 0, None, None, None
    if safe_name(cat):
      curves = read_json(os.path.join(out_dir, "curves", f"{cat}.json"))
      svg_rel = os.path.join("report", cat, "curves.svg")
      n = write_curves_svg(os.path.join(out_dir, svg_rel), curves, r.get("metrics"),
                           r.get("positive_share"))
      examples = read_json(os.path.join(out_dir, "report", cat, "examples.json"))
      scores = read_scores(os.path.join(out_dir, "scores", f"{cat}.csv"))
    sections.append(category_html(out_dir, cat, r, n, svg_rel, examples, scores))
  links = [(name, name) for name in (RESULTS_JSON, "results.csv")
           if os.path.isfile(os.path.join(out_dir, name))]
  generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
  table = (f'<section class="card"><h2>Metrics <span class="dim">'
           f'{plural(len(categories), "category", "categories")}</span></h2>'
           f"{metrics_table(categories, mean)}</section>")
  body = [header_html(doc, generated, links), table, config_html(doc.get("config"))] + sections
  dataset = doc.get("dataset") or "benchmark"
  html_text = page.document(f"FiSeCLIP-JAX report: {dataset}", "\n".join(body),
                            "written by fiseclip_jax.outputs.html_report; numbers in percent unless "
                            "noted; thresholds are raw anomaly scores")
  path = os.path.join(out_dir, REPORT_HTML)
  atomic_write(path, html_text.encode("utf-8"))
  return path

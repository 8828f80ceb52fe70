"""report.html of a folder run: the review page of an engineer who scored a line's images.

Built at the end of `eval.folder` from what the run left in --out (run.json, scores.csv,
known_good.csv, skipped.csv, maps/<image>.png): the decision and how it was set, the counts per
decision, a histogram of the parts' scores (and of the known-good images' when the threshold came
from them) with the threshold, the overlays' colour key, then the parts sorted by score, most
anomalous first, with an NG / OK badge, the original beside the overlay (small copies under
report/thumbs/, each linking to its full-size file), and every part in a table. There are no
labels in a folder run, so there are no metrics here; the benchmark page has those.
"""
from __future__ import annotations

import csv
import datetime
import os
from typing import List, NamedTuple, Optional

from PIL import Image

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs import overlays, page
from fiseclip_jax.outputs.page import esc, get, href, number, plural

REPORT_HTML = "report.html"
CARDS = 120          # parts shown with pictures (the most anomalous first); the table lists all
THUMB_SIDE = 320     # the small copies' longest side
PART_COLOUR, GOOD_COLOUR = "#d2473c", "#2866a8"


class Part(NamedTuple):
  """One scored image as the page shows it."""
  path: str                      # relative to --images
  score: float
  decision: Optional[int]        # 1 NG, 0 OK, None: no image threshold
  normalized: Optional[float]
  n_ref: str


def read_rows(path: str) -> List[dict]:
  """The rows of a CSV written by the run ([] where it is absent or unreadable)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      return list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error):
    return []


def read_parts(out: str) -> List[Part]:
  """scores.csv as Parts, most anomalous first (ties by path)."""
  parts = []
  for r in read_rows(os.path.join(out, "scores.csv")):
    try:
      score = float(r["score"])
    except (KeyError, TypeError, ValueError):
      continue
    label = r.get("pred_label")
    norm = r.get("score_normalized")
    parts.append(Part(r.get("path", "?"), score, int(label) if label in ("0", "1") else None,
                      float(norm) if norm not in (None, "") else None, r.get("n_ref", "")))
  return sorted(parts, key=lambda p: (-p.score, p.path))


def known_good_scores(out: str) -> List[float]:
  out_scores = []
  for r in read_rows(os.path.join(out, "known_good.csv")):
    try:
      out_scores.append(float(r["score"]))
    except (KeyError, TypeError, ValueError):
      continue
  return out_scores


def badge(decision: Optional[int]) -> str:
  if decision is None:
    return '<span class="badge none" title="no image threshold: scores only">–</span>'
  return ('<span class="badge ng">NG</span>' if decision else '<span class="badge ok">OK</span>')


def _thumbnail(src: str, dst: str) -> bool:
  """A small copy of an image (RGB PNG), made once; whether it exists now."""
  if os.path.isfile(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
    return True
  try:
    with Image.open(src) as im:
      im = im.convert("RGB")
      im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
      overlays.save_png(dst, im)
  except (OSError, ValueError):
    return False
  return True


def _card(out: str, images: str, part: Part) -> str:
  """A part's card: badge, score, name, the original and the overlay side by side."""
  original = os.path.join(images, part.path)
  overlay_rel = os.path.join("maps", part.path + ".png")
  pics = []
  for kind, src, full_rel in (("original", original, os.path.relpath(original, out)),
                              ("overlay", os.path.join(out, overlay_rel), overlay_rel)):
    thumb_rel = os.path.join("report", "thumbs", f"{part.path}.{kind}.png")
    if os.path.isfile(src) and _thumbnail(src, os.path.join(out, thumb_rel)):
      pics.append(f'<a href="{href(full_rel)}" title="{kind}, full size"><img src="{href(thumb_rel)}" '
                  f'alt="{esc(kind)} of {esc(part.path)}" loading="lazy"></a>')
    else:
      pics.append(f'<div class="noimg">no {kind}</div>')
  norm = "" if part.normalized is None else f' <span class="dim">({part.normalized:.3f})</span>'
  return (f'<figure class="part">{badge(part.decision)} <b>{part.score:.4f}</b>{norm}'
          f'<div class="pair">{"".join(pics)}</div><figcaption><span class="name">'
          f"{esc(part.path)}</span></figcaption></figure>")


def _links(out: str, images: str, part: Part) -> str:
  overlay_rel = os.path.join("maps", part.path + ".png")
  links = [f'<a href="{href(os.path.relpath(os.path.join(images, part.path), out))}">original</a>']
  if os.path.isfile(os.path.join(out, overlay_rel)):
    links.append(f'<a href="{href(overlay_rel)}">overlay</a>')
  mask_rel = os.path.join("masks", part.path + ".png")
  if os.path.isfile(os.path.join(out, mask_rel)):
    links.append(f'<a href="{href(mask_rel)}">mask</a>')
  return " · ".join(links)


def decision_html(doc: dict, parts: List[Part]) -> str:
  """How the run decided, and how many parts fell on each side."""
  d = doc.get("decision") if isinstance(doc.get("decision"), dict) else {}
  t = number(d.get("image_threshold"))
  how = str(d.get("how") or "")
  counts = []
  if t is not None:
    ng = sum(p.decision == 1 for p in parts)
    counts = [f'<span class="count">{badge(1)} {ng}</span>',
              f'<span class="count">{badge(0)} {len(parts) - ng}</span>']
  else:
    counts = [f'<span class="count">{badge(None)} {len(parts)}</span>']
  lines = [f"<p>{' '.join(counts)} <span class=\"dim\">of {plural(len(parts), 'scored part')}"
           "</span></p>"]
  if t is None:
    lines.append('<p class="note">No image threshold: scores only. Pass --threshold VALUE, '
                 "--threshold_from GOOD_DIR (known-good images) or --threshold auto.</p>")
  else:
    lines.append(f"<p>NG iff score ≥ <b>{t:.6g}</b> <span class=\"dim\">({esc(how)})</span></p>")
  px = number(d.get("pixel_threshold"))
  if px is not None:
    lines.append(f"<p>defect regions (contour and masks/) where the map ≥ <b>{px:.6g}</b>, inside NG "
                 "parts only</p>")
  resolvable = number(d.get("resolvable_fpr"))
  asked = number(get(doc, "identity", "max_fpr"))
  if resolvable is not None and asked is not None and asked < resolvable:
    lines.append(f'<p class="warn">{plural(int(round(1 / resolvable)), "known-good image")} cannot '
                 f"resolve a false-positive rate of {asked:g}: the smallest they measure is "
                 f"{resolvable:.3g}.</p>")
  for key in ("skipped", "ignored_files", "seclip_only"):
    v = number(doc.get(key))
    if v:
      what = {"skipped": "unreadable image(s) skipped (skipped.csv)",
              "ignored_files": "other file(s) in the folder ignored",
              "seclip_only": "image(s) scored by SeCLIP alone (no reference)"}[key]
      lines.append(f'<p class="dim">{int(v)} {what}</p>')
  return f'<section class="card"><h2>Decision</h2>{"".join(lines)}</section>'


def header_html(doc: dict, generated: str) -> str:
  ident = doc.get("identity") if isinstance(doc.get("identity"), dict) else {}
  weights = str(ident.get("checkpoint_sha256") or "")
  facts = [("images", esc(ident.get("images", "?"))), ("class", esc(ident.get("class_name", "?"))),
           ("references", esc(get(ident, "config", "references") or "?")),
           ("generated", f'<span class="generated">{esc(generated)}</span>'),
           ("weights", f"<code>{esc(weights[:24])}</code>"),
           ("raw", " · ".join(f'<a href="{href(n)}">{esc(n)}</a>' for n in
                              ("scores.csv", "run.json", "skipped.csv")))]
  dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in facts)
  warn = ('<p class="warn"><b>RANDOM WEIGHTS</b>: the pipeline ran end to end on an untrained '
          "model; the scores below are meaningless.</p>" if weights.startswith("random:") else "")
  return (f'<header><h1>FiSeCLIP-JAX <span class="dim">·</span> review</h1>'
          f'<dl class="facts">{dl}</dl>{warn}</header>')


def scores_html(doc: dict, parts: List[Part], good: List[float]) -> str:
  t = number(get(doc, "decision", "image_threshold"))
  groups = [("scored parts", [p.score for p in parts], PART_COLOUR)]
  if good:
    groups.append(("known-good", good, GOOD_COLOUR))
  svg = page.histogram_svg(groups, [(t, "threshold", "#1f2328")] if t is not None else [])
  return f'<section class="card"><h2>Scores</h2>{svg}</section>' if svg else ""


def legend(doc: dict) -> str:
  ident = doc.get("identity") if isinstance(doc.get("identity"), dict) else {}
  px = number(get(doc, "decision", "pixel_threshold"))
  try:
    scale = overlays.ColourScale.for_run(str(ident.get("map_range") or "0,1"), px)
  except ValueError:
    return ""
  return page.legend_html(scale.lo, scale.hi, px, "the pixel threshold, drawn on NG parts only",
                          False)


def write_folder_report(out: str, images: str) -> str:
  """Build <out>/report.html (and its thumbnails) from the folder run in out; its path."""
  doc = page.read_json(os.path.join(out, "run.json")) or {}
  parts = read_parts(out)
  good = known_good_scores(out)
  generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
  shown = parts[:CARDS]
  cards = "".join(_card(out, images, p) for p in shown)
  more = (f'<p class="dim">the {plural(len(shown), "most anomalous part")} of {len(parts)}; '
          "every part is in the table below</p>" if len(parts) > len(shown) else "")
  with_norm = any(p.normalized is not None for p in parts)
  rows = "".join(f"<tr><td>{i + 1}</td><td>{badge(p.decision)}</td><td>{p.score:.4f}</td>"
                 + (f"<td>{'' if p.normalized is None else f'{p.normalized:.3f}'}</td>"
                    if with_norm else "")
                 + f'<th scope="row">{esc(p.path)}</th><td>{_links(out, images, p)}</td></tr>'
                 for i, p in enumerate(parts))
  table = ('<div class="scroll"><table class="small-table parts"><tr><th>#</th><th></th>'
           "<th>score</th>" + ("<th>normalized</th>" if with_norm else "")
           + f'<th class="left">image</th><th class="left">files</th></tr>{rows}</table></div>')
  skipped = read_rows(os.path.join(out, "skipped.csv"))
  skipped_html = ("" if not skipped else
                  f"<details><summary>{plural(len(skipped), 'skipped image')}</summary><ul>"
                  + "".join(f"<li>{esc(r.get('path'))}: {esc(r.get('reason'))}</li>" for r in skipped)
                  + "</ul></details>")
  body = [header_html(doc, generated), decision_html(doc, parts), scores_html(doc, parts, good),
          f'<section class="card"><h2>Parts <span class="dim">most anomalous first</span></h2>'
          f'{legend(doc)}{more}<div class="thumbs">{cards}</div></section>',
          f'<section class="card"><h2>All parts</h2>{table}{skipped_html}</section>']
  text = page.document(f"FiSeCLIP-JAX review: {get(doc, 'identity', 'images') or out}",
                       "\n".join(body), "written by fiseclip_jax.outputs.folder_report; scores are "
                       "raw anomaly scores; links to originals point into the scored folder")
  path = os.path.join(out, REPORT_HTML)
  atomic_write(path, text.encode("utf-8"))
  return path


"""What a benchmark run writes per category: metrics with operating points, per-image scores,
curves, honest overlays, the examples the report shows (DESIGN.md §12)."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs import curves_figure, html_report, metrics, overlays, results
from fiseclip_jax.outputs.files import write_json

EXAMPLES = 4        # images per example row of a category (report.html)
THUMB_SIDE = 500    # a thumbnail's longest side (shown at half that, so it stays sharp)
# The report's example rows: key, label, file prefix, order (-1 highest score first).
EXAMPLE_ROWS = (("good_highest", 0, "good", -1), ("defective_lowest", 1, "missed", 1),
                ("defective_highest", 1, "caught", -1))


class CategoryOutputs(NamedTuple):
  """Where and how a benchmark run writes a category's files."""
  out: str                  # the run's --out folder
  data_root: str            # the data set's root (overlay names are relative to <root>/<category>)
  map_range: str = "0,1"    # the overlays' colour scale ('LO,HI' or 'threshold')
  report_fpr: float = 0.05  # the image FPR whose threshold results.json records
  save_maps: bool = False   # every image's overlay, not only the report's examples
  overlay_legend: bool = False   # the legend strip under each full-size overlay


def category_result(cat: str, scored, p, seconds: float, report_fpr: float) -> dict:
  """results.json's entry: metrics, thresholds at F1-max and at report_fpr, counts, bank."""
  n = len(scored.scores)
  if not (np.isfinite(scored.maps).all() and np.isfinite(scored.scores).all()):
    raise FloatingPointError(f"{cat}: non-finite scores or maps")
  out = {"n_images": n, "seclip_only": scored.seclip_only_counts(), "bank": [s.path for s in p.bank],
         "skipped": sorted(set(p.unreadable) | set(scored.skipped)),
         "timing": {"seconds": seconds, "images_per_s": n / max(seconds, 1e-9)}}
  if not n:
    return {**out, "metrics": {}, "thresholds": {}}
  image = metrics.image_report(scored.labels, scored.scores, fpr=report_fpr)
  pixel = metrics.pixel_metrics(scored.masks, scored.maps, details=True)
  out["positive_share"] = {"image": float(np.mean(scored.labels == 1)),
                           "pixel": float(np.mean(scored.masks))}
  out["confusion_at_f1_max"] = metrics.confusion(scored.labels, scored.scores, image["f1_threshold"])
  out.update(metrics={"image": image["metrics"], "pixel": pixel["metrics"]}, thresholds={
      "rule": "flag an image (a pixel) iff its score (map value) >= the threshold",
      "image_f1_max": image["f1_threshold"], "pixel_f1_max": pixel["f1_threshold"],
      "image_at_fpr": image["at_fpr"]})
  out["_curves"] = {"image": image["curves"], "pixel": pixel["curves"]}
  return out


def summary_line(cat: str, result: dict) -> str:
  n, counts, seconds = result["n_images"], result["seclip_only"], result["timing"]["seconds"]
  line = f"  {cat}: {n} images, {n / max(seconds, 1e-9):.2f} img/s"
  if counts["total"]:
    line += (f"; {counts['total']} image(s) scored by SeCLIP alone (no candidate reference: "
             f"{counts['no_candidates']}, every reference masked out: {counts['all_masked']})")
  if result["skipped"]:
    line += f"; {len(result['skipped'])} unreadable image(s) skipped (listed in results.json)"
  return line


def write_category(where: CategoryOutputs, cat: str, result: dict, scored, samples) -> dict:
  """Per-image scores, curves, overlays and report examples; returns the JSON-ready result."""
  curves = result.pop("_curves", None)
  paths = [samples[i].path for i in scored.index]
  rows = results.score_rows(paths, scored.labels, scored.scores, scored.n_ref, scored.seclip_only)
  results.write_scores(os.path.join(where.out, "scores", f"{cat}.csv"), rows)
  if curves is not None:
    write_json(os.path.join(where.out, "curves", f"{cat}.json"), curves)
  if not len(scored.scores):
    return result
  t_px = result["thresholds"].get("pixel_f1_max")
  t_px = None if t_px is None or not np.isfinite(t_px) else t_px
  scale = overlays.ColourScale.for_run(where.map_range, t_px)
  root = os.path.join(where.data_root, cat)
  samples_of = [samples[i] for i in scored.index]

  def draw(j: int, path: str, max_side=None) -> None:
    s = samples_of[j]
    rgb = overlays.read_original(s.path)
    overlays.save_overlay(path, rgb, scored.maps[j], scale, t_px, float(scored.scores[j]),
                          overlays.ground_truth_mask(s.mask_path, rgb.shape[:2]), max_side,
                          legend=where.overlay_legend and not max_side)

  result["by_defect"] = metrics.by_defect([s.defect for s in samples_of], scored.labels,
                                          scored.scores, result["thresholds"].get("image_f1_max"))
  result["overlay_scale"] = {"lo": scale.lo, "hi": scale.hi, "colour_map": overlays.COLOUR_MAP,
                             "contour": t_px, "contour_is": "the pixel F1-max threshold, picked "
                             "on this category's test labels"}
  if where.save_maps:
    for j, s in enumerate(samples_of):
      name = overlays.map_name(s.path, root)
      draw(j, os.path.join(where.out, "maps", cat, name + ".png"))
  examples = {}
  for key, label, prefix, order in EXAMPLE_ROWS:
    idx = np.flatnonzero(scored.labels == label)
    idx = idx[np.argsort(order * scored.scores[idx], kind="stable")][:EXAMPLES]
    examples[key] = []
    for k, j in enumerate(idx):
      s = samples_of[j]
      stem = f"report/{cat}/{prefix}_{k}"
      draw(int(j), os.path.join(where.out, stem + ".png"), THUMB_SIDE)
      draw(int(j), os.path.join(where.out, stem + "_full.png"))
      original = stem + "_original" + os.path.splitext(s.path)[1].lower()
      copy_file(s.path, os.path.join(where.out, original))
      examples[key].append({"path": s.path, "score": float(scored.scores[j]),
                            "name": overlays.map_name(s.path, root), "defect": s.defect,
                            "label": label, "image": stem + ".png", "full": stem + "_full.png",
                            "original": original})
  write_json(os.path.join(where.out, "report", cat, "examples.json"), examples)
  return result


def copy_file(src: str, dst: str) -> None:
  """A file's bytes under another name (atomic, like every output)."""
  with open(src, "rb") as f:
    atomic_write(dst, f.read(), fsync=False)


def write_report(out: str) -> Optional[str]:
  """report.html from what the run has written so far; a missing matplotlib is the returned
  warning (once per run is the caller's business), else None."""
  try:
    html_report.write_report(out)
  except curves_figure.ReportUnavailable as e:
    return f"warning: {e} (or pass --noreport)"
  return None


"""What a benchmark run writes per category: metrics with operating points, per-image scores,
curves, honest overlays, the examples the report shows (DESIGN.md §12)."""
from __future__ import annotations

import os

import numpy as np
from absl import flags

from fiseclip_jax import metrics, overlays, reports

FLAGS = flags.FLAGS
EXAMPLES = 4        # highest-scoring good and lowest-scoring defective images shown per category
THUMB_SIDE = 320


def define_flags() -> None:
  flags.DEFINE_bool("save_maps", False, "Write every image's overlay (PNG at its own size) to maps/.")
  flags.DEFINE_string("map_range", "0,1", "Colour scale of every overlay of the run: 'LO,HI', or "
                      "'threshold' (0 to 2x the pixel threshold, the threshold mid-scale).")
  flags.DEFINE_float("report_fpr", 0.05, "The image false-positive rate whose threshold on normal "
                     "images results.json records beside the F1-max thresholds.")
  flags.DEFINE_bool("report", True, "Write report.html (needs matplotlib: pip install "
                    "'fiseclip-jax[viz]').")


def category_result(cat: str, scored, p, seconds: float) -> dict:
  """results.json's entry: metrics, thresholds at F1-max and at --report_fpr, counts, bank."""
  n = len(scored.scores)
  if not (np.isfinite(scored.maps).all() and np.isfinite(scored.scores).all()):
    raise FloatingPointError(f"{cat}: non-finite scores or maps")
  out = {"n_images": n, "seclip_only": scored.seclip_only_counts(), "bank": [s.path for s in p.bank],
         "skipped": sorted(set(p.unreadable) | set(scored.skipped)),
         "timing": {"seconds": seconds, "images_per_s": n / max(seconds, 1e-9)}}
  if not n:
    return {**out, "metrics": {}, "thresholds": {}}
  image = metrics.image_report(scored.labels, scored.scores, fpr=FLAGS.report_fpr)
  pixel = metrics.pixel_metrics(scored.masks, scored.maps, details=True)
  out.update(metrics={"image": image["metrics"], "pixel": pixel["metrics"]}, thresholds={
      "rule": "flag an image (a pixel) iff its score (map value) >= the threshold",
      "image_f1_max": image["f1_threshold"], "pixel_f1_max": pixel["f1_threshold"],
      "image_at_fpr": image["at_fpr"]})
  out["_curves"] = {"image": image["curves"], "pixel": pixel["curves"]}
  return out


def print_summary(cat: str, result: dict) -> None:
  n, counts, seconds = result["n_images"], result["seclip_only"], result["timing"]["seconds"]
  line = f"  {cat}: {n} images, {n / max(seconds, 1e-9):.2f} img/s"
  if counts["total"]:
    line += (f"; {counts['total']} image(s) scored by SeCLIP alone (no candidate reference: "
             f"{counts['no_candidates']}, every reference masked out: {counts['all_masked']})")
  if result["skipped"]:
    line += f"; {len(result['skipped'])} unreadable image(s) skipped (listed in results.json)"
  print(line)


def write_category(cat: str, result: dict, scored, samples) -> dict:
  """Per-image scores, curves, overlays and report examples; returns the JSON-ready result."""
  curves = result.pop("_curves", None)
  paths = [samples[i].path for i in scored.index]
  rows = reports.score_rows(paths, scored.labels, scored.scores, scored.n_ref, scored.seclip_only)
  reports.write_scores(os.path.join(FLAGS.out, "scores", f"{cat}.csv"), rows)
  if curves is not None:
    reports.write_json(os.path.join(FLAGS.out, "curves", f"{cat}.json"), curves)
  if not len(scored.scores):
    return result
  t_px = result["thresholds"].get("pixel_f1_max")
  t_px = None if t_px is None or not np.isfinite(t_px) else t_px
  scale = overlays.ColourScale.parse(FLAGS.map_range, t_px)
  root = os.path.join(FLAGS.data_root, cat)
  samples_of = [samples[i] for i in scored.index]

  def draw(j: int, path: str, max_side=None) -> None:
    s = samples_of[j]
    rgb = overlays.read_original(s.path)
    overlays.save_overlay(path, rgb, scored.maps[j], scale, t_px, float(scored.scores[j]),
                          overlays.ground_truth_mask(s.mask_path, rgb.shape[:2]), max_side)

  if FLAGS.save_maps:
    for j, s in enumerate(samples_of):
      name = overlays.map_name(s.path, root)
      draw(j, os.path.join(FLAGS.out, "maps", cat, name + ".png"))
  examples = {}
  for key, label, prefix, order in (("good_highest", 0, "good", -1),
                                    ("defective_lowest", 1, "defect", 1)):
    idx = np.flatnonzero(scored.labels == label)
    idx = idx[np.argsort(order * scored.scores[idx], kind="stable")][:EXAMPLES]
    examples[key] = []
    for k, j in enumerate(idx):
      image = f"report/{cat}/{prefix}_{k}.png"
      draw(int(j), os.path.join(FLAGS.out, image), THUMB_SIDE)
      examples[key].append({"path": samples_of[j].path, "score": float(scored.scores[j]),
                            "name": overlays.map_name(samples_of[j].path, root),
                            "label": label, "image": image})
  reports.write_json(os.path.join(FLAGS.out, "report", cat, "examples.json"), examples)
  return result


def write_report() -> None:
  """report.html from what the run has written so far; a missing matplotlib is one warning."""
  if not FLAGS.report:
    return
  from fiseclip_jax import report
  try:
    report.write_report(FLAGS.out)
  except report.ReportUnavailable as e:
    if not getattr(write_report, "warned", False):
      print(f"warning: {e} (or pass --noreport)")
      write_report.warned = True

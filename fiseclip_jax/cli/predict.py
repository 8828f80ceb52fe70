"""Score images with a bundle: what the folder scorer writes, without re-encoding the known-good parts.

  fiseclip-predict BUNDLE IMAGES_OR_DIR --out DIR [--recursive] [--line ID]

(`python -m eval.predict ...` in a checkout.) BUNDLE is a file of `fiseclip-bundle`; IMAGES_OR_DIR
an image or a folder of them. Written to --out as `fiseclip-folder` writes it: scores.csv (path,
score, n_ref, seclip_only and, with the bundle's image threshold, pred_label), skipped.csv,
run.json (the bundle, its thresholds, the counts), maps/<image>.png (overlay) and .npy (map, at
the image's own size), masks/<image>.png with the bundle's pixel threshold, and report.html.
A bundle of references bank or rolling scores a part by the bank or by the parts before it on its
line alone, so the images are scored a batch at a time; references batch / both compare the
images with each other, so all of them are scored in one call (as one folder run).
"""
from __future__ import annotations

import os
import time

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.cli.progress import COMPILING, Progress
from fiseclip_jax.deploy.bundle_header import read_meta
from fiseclip_jax.outputs import decisions, overlays
from fiseclip_jax.outputs.files import write_csv, write_json
from fiseclip_jax.outputs.folder_report import write_folder_report
from fiseclip_jax.outputs.provenance import versions
from fiseclip_jax.outputs.run_folder import prepare_out

FLAGS = flags.FLAGS
RUN_JSON = "run.json"


def define_flags() -> None:
  options.define_platform_flag()
  flags.DEFINE_string("out", None, "Required: the output folder.")
  flags.DEFINE_bool("recursive", False, "Also score the images in sub-folders of IMAGES_OR_DIR.")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier run's outputs in --out.")
  flags.DEFINE_bool("skip_bad_images", False, "Skip unreadable images (listed in skipped.csv) "
                    "instead of failing.")
  flags.DEFINE_string("line", None, "A rolling bundle: the line id the images are a stream of "
                      "(one process: the stream starts empty).")
  flags.DEFINE_bool("save_maps", True, "Write maps/<image>.png (overlay) and .npy (map), at the "
                    "image's own size.")
  flags.DEFINE_bool("normalized_scores", False, "Add scores.csv column score_normalized = "
                    "score / (score + t), t the bundle's image threshold.")
  flags.DEFINE_bool("report", True, "Write report.html, the review page.")
  flags.DEFINE_string("cache_dir", None, "JAX's persistent compilation cache (default "
                      "$FISECLIP_CACHE_DIR or ~/.cache/fiseclip_jax/xla; '' for none).")
  flags.DEFINE_bool("progress", True, "Progress bar on a terminal, a periodic line in a log.")
  options.define_overlay_flags()
  options.check("out", lambda v: bool(v.strip()), "a folder path")


def _samples(target: str):
  """The images to score: one file, or a folder's images; unreadable ones split off."""
  if os.path.isfile(target):
    root, (samples, ignored) = os.path.dirname(os.path.abspath(target)), (
        [data.Sample(target)], [])
  elif os.path.isdir(target):
    root, (samples, ignored) = target, data.list_folder(target, FLAGS.recursive,
                                                        exclude=[FLAGS.out])
  else:
    raise UsageError(f"IMAGES_OR_DIR {target}: no such file or folder")
  readable, bad = options.split_unreadable(samples, 1)
  return root, readable, ignored, bad


def run(bundle_path: str, target: str) -> None:
  if not FLAGS.out:
    raise UsageError("--out DIR is required")
  read_meta(bundle_path)                   # a bad bundle is one line before anything is touched
  root, samples, ignored, bad = _samples(target)
  ident = {"bundle": os.path.abspath(bundle_path), "images": os.path.abspath(target),
           "recursive": FLAGS.recursive, "line": FLAGS.line, "map_range": FLAGS.map_range,
           "overlay_legend": FLAGS.overlay_legend, "normalized_scores": FLAGS.normalized_scores}
  prepare_out(FLAGS.out, ident, resume=False, overwrite=FLAGS.overwrite, record=RUN_JSON)
  runtime.start()
  t0 = time.time()
  e = runtime.deploy_engine()
  predictor = e.predictor.Predictor.load(bundle_path, cache_dir=FLAGS.cache_dir)
  d = predictor.bundle.decision
  t, t_px = d.get("image_threshold"), d.get("pixel_threshold")
  if FLAGS.normalized_scores and not (t is not None and t > 0):
    raise UsageError(f"--normalized_scores needs the bundle's image threshold > 0 (it has {t})")
  if FLAGS.map_range == "threshold" and not (t_px is not None and t_px > 0):
    raise UsageError("--map_range threshold needs the bundle's pixel threshold > 0")
  print(f"{len(samples)} image(s) in {target}; bundle {bundle_path}: class "
        f"{predictor.class_name!r}, references {predictor.bundle.references}, batch "
        f"{predictor.batch_size}" + (f"; {len(bad)} unreadable, skipped" if bad else ""))
  scale = overlays.ColourScale.for_run(FLAGS.map_range, t_px)
  rows = []
  step = predictor.batch_size if predictor.bundle.references in ("bank", "rolling") else len(samples)
  progress = Progress(len(samples), "images", enabled=FLAGS.progress, waiting=COMPILING)
  for start in range(0, len(samples), max(step, 1)):
    chunk = samples[start:start + step]
    for s, p in zip(chunk, predictor.predict([s.path for s in chunk], line=FLAGS.line)):
      rel = overlays.map_name(s.path, root)
      rows.append([rel, f"{p.score:.8f}", p.n_ref, int(p.seclip_only)])
      if FLAGS.save_maps or t_px is not None:
        base = os.path.join(FLAGS.out, "maps", rel)
        overlays.save_map(base + ".npy", p.map, p.map.shape)
        mask = None if t_px is None else os.path.join(FLAGS.out, "masks", rel + ".png")
        decisions.write_part(base + ".png", mask, overlays.read_original(s.path), p.map, scale,
                             float(rows[-1][1]),
                             decisions.part_pixel_threshold(float(rows[-1][1]), t, t_px),
                             legend=FLAGS.overlay_legend)
    progress.update(min(start + step, len(samples)))
  progress.close()
  rows.sort(key=lambda r: r[0])
  scores = [float(r[1]) for r in rows]
  extra, columns = decisions.label_columns(scores, t, FLAGS.normalized_scores)
  write_csv(os.path.join(FLAGS.out, "scores.csv"),
            [["path", "score", "n_ref", "seclip_only"] + extra]
            + [r + c for r, c in zip(rows, columns)])
  skipped = sorted([overlays.map_name(p, root), err] for p, err in bad.items())
  write_csv(os.path.join(FLAGS.out, "skipped.csv"), [["path", "reason"]] + skipped)
  flagged = None if t is None else sum(int(c[0]) for c in columns)
  only = sum(r[3] for r in rows)
  write_json(os.path.join(FLAGS.out, RUN_JSON), {
      "identity": ident, "status": "complete", "decision": d, "flagged": flagged,
      "predictor": predictor.describe(), "scored": len(rows), "skipped": len(skipped),
      "ignored_files": len(ignored), "seclip_only": only,
      "seconds_last_session": time.time() - t0, "versions": versions()})
  if FLAGS.report:
    print(f"review page: {write_folder_report(FLAGS.out, root)}")
  print(f"scored {len(rows)} image(s)" + ("" if t is None else f"; {flagged} flagged (score >= "
                                         f"{t:.6f})")
        + (f"; {only} scored by SeCLIP alone (no reference)" if only else "")
        + f": {os.path.join(FLAGS.out, 'scores.csv')}")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv, positional=("BUNDLE", "IMAGES_OR_DIR"))

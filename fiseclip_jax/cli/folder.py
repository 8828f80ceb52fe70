"""Score unlabeled images from a line: per-image scores (CSV) and heat maps, as a long-running job.

  fiseclip-folder --images DIR --class_name "metal nut" --weights FILE --out DIR
      [--recursive] [--normal_images GOOD_DIR [--k_shot K]] [--references rolling --stream_window K]

(`python -m eval.folder ...` in a checkout.) References (docs/DESIGN.md §5): by default each
image is compared with the other images of its batch; with --normal_images, with those known-good
parts too (--references both, the default then) or only (--references bank); with
--references rolling (a stream), with the --stream_window images just before it in file order (a
production line).

Written as it goes: scores.log.csv gets each batch's rows, flushed to disk, so a kill loses at
most one batch and --resume continues where it stopped (every image scored once, the same scores
as an uninterrupted run; an image changed since it was scored is scored again). At the end:
scores.csv (sorted by path), skipped.csv, run.json, each image's overlay and map as
maps/<its path relative to --images>.png and .npy (maps/a/cut_000.png.png for a/cut_000.png;
--nosave_maps: none), and report.html, the review page (--noreport: none). Only one run at a time
may use an --out.

Decisions (docs/DESIGN.md §13): --threshold T, or --threshold auto [--max_fpr F] (from the run's
own scores, assuming most parts are good), or --threshold_from GOOD_DIR (its scores
in known_good.csv) give scores.csv a pred_label column; --pixel_threshold (or --threshold_from)
writes masks/<image>.png. A part the image threshold passes gets no contour and an all-zero mask.
--normalized_scores adds score_normalized = score / (score + t): the threshold t at 0.5.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, NamedTuple

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.cli.progress import COMPILING, Progress
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.order import draw
from fiseclip_jax.data.tiles import frame_size
from fiseclip_jax.outputs import decisions, overlays
from fiseclip_jax.outputs.batch_log import BatchLog
from fiseclip_jax.outputs.files import write_csv, write_json
from fiseclip_jax.outputs.folder_report import write_folder_report
from fiseclip_jax.outputs.provenance import versions
from fiseclip_jax.outputs.run_folder import prepare_out

FLAGS = flags.FLAGS
# size and mtime_ns: the file as it was scored, so --resume notices an image replaced under its name.
LOG_COLUMNS = ("path", "status", "score", "n_ref", "seclip_only", "note", "size", "mtime_ns")
RUN_JSON = "run.json"
LOG = "scores.log.csv"
KNOWN_GOOD = "known_good.csv"     # --threshold_from: the known-good images' scores (path, score)


def define_flags() -> None:
  options.define_run_flags("folder", with_data_root=False, multihost=False)
  options.define_bank_flags("--normal_images (default: all of them)",
                            "Seed of the --k_shot draw from --normal_images.")
  options.define_method_flags(exclude=("reference_scope",))
  options.define_tile_flags()
  flags.DEFINE_string("images", None, "Required: the folder of images to score.")
  flags.DEFINE_string("class_name", None, "Required: what the images show, as in the prompts (e.g. "
                      "'metal nut').")
  flags.DEFINE_bool("recursive", False, "Also score the images in sub-folders of --images.")
  flags.DEFINE_string("normal_images", None, "Folder of known-good images: the bank of references.")
  flags.DEFINE_alias("bank_size", "stream_window")     # the window's name before 0.2
  flags.DEFINE_bool("top_up", True, "Fill the short last batch with already-scored images as "
                    "references only, so every image has B - 1.")
  flags.DEFINE_bool("save_maps", True, "Write maps/<image>.png (overlay) and .npy (map), at the "
                    "image's own size.")
  options.define_decision_flags()
  flags.DEFINE_bool("normalized_scores", False, "Add scores.csv column score_normalized = "
                    "score / (score + t), t the image threshold (needs one; t > 0): the threshold "
                    "maps to 0.5, pred_label 1 iff score_normalized >= 0.5.")
  options.define_overlay_flags()
  flags.DEFINE_bool("report", True, "Write report.html: the review page (parts by score with "
                    "their decision, original and overlay; the scores' histogram).")
  options.check("stream_window", options.at_least(0), ">= 0")
  for name in ("images", "class_name"):
    options.check(name, lambda v: bool(v.strip()), "a non-empty value")


def _rel(path: str) -> str:
  return os.path.relpath(os.path.abspath(path), os.path.abspath(FLAGS.images))


def _check_flags() -> bool:
  """Folder-specific checks; returns whether a bank is used."""
  if not FLAGS.images or not FLAGS.class_name:
    raise UsageError("--images DIR and --class_name NAME are required")
  stream = FLAGS.references == options.STREAM or bool(FLAGS.stream_window)
  if stream and FLAGS.normal_images:
    raise UsageError("--references rolling compares each image with the ones before it; it does "
                     "not take --normal_images")
  if FLAGS.stream_window is not None and FLAGS.stream_window < (1 if stream else 0):
    raise UsageError(f"--stream_window {FLAGS.stream_window}: expected >= 1")
  if FLAGS.k_shot and not FLAGS.normal_images:
    raise UsageError("--k_shot draws from --normal_images: pass the folder of known-good images")
  if FLAGS.threshold is not None and FLAGS.threshold_from:
    raise UsageError("--threshold and --threshold_from exclude each other")
  _check_decision_flags()
  if FLAGS.pixel_threshold is not None and FLAGS.threshold_from:
    raise UsageError("--pixel_threshold and --threshold_from exclude each other")
  if FLAGS.map_range == "threshold" and FLAGS.pixel_threshold is None and not FLAGS.threshold_from:
    raise UsageError("--map_range threshold needs a pixel threshold (--pixel_threshold or "
                     "--threshold_from)")
  if FLAGS.map_range == "threshold" and FLAGS.pixel_threshold is not None and \
      not FLAGS.pixel_threshold > 0:
    raise UsageError(f"--map_range threshold colours 0 .. 2 x --pixel_threshold: expected a "
                     f"positive --pixel_threshold, got {FLAGS.pixel_threshold}")
  has_bank = bool(FLAGS.normal_images)
  options.check_run_flags(has_bank, FLAGS.references)
  options.tiling(stream)
  return has_bank


def _threshold():
  """--threshold parsed: a float, decisions.AUTO or None."""
  return decisions.parse_threshold(FLAGS.threshold)


def _check_decision_flags() -> None:
  """--threshold auto and --normalized_scores with what they need."""
  t = _threshold()
  if t == decisions.AUTO and not decisions.auto_max_fpr_ok(FLAGS.max_fpr):
    raise UsageError(f"--threshold auto sets the threshold at the z(1 - --max_fpr) point: expected "
                     f"0 < --max_fpr < 0.5, got {FLAGS.max_fpr}")
  if FLAGS.normalized_scores and t is None and not FLAGS.threshold_from:
    raise UsageError("--normalized_scores maps the image threshold to 0.5: pass --threshold "
                     "(a number or auto) or --threshold_from")
  if FLAGS.normalized_scores and t not in (None, decisions.AUTO) and not t > 0:
    raise UsageError(f"--normalized_scores is score / (score + t): expected a positive "
                     f"--threshold, got {t}")


def _check_auto_count(n: int) -> None:
  if _threshold() == decisions.AUTO and n < decisions.MIN_AUTO_IMAGES:
    raise UsageError(f"--threshold auto fits the threshold to the run's own scores: it needs at "
                     f"least {decisions.MIN_AUTO_IMAGES} images, {FLAGS.images} has {n}; pass "
                     "--threshold or --threshold_from")


def _known_good(folder: str, min_side: int, k_shot: int = 0):
  """The images of a known-good folder (k_shot > 0: that many drawn with --seed), files checked."""
  samples, _ = data.list_folder(folder, FLAGS.recursive, exclude=[FLAGS.out])
  if k_shot:
    samples = draw(samples, k_shot, FLAGS.seed)
  problems = data.check_files(samples, min_side)
  if problems:
    raise problems[0].error
  return samples


def file_stamp(path: str) -> List[str]:
  """[size, mtime_ns] of a file as log columns ('' where it cannot be read)."""
  try:
    st = os.stat(path)
  except OSError:
    return ["", ""]
  return [str(st.st_size), str(st.st_mtime_ns)]


def unchanged_prefix(done: List[List[dict]]) -> List[List[dict]]:
  """The logged batches up to the first one holding an image that changed since it was scored
  (size or modification time; missing counts as changed): that batch and every later one is
  redone, so a stream's ring stays causal too."""
  for i, batch in enumerate(done):
    for r in batch:
      if r["status"] == "scored" and file_stamp(os.path.join(FLAGS.images, r["path"])) != [
          r["size"], r["mtime_ns"]]:
        return done[:i]
  return done


def _check_apart(a, a_flag: str, b, b_flag: str) -> None:
  """No file both scored and a reference of itself: matched against itself an image scores about 0
  (a bank holding the known-good images that set the threshold would set it far too low)."""
  same = sorted({os.path.realpath(s.path) for s in a} & {os.path.realpath(s.path) for s in b})
  if same:
    raise UsageError(f"{len(same)} image(s) of {a_flag} are also in {b_flag} (e.g. {same[0]}): "
                     "each would be compared with itself; keep the two sets apart")


def _prepare_out(ident: dict) -> List[List[dict]]:
  """Complete batches of an earlier run to keep (--resume), after checking the folder."""
  log = BatchLog(os.path.join(FLAGS.out, LOG), LOG_COLUMNS)
  earlier = prepare_out(FLAGS.out, ident, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                        record=RUN_JSON)
  if earlier is not None:
    done = log.read()
    kept = unchanged_prefix(done)
    if len(kept) < len(done):
      print(f"--resume: images changed since they were scored in batch {len(kept)} of the log: that "
            f"batch and the {len(done) - len(kept) - 1} after it are scored again")
    log.rewrite(kept)
    return kept
  write_json(os.path.join(FLAGS.out, RUN_JSON), {"identity": ident, "status": "running"})
  return []


def run() -> None:
  has_bank = _check_flags()
  conf = options.fise_config(FLAGS.platform or "cpu", has_bank)
  ckpts = runtime.read_checkpoints()
  runtime.check_model(conf, ckpts)
  runtime.check_class_name(FLAGS.class_name, ckpts)
  min_side = runtime.min_image_side(ckpts)
  samples, ignored = data.list_folder(FLAGS.images, FLAGS.recursive, exclude=[FLAGS.out])
  samples, unreadable = options.split_unreadable(samples, min_side)
  _check_auto_count(len(samples))
  bank_samples = _known_good(FLAGS.normal_images, min_side, FLAGS.k_shot) if has_bank else []
  good_samples = _known_good(FLAGS.threshold_from, min_side) if FLAGS.threshold_from else []
  _check_apart(samples, "--images", bank_samples, "--normal_images")
  _check_apart(good_samples, "--threshold_from", bank_samples, "--normal_images")
  tiling = options.tiling()
  if tiling is not None:
    _check_frames(samples, bank_samples, good_samples)
  backend = runtime.start()
  conf = options.fise_config(backend, has_bank)
  ident = {"images": os.path.abspath(FLAGS.images), "recursive": FLAGS.recursive,
           "class_name": FLAGS.class_name, "config": conf.to_dict(), **ckpts.identity(),
           "batch_size": FLAGS.batch_size, "top_up": FLAGS.top_up,
           "seed": FLAGS.seed if FLAGS.k_shot else None,
           "bank": [os.path.abspath(s.path) for s in bank_samples],
           "threshold": _threshold(), "pixel_threshold": FLAGS.pixel_threshold,
           "threshold_from": os.path.abspath(FLAGS.threshold_from) if FLAGS.threshold_from else None,
           "max_fpr": FLAGS.max_fpr if FLAGS.threshold_from or _threshold() == decisions.AUTO
           else None,
           "normalized_scores": FLAGS.normalized_scores,
           "max_pixel_fpr": FLAGS.max_pixel_fpr if FLAGS.threshold_from else None,
           "map_range": FLAGS.map_range, "overlay_legend": FLAGS.overlay_legend}
  if tiling is not None:             # only then: an untiled run keeps the identity it had
    ident["tiles"] = {"tile": tiling.tile, "overlap": tiling.overlap}
  done = _prepare_out(ident)
  print(f"{len(samples)} image(s) in {FLAGS.images}" + (" and its sub-folders" if FLAGS.recursive else "")
        + (f"; {len(ignored)} other file(s) ignored" if ignored else "")
        + (f"; {len(unreadable)} unreadable, skipped" if unreadable else "")
        + f"; references {conf.references}"
        + (f" ({len(bank_samples)} known-good)" if bank_samples else "")
        + (f" (the {conf.stream_window} before each image)" if conf.streaming else "")
        + (f"; tiles of {tiling.tile}px (overlap {tiling.overlap}), each against the same tile "
           "of the others" if tiling else ""))
  if len(samples) == 1 and conf.references == "batch":
    print("one image: no reference for feature matching, scoring with SeCLIP alone")
  t0 = time.time()
  setup = _setup(conf, ckpts, bank_samples, tiling)
  decision = _decision(setup, conf, good_samples)
  _score(setup, conf, samples, done, decision)
  before = sum(r["status"] == "scored" for batch in done for r in batch)
  _finish(ident, ignored, unreadable, time.time() - t0, decision, before)
  if FLAGS.report:
    print("writing the review page", flush=True)
    print(f"review page: {write_folder_report(FLAGS.out, FLAGS.images)}")


def _check_frames(samples, bank_samples, good_samples) -> None:
  """--tile: every image one size, the known-good ones too (headers only, before JAX starts)."""
  if not samples:
    return
  hw = frame_size(samples, f"--images {FLAGS.images}")
  for flag, others in (("--normal_images", bank_samples), ("--threshold_from", good_samples)):
    if others and frame_size(others, flag) != hw:
      raise UsageError(f"--tile: the images of {flag} are not the size of --images' "
                       f"({hw[1]}x{hw[0]}, WxH): a tile is the same place on every image")


class Setup(NamedTuple):
  engine: object
  model: object
  mesh: object
  text: object
  bank: object          # the bank on the mesh; tiled: one per tile position
  tiling: object = None


def _setup(conf, ckpts, bank_samples, tiling=None) -> Setup:
  e = runtime.engine()
  devices = runtime.devices()[:1] if conf.streaming else runtime.devices()
  mesh = e.sharding.make_mesh(devices)
  model = runtime.model_on(ckpts, mesh)
  text = e.towers.text_features(model, FLAGS.class_name, conf)
  bank = None
  if bank_samples and tiling is not None:
    bank = e.tiled.banks_on(model, conf, bank_samples, tiling, frame_size(bank_samples, "bank"),
                            mesh)
  elif bank_samples:
    bank = e.towers.bank_on(model, conf, bank_samples, mesh)
  return Setup(e, model, mesh, text, bank, tiling)


def _run_scoring(setup: Setup, conf, samples, *, pool=None, indices=None, on_batch=None,
                 on_progress=None, on_skip=None, keep_maps=False):
  """Score samples the way this run scores: its references, batches, top-up. pool: the whole
  list that `indices` point into (default: samples), which a short batch is topped up from."""
  pool = samples if pool is None else pool
  common = dict(model=setup.model, conf=conf, text=setup.text, mesh=setup.mesh,
                batch_size=FLAGS.batch_size, top_up_pool=pool if FLAGS.top_up else None,
                indices=indices, skip_bad_images=FLAGS.skip_bad_images, on_batch=on_batch,
                on_progress=on_progress, on_skip=on_skip, keep_maps=keep_maps)
  if setup.tiling is not None:
    return setup.engine.tiled.score_tiled(samples, tiling=setup.tiling, banks=setup.bank, **common)
  return setup.engine.scoring.score(samples, bank=setup.bank, **common)


def _decision(setup: Setup, conf, good_samples) -> dict:
  """The thresholds of the run and how they were chosen (written to run.json); under --threshold
  auto the image threshold is pending until `decisions.settle` fits it after scoring."""
  t, t_px = _threshold(), FLAGS.pixel_threshold
  if t == decisions.AUTO:
    return decisions.auto_pending(t_px)
  if not good_samples:
    return {"image_threshold": t, "pixel_threshold": t_px,
            "how": "given" if t is not None or t_px is not None else "none: scores only"}
  scored = _run_scoring(setup, conf, good_samples, keep_maps=True)
  paths = [os.path.abspath(good_samples[i].path) for i in scored.index]
  write_csv(os.path.join(FLAGS.out, KNOWN_GOOD), [["path", "score"]] + sorted(
      [p, f"{float(x):.8f}"] for p, x in zip(paths, scored.scores)))
  warning = decisions.unresolvable_warning(len(paths), FLAGS.max_fpr)
  if warning:
    sys.stderr.write(f"warning: {warning}\n")
  d = decisions.known_good(scored.scores, scored.maps, FLAGS.max_fpr, FLAGS.max_pixel_fpr,
                           f"known-good images of {os.path.abspath(FLAGS.threshold_from)} scored "
                           f"with references {conf.references}", KNOWN_GOOD)
  image = d["known_good"]["image"]
  print(f"thresholds from {len(paths)} known-good image(s) in {FLAGS.threshold_from}: "
        f"image {image['threshold']:.6f} (flags {100 * image['fpr']:.1f}% of them, asked "
        f"{100 * FLAGS.max_fpr:.1f}%), pixel {d['pixel_threshold']:.6f}")
  return d


def _write_maps(s, anomaly_map, score: float, decision) -> None:
  """A part's overlay, map and mask. Under --threshold auto with a pixel threshold only the map:
  the overlay and mask wait for the image threshold (`_draw_decided`)."""
  t_px = decision["pixel_threshold"]
  base = os.path.join(FLAGS.out, "maps", _rel(s.path))
  rgb = overlays.read_original(s.path)
  overlays.save_map(base + ".npy", anomaly_map, rgb.shape[:2])
  if decision.get("pending") and t_px is not None:
    return
  part_t = decisions.part_pixel_threshold(score, decision["image_threshold"], t_px)
  mask = None if t_px is None else os.path.join(FLAGS.out, "masks", _rel(s.path) + ".png")
  decisions.write_part(base + ".png", mask, rgb, anomaly_map,
                       overlays.ColourScale.for_run(FLAGS.map_range, t_px), score, part_t,
                       legend=FLAGS.overlay_legend)


def _draw_decided(scored: List[dict], decision: dict) -> None:
  """--threshold auto with a pixel threshold: every overlay and mask, from maps/*.npy, now that
  the image threshold is known (all of them: a resumed run's threshold may have moved)."""
  t_px = decision["pixel_threshold"]
  scale = overlays.ColourScale.for_run(FLAGS.map_range, t_px)
  for r in scored:
    score, base = float(r["score"]), os.path.join(FLAGS.out, "maps", r["path"])
    rgb = overlays.read_original(os.path.join(FLAGS.images, r["path"]))
    decisions.write_part(base + ".png", os.path.join(FLAGS.out, "masks", r["path"] + ".png"), rgb,
                         decisions.load_map(base + ".npy"), scale, score,
                         decisions.part_pixel_threshold(score, decision["image_threshold"], t_px),
                         legend=FLAGS.overlay_legend)


def _score(setup: Setup, conf, samples, done: List[List[dict]], decision: dict) -> None:
  log = BatchLog(os.path.join(FLAGS.out, LOG), LOG_COLUMNS)
  rolling = conf.streaming
  consumed = {r["path"] for batch in done for r in batch}
  n_done = sum(r["status"] == "scored" for batch in done for r in batch)
  state = {"batch": len(done), "replay": sum(any(r["status"] == "scored" for r in b) for b in done)
           if rolling else 0}

  def on_skip_row(path, err):
    """An image found unreadable while decoding: logged at once as its own entry (once: a stream's
    replay meets it again), like the images the header check found."""
    rel = _rel(path)
    if rel in consumed:
      return
    consumed.add(rel)
    sys.stderr.write(f"warning: skipping unreadable image {path}: {err}\n")
    log.append(state["batch"], [[rel, "skipped", "", "", "", str(err).replace("\n", " "), "", ""]])
    state["batch"] += 1

  def on_batch(r):
    if state["replay"] > 0:                   # a stream's resume: rebuilding the ring, logged
      state["replay"] -= 1
      return
    rows = []
    for s, q, score, n_ref, only, m in zip(r.batch.samples, r.query, r.scores, r.n_ref,
                                           r.seclip_only, r.maps):
      if not q:
        continue
      rows.append([_rel(s.path), "scored", f"{float(score):.8f}", int(n_ref), int(bool(only)), ""]
                  + file_stamp(s.path))
      if FLAGS.save_maps or decision["pixel_threshold"] is not None:
        _write_maps(s, m, float(rows[-1][2]), decision)      # the logged score decides
    if rows:
      log.append(state["batch"], rows)
      state["batch"] += 1

  if rolling:
    todo, indices = samples, None              # the ring is rebuilt from the start on --resume
  else:
    keep = [i for i, s in enumerate(samples) if _rel(s.path) not in consumed]
    todo, indices = [samples[i] for i in keep], keep
  progress = Progress(len(samples), "images", enabled=FLAGS.progress,
                      waiting=COMPILING)
  base = n_done if not rolling else 0
  _run_scoring(setup, conf, todo, pool=samples, indices=indices, on_batch=on_batch,
               on_skip=on_skip_row,
               on_progress=lambda k: progress.update(min(base + k, len(samples))))
  progress.close()


def _finish(ident: dict, ignored: List[str], unreadable: dict, seconds: float,
            decision: dict, scored_before: int) -> None:
  """scores.csv (sorted), skipped.csv and run.json from the complete log."""
  log = BatchLog(os.path.join(FLAGS.out, LOG), LOG_COLUMNS)
  rows = [r for batch in log.read() for r in batch]
  scored = sorted((r for r in rows if r["status"] == "scored"), key=lambda r: r["path"])
  skipped = sorted([[_rel(p), e] for p, e in unreadable.items()]
                   + [[r["path"], r["note"]] for r in rows if r["status"] == "skipped"])
  header = ["path", "score", "n_ref", "seclip_only"]
  table = [[r[c] for c in header] for r in scored]
  scores = [float(r["score"]) for r in scored]
  try:
    decision = decisions.settle(decision, scores, FLAGS.max_fpr)
    if "auto" in decision:
      print(decisions.describe_auto(decision["auto"]))
    t = decision["image_threshold"]
    extra, columns = decisions.label_columns(scores, t, FLAGS.normalized_scores)
  except ValueError as e:           # FitError, or no positive threshold to normalize by
    flag = "--threshold auto" if isinstance(e, decisions.FitError) else "--normalized_scores"
    decision = {**{k: v for k, v in decision.items() if k != "pending"}, "error": f"{flag}: {e}"}
    t, extra, columns = None, [], [[] for _ in scored]
  if FLAGS.normalized_scores and t is not None:
    decision = {**decision, "normalized": decisions.NORMALIZED_RULE}
  flagged = None if t is None else sum(int(c[0]) for c in columns)
  write_csv(os.path.join(FLAGS.out, "scores.csv"),
            [header + extra] + [row + c for row, c in zip(table, columns)])
  write_csv(os.path.join(FLAGS.out, "skipped.csv"), [["path", "reason"]] + skipped)
  only = sum(r["seclip_only"] == "1" for r in scored)
  write_json(os.path.join(FLAGS.out, RUN_JSON), {
      "identity": ident, "status": "complete", "decision": decision, "flagged": flagged,
      "scored": len(scored), "skipped": len(skipped),
      "ignored_files": len(ignored), "seclip_only": only, "seconds_last_session": seconds,
      "versions": versions()})
  if "error" in decision:
    raise BadInputError(f"{decision['error']}; scores.csv is written without pred_label: "
                        "pass --threshold or --threshold_from")
  if decision.get("auto") and decision["pixel_threshold"] is not None:
    _draw_decided(scored, decision)
  session = len(scored) - scored_before
  print(f"scored {len(scored)} image(s)" + (f", {session} in this session" if scored_before else "")
        + f" ({session / max(seconds, 1e-9):.2f} img/s this session)"
        + ("" if t is None else f"; {flagged} flagged (score >= {t:.6f}, "
           f"{decision['how'].split(':')[0]})")
        + (f"; {only} scored by SeCLIP alone (no reference)" if only else "")
        + (f"; {len(skipped)} skipped (skipped.csv)" if skipped else "")
        + (f"; {len(ignored)} non-image file(s) ignored" if ignored else "")
        + f": {os.path.join(FLAGS.out, 'scores.csv')}"
        + (f", maps in {os.path.join(FLAGS.out, 'maps')}" if FLAGS.save_maps else ""))


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv)

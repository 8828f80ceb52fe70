"""Make the one file a line scores with: towers, class text, known-good bank and thresholds.

  fiseclip-bundle --weights FILE --class_name "metal nut" --normal_images GOOD_DIR
      [--threshold_from GOOD2_DIR --max_fpr F | --threshold T] [--references bank|both|rolling]
      --out part.bundle

(`python -m eval.bundle ...` in a checkout.) The bundle (docs/DESIGN.md §15) is a safetensors
file: the towers' params (or, with --noembed_weights, their checkpoint's sha256 and path), the
class's text features, the known-good images' feature maps (the bank), the thresholds and how they
were set, the full method config and the compiled batch (--batch_size). Nothing in it is pickled.
Load it with `fj.Predictor.load(path)`, score with `fiseclip-predict`, serve it with
`fiseclip-serve`, export it with `fiseclip-export`.

References: with --normal_images each part is compared with the known-good parts only
(--references bank, the default here: a part's score does not depend on what else is scored with
it) or with them and the other parts of its batch (both); --references rolling compares each part
with the --stream_window parts before it on its line. --threshold_from scores its known-good
images the same way and sets the image threshold at their (1 - --max_fpr) quantile and the pixel
threshold at the (1 - --max_pixel_fpr) quantile of their map values.
"""
from __future__ import annotations

import os
import time

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.data.order import draw
from fiseclip_jax.data.tiles import frame_size
from fiseclip_jax.outputs import decisions

FLAGS = flags.FLAGS


def define_flags() -> None:
  options.define_tower_flags()
  options.define_bank_flags("--normal_images (default: all of them)",
                            "Seed of the --k_shot draw from --normal_images.")
  options.define_method_flags(exclude=("reference_scope",))
  options.define_tile_flags()
  options.define_decision_flags()
  flags.DEFINE_string("class_name", None, "Required: what the parts show, as in the prompts (e.g. "
                      "'metal nut').")
  flags.DEFINE_string("normal_images", None, "Folder of known-good images: the bank of references.")
  flags.DEFINE_bool("recursive", False, "Also read the images in sub-folders of the folders given.")
  flags.DEFINE_integer("batch_size", 8, "The compiled batch: a predictor scores this many images per "
                       "call of the model (a short one padded).")
  flags.DEFINE_string("out", None, "Required: the bundle file to write (e.g. part.bundle).")
  flags.DEFINE_bool("embed_weights", True, "Put the towers' params in the bundle; "
                    "--noembed_weights stores their checkpoint's sha256 and path instead (the "
                    "loader checks the file it is given against it).")
  flags.DEFINE_bool("overwrite", False, "Replace the file --out if it exists.")
  flags.DEFINE_string("cache_dir", None, "JAX's persistent compilation cache (default "
                      "$FISECLIP_CACHE_DIR or ~/.cache/fiseclip_jax/xla; '' for none).")
  options.check("batch_size", options.at_least(1), ">= 1")
  options.check("stream_window", options.at_least(0), ">= 0")
  options.check("class_name", lambda v: bool(v.strip()), "a non-empty value")
  options.check("out", lambda v: bool(v.strip()), "a file path")


def _check_flags() -> bool:
  """The bundle's own checks, before anything is read; returns whether a bank is used."""
  if not FLAGS.class_name or not FLAGS.out:
    raise UsageError("--class_name NAME and --out FILE are required")
  if os.path.isdir(FLAGS.out):
    raise UsageError(f"--out {FLAGS.out} is a folder; expected the bundle's file path")
  if os.path.exists(FLAGS.out) and not FLAGS.overwrite:
    raise UsageError(f"--out {FLAGS.out} exists; pass --overwrite to replace it")
  stream = FLAGS.references == options.STREAM or bool(FLAGS.stream_window)
  if stream and FLAGS.normal_images:
    raise UsageError("--references rolling compares each part with the ones before it on its "
                     "line; it does not take --normal_images")
  if FLAGS.k_shot and not FLAGS.normal_images:
    raise UsageError("--k_shot draws from --normal_images: pass the folder of known-good images")
  if FLAGS.threshold is not None and decisions.parse_threshold(FLAGS.threshold) == decisions.AUTO:
    raise UsageError("--threshold auto fits a run's own scores; a bundle has none: pass a number "
                     "or --threshold_from GOOD_DIR")
  if FLAGS.threshold is not None and FLAGS.threshold_from:
    raise UsageError("--threshold and --threshold_from exclude each other")
  if FLAGS.pixel_threshold is not None and FLAGS.threshold_from:
    raise UsageError("--pixel_threshold and --threshold_from exclude each other")
  has_bank = bool(FLAGS.normal_images)
  mode = FLAGS.references or ("bank" if has_bank else "batch")
  if mode in ("bank", "both") and not has_bank:
    raise UsageError(f"--references {mode} needs --normal_images DIR (the known-good parts)")
  if mode == "batch" and not stream and FLAGS.batch_size < 2:
    raise UsageError(f"--batch_size {FLAGS.batch_size} leaves no part a reference in "
                     "--references batch: use >= 2, or --normal_images")
  options.check_weight_flags()
  options.tiling(stream)
  return has_bank


def _check_frames(bank, good) -> None:
  """--tile with known-good images: every one of them one size (the bank's tiles are the same
  places as a part's), before JAX starts."""
  if options.tiling() is None or not bank:
    return
  hw = frame_size([data.Sample(p) for p in bank], "--normal_images")
  if good and frame_size([data.Sample(p) for p in good], "--threshold_from") != hw:
    raise UsageError(f"--tile: the images of --threshold_from are not the size of "
                     f"--normal_images' ({hw[1]}x{hw[0]}, WxH)")


def _images(folder: str, flag: str, min_side: int, k_shot: int = 0):
  """The checked image paths of a folder (k_shot > 0: that many drawn with --seed)."""
  samples, _ = data.list_folder(folder, FLAGS.recursive)
  if not samples:
    raise UsageError(f"{flag} {folder}: no image found")
  if k_shot:
    samples = draw(samples, k_shot, FLAGS.seed)
  problems = data.check_files(samples, min_side)
  if problems:
    raise problems[0].error
  return [s.path for s in samples]


def _conf(backend: str, has_bank: bool):
  conf = options.fise_config(backend, has_bank)
  if FLAGS.references is None and has_bank:
    conf = conf.replace(references="bank")      # a part's score depends on the bank alone
  return conf


def run() -> None:
  has_bank = _check_flags()
  _conf("cpu", has_bank)                         # every method flag checked before JAX starts
  ckpts = runtime.read_checkpoints()
  runtime.check_model(_conf("cpu", has_bank), ckpts)
  runtime.check_class_name(FLAGS.class_name, ckpts)
  min_side = runtime.min_image_side(ckpts)
  bank = _images(FLAGS.normal_images, "--normal_images", min_side, FLAGS.k_shot) if has_bank else []
  good = _images(FLAGS.threshold_from, "--threshold_from", min_side) if FLAGS.threshold_from else []
  same = sorted({os.path.realpath(p) for p in bank} & {os.path.realpath(p) for p in good})
  if same:
    raise UsageError(f"{len(same)} image(s) of --threshold_from are also in --normal_images (e.g. "
                     f"{same[0]}): each would be compared with itself; keep the two sets apart")
  _check_frames(bank, good)
  warning = decisions.unresolvable_warning(len(good), FLAGS.max_fpr) if good else None
  backend = runtime.start()
  conf = _conf(backend, has_bank)
  t0 = time.time()
  if ckpts.random:
    print(f"RANDOM WEIGHTS ({FLAGS.model}): the bundle runs end to end but its scores are "
          "meaningless")
  e = runtime.deploy_engine()
  predictor = e.predictor.Predictor.build(
      class_name=FLAGS.class_name, conf=conf, cfg=ckpts.cfg, weights=FLAGS.weights,
      fi_cfg=ckpts.fi_cfg, fi_weights=FLAGS.fi_weights, model_name=FLAGS.model,
      normal_images=bank, batch_size=FLAGS.batch_size,
      threshold=None if FLAGS.threshold is None else float(FLAGS.threshold),
      pixel_threshold=FLAGS.pixel_threshold, threshold_from=good, max_fpr=FLAGS.max_fpr,
      max_pixel_fpr=FLAGS.max_pixel_fpr, cache_dir=FLAGS.cache_dir, tiling=options.tiling())
  if warning:
    print(f"warning: {warning}")
  size = predictor.save(FLAGS.out, embed_weights=FLAGS.embed_weights)
  d = predictor.bundle.decision
  fmt = lambda x: "none" if x is None else f"{x:.6f}"
  print(f"bundle {FLAGS.out}: {size / 2 ** 20:.1f} MiB, class {FLAGS.class_name!r}, references "
        f"{predictor.bundle.references}" + (f" ({len(bank)} known-good)" if bank else "")
        + f", batch {FLAGS.batch_size}, image {conf.image_size} px"
        + (f", tiles of {FLAGS.tile} px (overlap {FLAGS.tile_overlap})" if FLAGS.tile else "")
        + "; thresholds image "
        f"{fmt(d['image_threshold'])}, pixel {fmt(d['pixel_threshold'])} ({d['how'].split(':')[0]})"
        + ("" if FLAGS.embed_weights else "; weights referenced by sha256, not embedded")
        + f"; {time.time() - t0:.1f} s")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv)

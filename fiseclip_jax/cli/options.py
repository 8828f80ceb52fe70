"""Flags of the programs: generated from the configs' fields, plus the programs' own.

Each setting is declared once: a field of FiSeConfig (or of the benchmark's BenchConfig) becomes a
flag of the same name, with the field's help text and choices; `config_from_flags` turns the
parsed flags back into the config and reports a bad value as a usage error naming the flag.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Dict, Optional, Sequence

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.core.config import REFERENCE_MODES, ConfigError, FiSeConfig
from fiseclip_jax.data.tiles import Tiling
from fiseclip_jax.models.clip.config import VARIANTS
from fiseclip_jax.outputs import decisions
from fiseclip_jax.outputs.overlays import ColourScale

FLAGS = flags.FLAGS
STREAM = "rolling"            # --references rolling: a stream (FiSeConfig.stream_window > 0)
STREAM_DEFAULT_WINDOW = 16    # its window when --stream_window is not given
CATEGORY = "category"         # --references category: FiSeConfig.reference_scope "category"
# Knobs whose flag default differs from the field's: resolved when the run starts.
RESOLVED_LATER = {
    "compute_dtype": "Default: float32 on CPU, bfloat16 on GPU/TPU.",
    "references": "Default: batch, or both when a bank of known-good images is given.",
    "stream_window": f"Default: 0, or {STREAM_DEFAULT_WINDOW} with --references rolling.",
}


def _element(f: dataclasses.Field) -> type:
  """The item type of a tuple field (declared, or the default's first item's)."""
  if f.metadata.get("element") is not None:
    return f.metadata["element"]
  return type(f.default[0]) if isinstance(f.default, tuple) and f.default else str


def define_field_flag(f: dataclasses.Field, choices: Optional[Sequence[str]] = None,
                      later: Optional[Dict[str, str]] = None,
                      flag_values: flags.FlagValues = FLAGS) -> None:
  """One flag for one config field: enum (choices), list (tuples), bool, int, float or string."""
  later = later or {}
  name, default, meta = f.name, f.default, f.metadata
  help_text = meta["help"] + (" " + later[name] if name in later else "")
  if name in later:
    default = None
  choices = choices or meta.get("choices")
  kw = dict(flag_values=flag_values)
  element = _element(f)
  is_list = isinstance(f.default, tuple) or (f.default is None and meta.get("element") is not None
                                             and "Tuple" in str(f.type))
  if is_list:
    values = None if default is None else [str(x) for x in default]
    if choices is not None:          # each item is checked by the config (check_choices)
      help_text += f" Each of: {', '.join(c for c in choices if c is not None)}."
    flags.DEFINE_list(name, values, help_text, **kw)
  elif choices is not None:
    flags.DEFINE_enum(name, default, [c for c in choices if c is not None], help_text, **kw)
  elif isinstance(f.default, bool):
    flags.DEFINE_bool(name, default, help_text, **kw)
  elif isinstance(f.default, int) or element is int:
    flags.DEFINE_integer(name, default, help_text, **kw)
  elif isinstance(f.default, str):
    flags.DEFINE_string(name, default, help_text, **kw)
  else:                                      # float, or an optional float (default None)
    flags.DEFINE_float(name, default, help_text, **kw)


def _items(name: str, values, element: type) -> tuple:
  try:
    return tuple(element(v) for v in values)
  except ValueError:
    raise UsageError(f"--{name} {','.join(values)}: expected comma-separated "
                     f"{'integers' if element is int else 'values'}") from None


def field_values(cls, flag_values: flags.FlagValues = FLAGS) -> dict:
  """The parsed flags of a config dataclass's fields (the fields without a flag left out)."""
  kw = {}
  for f in dataclasses.fields(cls):
    if f.name not in flag_values:
      continue
    value = getattr(flag_values, f.name)
    if value is not None and (isinstance(f.default, tuple) or isinstance(value, list)):
      value = _items(f.name, value, _element(f))
    kw[f.name] = value
  return kw


def build(cls, kw: dict):
  """cls(**kw), a bad value reported as the flag that set it."""
  try:
    return cls(**kw)
  except ConfigError as e:
    raise UsageError(f"--{e.field} {e.detail}") from None


def define_method_flags(reference_modes: Sequence[str] = REFERENCE_MODES + (STREAM,),
                        exclude: Sequence[str] = (),
                        flag_values: flags.FlagValues = FLAGS) -> None:
  """One flag per FiSeConfig field (the references flag limited to `reference_modes`)."""
  later = dict(RESOLVED_LATER)
  if STREAM in reference_modes:       # the help names only what this program accepts
    later["references"] += (f" '{STREAM}': a stream, each image against the --stream_window "
                            "images before it.")
  if CATEGORY in reference_modes:
    later["references"] += (f" '{CATEGORY}': every other image of the category (--reference_scope "
                            "category; with a bank too when one is given).")
  for f in dataclasses.fields(FiSeConfig):
    if f.name in exclude:
      continue
    define_field_flag(f, reference_modes if f.name == "references" else None, later, flag_values)


def fise_config(backend: str, has_bank: bool, flag_values: flags.FlagValues = FLAGS) -> FiSeConfig:
  """FiSeConfig from the parsed flags: compute dtype by backend, reference mode by bank, and
  `--references rolling` as a stream of --stream_window (default 16)."""
  kw = field_values(FiSeConfig, flag_values)
  if kw.get("compute_dtype", "") is None:
    kw["compute_dtype"] = "float32" if backend == "cpu" else "bfloat16"
  if kw.get("references") == STREAM:
    kw["references"] = "batch"
    kw["stream_window"] = kw.get("stream_window") or STREAM_DEFAULT_WINDOW
  if kw.get("references") == CATEGORY:
    kw["references"] = None
    kw["reference_scope"] = CATEGORY
  if kw.get("references", "") is None:
    kw["references"] = "both" if has_bank else "batch"
  if kw.get("stream_window", 0) is None:
    kw["stream_window"] = 0
  return build(FiSeConfig, kw)


# ------------------------------------------------------------------------------------------------
# Checks of the programs' own flags, run by absl when the flags are parsed: one pass, before any
# file is read or JAX starts, so a bad value is one `error:` line at once (DESIGN.md §13).


def check(name: str, ok: Callable, expected: str, flag_values: flags.FlagValues = FLAGS) -> None:
  """Refuse --name when it is parsed unless ok(value) (unset, None, always passes); a ValueError
  raised by ok is the message."""
  def checker(value):
    if value is None:
      return True
    try:
      good = ok(value)
    except (ValueError, TypeError) as e:
      raise flags.ValidationError(str(e) or f"expected {expected}") from None
    if not good:
      raise flags.ValidationError(f"expected {expected}")
    return True
  flags.register_validator(name, checker, flag_values=flag_values)


def finite(x) -> bool:
  return math.isfinite(x)


def at_least(lo: float) -> Callable:
  return lambda x: math.isfinite(x) and x >= lo


def fraction(x) -> bool:
  """A share in [0, 1)."""
  return math.isfinite(x) and 0.0 <= x < 1.0


def non_empty_names(values) -> bool:
  return bool(values) and all(v.strip() for v in values)


def define_overlay_flags() -> None:
  """The overlays' flags, the same in every program that draws them."""
  flags.DEFINE_string("map_range", "0,1", "Colour scale of every overlay of the run: 'LO,HI', or "
                      "'threshold' (0 to 2x the pixel threshold, the threshold mid-scale).")
  flags.DEFINE_bool("overlay_legend", False, "Draw the colour bar and the key of the contour (and "
                    "ground truth) under each full-size overlay.")
  check("map_range", ColourScale.check, "'LO,HI' (LO < HI) or 'threshold'")


def define_decision_flags() -> None:
  """The thresholds' flags (docs/DESIGN.md §13), the same in the folder scorer and the bundle."""
  flags.DEFINE_string("threshold", None, "Image decision: pred_label 1 iff score >= this. A "
                      "number, or 'auto': set after scoring from the run's own scores, assuming "
                      "most parts are good: a normal fitted to their 25th and 50th percentiles "
                      "(corrected for the share of outlying parts), cut at its (1 - --max_fpr) "
                      f"point (docs/DESIGN.md §13); needs >= {decisions.MIN_AUTO_IMAGES} images; "
                      "no pixel threshold unless --pixel_threshold.")
  flags.DEFINE_string("threshold_from", None, "Folder of known-good images: scored like the run "
                      "(same references), the thresholds are set so that --max_fpr of them (and "
                      "--max_pixel_fpr of their pixels) are flagged.")
  flags.DEFINE_float("max_fpr", 0.01, "With --threshold_from: the share of known-good images "
                     "flagged (n of them resolve no less than 1/n); with --threshold auto: the share "
                     "of good parts the fit flags, in (0, 0.5).")
  flags.DEFINE_float("pixel_threshold", None, "Pixel decision: masks/<image>.png flags map >= this.")
  flags.DEFINE_float("max_pixel_fpr", 0.001, "With --threshold_from: the share of known-good pixels "
                     "flagged (the pixel threshold of the masks).")
  check("threshold", lambda v: decisions.parse_threshold(v) is not None,
        "a finite number or 'auto'")
  check("pixel_threshold", finite, "a finite number")
  for name in ("max_fpr", "max_pixel_fpr"):
    check(name, fraction, "a share in [0, 1)")


def define_run_flags(what: str, with_data_root: bool = True, multihost: bool = True) -> None:
  """Flags every scoring program shares: platform, model, batching, output, devices."""
  f = flags
  if with_data_root:
    f.DEFINE_string("data_root", None, f"Required: {what} root folder.")
    f.DEFINE_list("categories", None, "Categories to run (default: all found).")
  define_tower_flags()
  f.DEFINE_integer("batch_size", 16, "Images per batch (B): each image is scored against the others.")
  f.DEFINE_string("out", "results", "Output folder.")
  f.DEFINE_bool("resume", False, "Continue the run already in --out (refused if its settings differ).")
  f.DEFINE_bool("overwrite", False, "Replace an earlier run's outputs in --out.")
  f.DEFINE_bool("skip_bad_images", False, "Skip unreadable images (listed in the output) instead of failing.")
  if multihost:
    f.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, multi-node).")
    f.DEFINE_string("coordinator_address", None, "With --multihost off TPU: host:port of process 0.")
    f.DEFINE_integer("num_processes", None, "With --multihost off TPU: number of processes.")
    f.DEFINE_integer("process_id", None, "With --multihost off TPU: this process's index.")
  f.DEFINE_integer("num_devices", None, "Use only the first N local devices (default: all).")
  f.DEFINE_bool("progress", True, "Progress bar on a terminal, a periodic line in a log.")
  check("batch_size", at_least(1), ">= 1")
  check("num_devices", at_least(1), ">= 1 (or unset: all devices)")
  check("out", lambda v: bool(v.strip()), "a folder path")
  if with_data_root:
    check("categories", non_empty_names, "comma-separated category names, none empty")
  if multihost:
    check("num_processes", at_least(1), ">= 1")
    check("process_id", at_least(0), ">= 0")


def define_platform_flag() -> None:
  """--platform, the same in every program that starts JAX."""
  flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "JAX platform (set before any device "
                    "use).")


def define_tower_flags() -> None:
  """The platform and the towers' checkpoints (or random weights of a variant)."""
  f = flags
  define_platform_flag()
  f.DEFINE_string("weights", None, "Required unless --random_weights: the CLIP checkpoint converted "
                  "with `python -m weights.convert` (a DINOv2 one alone runs FiCLIP only).")
  f.DEFINE_string("fi_weights", None, "Another tower for FiCLIP's features (e.g. DINOv2, converted "
                  "with `python -m weights.convert`); CLIP (--weights) keeps SeCLIP.")
  f.DEFINE_bool("random_weights", False, "Random weights instead of --weights (numbers are meaningless).")
  f.DEFINE_enum("model", "vit_l14_336", list(VARIANTS), "Architecture for --random_weights "
                "(models/clip/config.py VARIANTS).")


def define_bank_flags(source: str = "the category's training split",
                      seed_help: str = "Seed of the shuffled image order and of the --k_shot draw."
                      ) -> None:
  flags.DEFINE_integer("k_shot", 0, f"Known-good images drawn (with --seed) from {source} as a "
                       "bank (0: none).")
  flags.DEFINE_integer("seed", 0, seed_help)
  check("k_shot", at_least(0), ">= 0 (0: no bank)")
  check("seed", lambda v: 0 <= v < 2 ** 32, "an integer in 0 .. 2^32 - 1")


def define_tile_flags() -> None:
  """--tile and --tile_overlap (DESIGN.md §17), the same in every program that tiles."""
  flags.DEFINE_integer("tile", None, "Cut each image at its own resolution into square tiles of "
                       "this many pixels (an image side no longer than it is one tile), score each "
                       "tile against the same tile of the other images (and of the known-good "
                       "images) and stitch the maps at the image's size; every image of a run (of "
                       "a category) must have one size. Default: untiled, the whole image resized.")
  flags.DEFINE_integer("tile_overlap", 0, "With --tile: the least overlap of neighbouring tiles in "
                       "pixels; their maps are blended across it.")
  check("tile", at_least(1), ">= 1 pixel")
  check("tile_overlap", at_least(0), ">= 0 pixels")


def tiling(streaming: bool = False) -> Optional[Tiling]:
  """The tiles --tile and --tile_overlap ask for (None: untiled), checked against each other."""
  if FLAGS.tile is None:
    if FLAGS.tile_overlap:
      raise UsageError("--tile_overlap is the overlap of tiles: it needs --tile")
    return None
  if FLAGS.tile_overlap >= FLAGS.tile:
    raise UsageError(f"--tile_overlap {FLAGS.tile_overlap}: expected less than --tile "
                     f"{FLAGS.tile}")
  if streaming:
    raise UsageError("--tile scores each tile against the same tile of other images in a batch "
                     "or a bank; it does not take --references rolling")
  if "resize" in FLAGS and FLAGS.resize == "letterbox":
    raise UsageError("--tile cuts each image at its own size; --resize letterbox is for whole "
                     "images: choose one")
  return Tiling(FLAGS.tile, FLAGS.tile_overlap)


def check_run_flags(has_bank: bool, references: Optional[str]) -> None:
  """The shared flags that only make sense together, before anything is loaded (each flag's own
  range is checked when it is parsed: `check`)."""
  mode = references or ("both" if has_bank else "batch")
  stream = mode == STREAM or bool("stream_window" in FLAGS and FLAGS.stream_window)
  whole = mode == CATEGORY or ("reference_scope" in FLAGS and FLAGS.reference_scope == CATEGORY)
  if whole and "tile" in FLAGS and FLAGS.tile is not None:
    raise UsageError("--references category scores whole images against the whole category; "
                     "--tile is for batches of frames: choose one")
  if mode == "batch" and not stream and not whole and FLAGS.batch_size < 2:
    raise UsageError(f"--batch_size {FLAGS.batch_size} leaves no image a reference in "
                     "--references batch: use >= 2, or a bank of known-good images")
  if mode in ("bank", "both") and not has_bank:
    raise UsageError(f"--references {mode} needs a bank of known-good images "
                     "(--k_shot K, or --normal_images DIR for eval.folder)")
  check_weight_flags()
  if FLAGS.resume and FLAGS.overwrite:
    raise UsageError("--resume and --overwrite exclude each other")


def check_weight_flags() -> None:
  """--weights or --random_weights, exactly one of them."""
  if not FLAGS.weights and not FLAGS.random_weights:
    raise UsageError("pass --weights FILE (convert one with `python -m weights.convert`) or "
                     "--random_weights")
  if FLAGS.weights and FLAGS.random_weights:
    raise UsageError("--weights and --random_weights exclude each other")


def split_unreadable(samples, min_side: int):
  """(readable samples, {path: reason} of the unreadable ones) from the files' headers: the first
  problem raised unless --skip_bad_images, each skipped one warned about on stderr."""
  problems = data.check_files(samples, min_side)
  if problems and not FLAGS.skip_bad_images:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise type(problems[0].error)(f"{problems[0].error}{more}; --skip_bad_images skips them")
  unreadable = {p.sample.path: str(p.error) for p in problems}
  for path, err in unreadable.items():
    sys.stderr.write(f"warning: skipping unreadable image {path}: {err}\n")
  return [s for s in samples if s.path not in unreadable], unreadable


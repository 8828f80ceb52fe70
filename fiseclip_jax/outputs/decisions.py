"""A run's decisions (docs/DESIGN.md §13): which parts are flagged, which pixels, and the numbers
an integrator reads. NumPy (and `overlays` to draw a part), never JAX: the folder scorer calls
these while and after scoring.

- One decision per part: the pixel threshold applies only inside the parts the image threshold
  flags; a part it passes gets no contour and an all-zero mask.
- `--threshold auto`: a threshold from the run's own scores, assuming most parts are good.
- Normalized scores: a fixed monotone map of the raw score that puts the run's threshold at 0.5.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np
from PIL import Image

from fiseclip_jax.outputs import metrics, overlays

AUTO = "auto"
MIN_AUTO_IMAGES = 20       # below, the quartile rests on too few scores (5 of 20)
NORMAL = NormalDist()
AUTO_RULE = ("auto: the good parts' scores fitted as a normal from the run's 25th percentile Q1 "
             "and median m (the lower half only): threshold = m + z(1 - max_fpr) x (m - Q1) / "
             "0.6745; assumes most parts are good and their scores roughly normal")
NORMALIZED_RULE = ("score / (score + t), t the image threshold: 0 -> 0, t -> 0.5, strictly "
                   "increasing towards 1")


class FitError(ValueError):
  """The run's scores cannot support an automatic threshold; the message says why."""


def parse_threshold(text) -> Union[float, str, None]:
  """--threshold's value: a finite float, AUTO, or None when it is neither (or unset)."""
  if text is None:
    return None
  if isinstance(text, str) and text.strip().lower() == AUTO:
    return AUTO
  try:
    x = float(text)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def auto_max_fpr_ok(max_fpr: float) -> bool:
  """0 < max_fpr < 0.5: z(1 - max_fpr) finite and positive (the threshold above the location)."""
  return math.isfinite(max_fpr) and 0.0 < max_fpr < 0.5


class AutoFit(NamedTuple):
  """The fit behind `--threshold auto` (for run.json): the threshold and the numbers behind it."""
  threshold: float
  n: int
  median: float          # the good parts' location
  q25: float
  scale: float           # the good parts' standard deviation, (median - q25) / z(0.75)
  z: float               # z(1 - max_fpr)
  max_fpr: float


def auto_threshold(scores, max_fpr: float) -> AutoFit:
  """The image threshold of a run without known-good images, from its own scores (N,).

  The good parts' scores are taken as normal and fitted from the lower half of the sample only:
  location = the median m, scale = (m - Q1) / z(0.75) = (m - Q1) / 0.6745 (Q1 the 25th
  percentile, numpy's linear interpolation); threshold = m + z(1 - max_fpr) x scale. The
  defective parts lie above the good ones, so their values never enter, only their number: a
  share c of them lifts m and Q1 a little (to the good parts' 0.5 / (1 - c) and 0.25 / (1 - c)
  quantiles), which errs towards flagging fewer good parts than max_fpr. Good scores skewed to the
  right (a long upper tail) are flagged more often than max_fpr.
  FitError: fewer than MIN_AUTO_IMAGES scores, or a scale that is 0 or not finite.
  """
  x = np.asarray(scores, np.float64).ravel()                 # (N,)
  if x.size < MIN_AUTO_IMAGES:
    raise FitError(f"{x.size} score(s): an automatic threshold needs at least "
                   f"{MIN_AUTO_IMAGES} images")
  if not np.isfinite(x).all():
    raise FitError("the scores contain NaN or inf")
  if not auto_max_fpr_ok(max_fpr):
    raise FitError(f"max_fpr {max_fpr}: expected 0 < max_fpr < 0.5")
  median, q25 = float(np.median(x)), float(np.quantile(x, 0.25))
  if not (math.isfinite(median - q25) and median > q25):
    raise FitError(f"the lower half of the {x.size} scores has no spread (median {median:.6g} = "
                   f"25th percentile): no scale to set a threshold from")
  scale = (median - q25) / NORMAL.inv_cdf(0.75)
  z = NORMAL.inv_cdf(1.0 - max_fpr)
  return AutoFit(median + z * scale, int(x.size), median, q25, scale, z, float(max_fpr))


def auto_pending(pixel_threshold: Optional[float]) -> dict:
  """The decision of a --threshold auto run while it scores: the image threshold pending."""
  return {"image_threshold": None, "pixel_threshold": pixel_threshold, "pending": True,
          "how": AUTO_RULE + "; pixel threshold: " + (
              "given (--pixel_threshold)" if pixel_threshold is not None
              else "none (no --pixel_threshold)")}


def settle(decision: dict, scores, max_fpr: float) -> dict:
  """The decision once every score (N,) is in: a pending one fitted (`auto_threshold`, which may
  raise FitError), its fit under "auto"; any other unchanged."""
  if not decision.get("pending"):
    return decision
  fit = auto_threshold(scores, max_fpr)
  kept = {k: v for k, v in decision.items() if k != "pending"}
  return {**kept, "image_threshold": fit.threshold, "auto": fit._asdict()}


def known_good(scores, maps, max_fpr: float, max_pixel_fpr: float, how: str,
               scores_file: str) -> dict:
  """The decision set by known-good images: the (1 - max_fpr) quantile of their scores (n,) and
  of their map values (n, S, S), with the smallest FPR n images resolve (1 / n)."""
  image = metrics.threshold_at_fpr(scores, max_fpr)
  pixel = metrics.threshold_at_fpr(maps, max_pixel_fpr)
  n = int(np.size(scores))
  return {"image_threshold": image["threshold"], "pixel_threshold": pixel["threshold"],
          "how": f"{how}: the (1 - max_fpr) quantile of their scores (image) and of their map "
                 "values (pixel)",
          "resolvable_fpr": resolvable_fpr(n),
          "known_good": {"n": n, "image": image, "pixel": pixel, "scores": scores_file}}


def describe_auto(fit: dict) -> str:
  """The line a run prints for its automatic threshold (an `AutoFit` as a dict)."""
  return (f"threshold auto from {fit['n']} scores: median {fit['median']:.6f} + z "
          f"{fit['z']:.3f} x scale {fit['scale']:.6f} = {fit['threshold']:.6f} (--max_fpr "
          f"{fit['max_fpr']:g}; most parts assumed good)")


def resolvable_fpr(n: int) -> float:
  """The smallest non-zero false-positive rate n known-good images can measure: 1 / n."""
  return 1.0 / n


def unresolvable_warning(n: int, max_fpr: float) -> Optional[str]:
  """One line when n known-good images cannot resolve max_fpr (max_fpr < 1 / n), else None."""
  if n <= 0 or max_fpr >= resolvable_fpr(n):
    return None
  return (f"{n} known-good images cannot resolve --max_fpr {max_fpr:g}: the smallest FPR they can "
          f"measure is 1/{n} = {resolvable_fpr(n):.3g}; the threshold lands above their highest "
          "score")


def part_pixel_threshold(score: float, image_threshold: Optional[float],
                         pixel_threshold: Optional[float]) -> Optional[float]:
  """The pixel threshold inside one part: None (no contour, an all-zero mask) when the image
  threshold passes it (score < image_threshold); the pixel rule alone without an image threshold."""
  if image_threshold is not None and not score >= image_threshold:
    return None
  return pixel_threshold


def write_part(overlay_path: str, mask_path: Optional[str], rgb: np.ndarray, anomaly_map,
               scale: "overlays.ColourScale", score: float, threshold: Optional[float],
               legend: bool = False) -> None:
  """A part's overlay, with the contour at `threshold` (none when None), and its mask (mask_path
  None: none; all zero when threshold is None, the part passed). rgb (H, W, 3) uint8, anomaly_map
  (S, S) or (H, W); legend: the key strip under the overlay."""
  overlays.save_overlay(overlay_path, rgb, anomaly_map, scale, threshold, score, legend=legend)
  if mask_path is None:
    return
  hw = rgb.shape[:2]
  if threshold is None:
    overlays.save_png(mask_path, Image.fromarray(np.zeros(hw, np.uint8), mode="L"))
  else:
    overlays.save_mask(mask_path, anomaly_map, threshold, hw)


def load_map(path: str) -> np.ndarray:
  """A map written by `overlays.save_map` (float16, the image's size) as float32 (H, W)."""
  return np.load(path).astype(np.float32)


def normalize(scores, threshold: float) -> np.ndarray:
  """Scores (N,) >= 0 -> [0, 1): s / (s + t), the image threshold t > 0 at exactly 0.5.

  Strictly increasing (the order of the raw scores is kept, none clipped: a score has no upper
  bound, DESIGN §7), fixed by t alone. `normalize(s) >= 0.5` iff `s >= t` holds exactly: a
  rounding that would put a passed score at 0.5 is moved to the float below it.
  """
  if not (math.isfinite(threshold) and threshold > 0):
    raise ValueError(f"normalized scores need a positive image threshold, got {threshold}")
  s = np.maximum(np.asarray(scores, np.float64), 0.0)         # (N,)
  out = s / (s + threshold)
  below = np.nextafter(0.5, 0.0)
  return np.where(s >= threshold, np.maximum(out, 0.5), np.minimum(out, below))


def label_columns(scores, threshold: Optional[float], normalized: bool
                  ) -> Tuple[List[str], List[list]]:
  """scores.csv's decision columns for scores (N,): pred_label (score >= threshold) and, if
  normalized, score_normalized (shortest repr, so a value read back keeps its side of 0.5).
  No threshold: no column."""
  if threshold is None:
    return [], [[] for _ in np.ravel(scores)]
  s = np.asarray(scores, np.float64).ravel()                  # (N,)
  labels = [int(x >= threshold) for x in s]
  if not normalized:
    return ["pred_label"], [[k] for k in labels]
  return ["pred_label", "score_normalized"], [
      [k, repr(float(v))] for k, v in zip(labels, normalize(s, threshold))]

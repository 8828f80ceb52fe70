"""Heat maps that do not lie: at the image's own size, on one colour scale for a whole run.

A map is computed on the model's square input (S x S); it is resampled back to the image's original
height and width (bilinear), coloured on a fixed range shared by every image of a run (so a perfect
part is not as red as a broken one), and drawn over the image with the decision threshold as a
contour, the image score written on it, and in benchmark mode the ground-truth outline.
"""
from __future__ import annotations

import io
import math
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.data.preprocess import read_rgb

CONTOUR = (255, 255, 255)       # the threshold's contour
GROUND_TRUTH = (0, 255, 0)      # the ground-truth outline


class ColourScale(NamedTuple):
  """Map values lo..hi go from blue to red; outside they are clipped."""
  lo: float
  hi: float

  @classmethod
  def parse(cls, text: str, threshold: Optional[float] = None) -> "ColourScale":
    """"LO,HI" (a fixed range), or "threshold": 0..2 x threshold, the threshold mid-scale."""
    if text == "threshold":
      if threshold is None or not threshold > 0:
        raise ValueError("a colour scale anchored at the threshold needs a positive threshold")
      return cls(0.0, 2.0 * float(threshold))
    try:
      lo, hi = (float(v) for v in text.split(","))
    except ValueError:
      raise ValueError(f"map range {text!r}: expected 'LO,HI' or 'threshold'") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
      raise ValueError(f"map range {text!r}: expected finite numbers")
    if not hi > lo:
      raise ValueError(f"map range {text!r}: expected LO < HI")
    return cls(lo, hi)

  @classmethod
  def check(cls, text: str) -> bool:
    """True for 'threshold' or a valid 'LO,HI'; otherwise ValueError naming the problem."""
    if text != "threshold":
      cls.parse(text)
    return True

  @classmethod
  def for_run(cls, text: str, threshold: Optional[float]) -> "ColourScale":
    """The scale of a run's overlays: 'threshold' without a positive threshold (a category with
    no defect has no pixel F1 threshold) falls back to 0..1."""
    if text == "threshold" and not (threshold is not None and threshold > 0):
      return cls(0.0, 1.0)
    return cls.parse(text, threshold)

  def unit(self, x: np.ndarray) -> np.ndarray:
    return np.clip((x - self.lo) / (self.hi - self.lo), 0.0, 1.0)


def jet(m: np.ndarray) -> np.ndarray:
  """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3) on a jet-like scale (blue low, red high)."""
  m = np.clip(m, 0.0, 1.0)
  rgb = np.stack([np.clip(1.5 - np.abs(4 * m - 3), 0, 1), np.clip(1.5 - np.abs(4 * m - 2), 0, 1),
                  np.clip(1.5 - np.abs(4 * m - 1), 0, 1)], -1)
  return (255 * rgb).astype(np.uint8)


def resize_map(anomaly_map: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  """(S, S) map -> (H, W) float32, bilinear: the model's square input back to the image's shape."""
  h, w = hw
  m = np.asarray(anomaly_map, np.float32)
  if m.shape == (h, w):
    return m
  return np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """The boundary pixels of a boolean mask (inside the mask, `width` pixels thick)."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return mask
  return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def render(rgb: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale,
           threshold: Optional[float] = None, score: Optional[float] = None,
           ground_truth: Optional[np.ndarray] = None, alpha: float = 0.5) -> np.ndarray:
  """The overlay (H, W, 3) uint8 of an image (H, W, 3) uint8 and its map at any size."""
  h, w = rgb.shape[:2]
  m = resize_map(anomaly_map, (h, w))
  out = (1 - alpha) * rgb.astype(np.float32) + alpha * jet(scale.unit(m)).astype(np.float32)
  out = out.astype(np.uint8)
  line = max(1, round(min(h, w) / 300))
  if threshold is not None:
    out[outline(m >= threshold, line)] = CONTOUR
  if ground_truth is not None:
    out[outline(ground_truth, line)] = GROUND_TRUTH
  if score is not None:
    out = _caption(out, f"score {score:.3f}")
  return out


def _caption(rgb: np.ndarray, text: str) -> np.ndarray:
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  box = draw.textbbox((4, 4), text)
  draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
  draw.text((4, 4), text, fill=(255, 255, 255))
  return np.asarray(img)


def read_original(image_path: str) -> np.ndarray:
  """The image as uint8 RGB at its own size (any mode converted as the loader does)."""
  return np.asarray(read_rgb(image_path))


def save_overlay(path: str, rgb: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale,
                 threshold: Optional[float] = None, score: Optional[float] = None,
                 ground_truth: Optional[np.ndarray] = None, max_side: Optional[int] = None) -> None:
  """Write the overlay of an image (`read_original`'s array) as PNG at its own size (or shrunk to
  max_side)."""
  out = render(rgb, anomaly_map, scale, threshold, score, ground_truth)
  img = Image.fromarray(out)
  if max_side and max(img.size) > max_side:
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  save_png(path, img)


def save_mask(path: str, anomaly_map: np.ndarray, threshold: float, hw: Tuple[int, int]) -> None:
  """The binary defect mask (map >= threshold) at the image's own size, 0/255 PNG."""
  mask = resize_map(anomaly_map, hw) >= threshold
  save_png(path, Image.fromarray((mask * 255).astype(np.uint8), mode="L"))


def save_png(path: str, img: Image.Image) -> None:
  """A PIL image as PNG, written atomically (`core.files.atomic_write`; no fsync: a kill leaves the
  old file or the new one, and a run writes thousands)."""
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  atomic_write(path, buf.getvalue(), fsync=False)


def save_map(path: str, anomaly_map: np.ndarray, hw: Tuple[int, int]) -> None:
  """The map at the image's own size as float16 .npy, written atomically."""
  buf = io.BytesIO()
  np.save(buf, resize_map(anomaly_map, hw).astype(np.float16))
  atomic_write(path, buf.getvalue(), fsync=False)


def ground_truth_mask(mask_path: Optional[str], hw: Tuple[int, int]) -> Optional[np.ndarray]:
  """A sample's ground truth at its image's size (None without one)."""
  if mask_path is None:
    return None
  with Image.open(mask_path) as m:
    gt = np.asarray(m.convert("L")) > 0
  return gt if gt.shape == tuple(hw) else None


def map_name(image_path: str, root: str) -> str:
  """A file name for an image's outputs that no other image of the run can share: its path
  relative to the run's root, extension kept ('a.jpg' and 'a.png' differ)."""
  return os.path.relpath(os.path.abspath(image_path), os.path.abspath(root))

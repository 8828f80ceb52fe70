"""Heat maps that do not lie: at the image's own size, on one colour scale for a whole run.

A map is computed on the model's square input (S x S); it is resampled back to the image's original
height and width (bilinear), coloured on a fixed range shared by every image of a run (so a perfect
part is not as red as a broken one), and drawn over the image with the decision threshold as a
contour, the image score written on it, and in benchmark mode the ground-truth outline.

The colours are matplotlib's perceptual `inferno`, laid over the image with an opacity that grows
with the value: 0 at the bottom of the scale (the part shows as it is), MAX_OPACITY from OPAQUE_FROM
of the scale up, so low scores never stain the part. `legend_strip` draws the scale, the contour and
the ground truth's colours as a strip under an overlay (`--overlay_legend`); the HTML pages draw the
same legend from `legend_stops` and the colour constants here.
"""
from __future__ import annotations

import functools
import io
import math
import os
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.data.preprocess import read_rgb

COLOUR_MAP = "inferno"          # matplotlib's name; perceptual, dark to light
MAX_OPACITY = 0.75              # the colour's weight over the image at the top of the scale
OPAQUE_FROM = 0.5               # the share of the scale from which MAX_OPACITY applies
CONTOUR = (255, 255, 255)       # the threshold's contour
GROUND_TRUTH = (0, 255, 0)      # the ground-truth outline
CAPTION = (235, 235, 235)       # the score's text (not pure white: never mistaken for the contour)
CAPTION_BOX = (0, 0, 0)


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


@functools.lru_cache(maxsize=1)
def _lut() -> np.ndarray:
  """(256, 3) uint8: COLOUR_MAP sampled at 256 evenly spaced values."""
  from matplotlib import colormaps
  return np.round(255 * colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3]).astype(np.uint8)


def colour(u: np.ndarray) -> np.ndarray:
  """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3) on COLOUR_MAP (clipped)."""
  idx = np.round(255 * np.clip(np.nan_to_num(np.asarray(u, np.float32)), 0.0, 1.0)).astype(np.int32)
  return _lut()[idx]


def opacity(u: np.ndarray) -> np.ndarray:
  """The colour's weight at scale position u in [0, 1]: 0 at the bottom, MAX_OPACITY from
  OPAQUE_FROM up (linear between)."""
  return MAX_OPACITY * np.clip(np.asarray(u, np.float32) / OPAQUE_FROM, 0.0, 1.0)


def legend_stops(n: int = 9) -> List[Tuple[float, Tuple[int, int, int]]]:
  """n (position, RGB) points of the colour map, for a CSS gradient of the same scale."""
  return [(float(u), tuple(int(c) for c in colour(np.float32(u)))) for u in np.linspace(0, 1, n)]


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
           ground_truth: Optional[np.ndarray] = None, legend: bool = False) -> np.ndarray:
  """The overlay (H, W, 3) uint8 of an image (H, W, 3) uint8 and its map at any size; legend: a
  strip under it (H + strip, W, 3) with the colour scale and what the lines mean."""
  h, w = rgb.shape[:2]
  m = resize_map(anomaly_map, (h, w))
  u = scale.unit(m)
  a = opacity(u)[..., None]                                             # (H, W, 1)
  out = (1 - a) * rgb.astype(np.float32) + a * colour(u).astype(np.float32)
  out = np.round(out).astype(np.uint8)
  line = max(1, round(min(h, w) / 300))
  if threshold is not None:
    out[outline(m >= threshold, line)] = CONTOUR
  if ground_truth is not None:
    out[outline(ground_truth, line)] = GROUND_TRUTH
  if score is not None:
    out = _caption(out, f"score {score:.3f}")
  if legend:
    out = np.concatenate([out, legend_strip(w, scale, threshold, ground_truth is not None)], 0)
  return out


@functools.lru_cache(maxsize=16)
def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):        # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def text_size(h: int, w: int) -> int:
  """A caption size readable when the image is shown shrunk to a thumbnail."""
  return max(11, round(min(h, w) / 24))


def _caption(rgb: np.ndarray, text: str) -> np.ndarray:
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  font = _font(text_size(*rgb.shape[:2]))
  pad = max(3, font.size // 4) if hasattr(font, "size") else 3
  box = draw.textbbox((pad + 1, pad + 1), text, font=font)
  draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=CAPTION_BOX)
  draw.text((pad + 1, pad + 1), text, fill=CAPTION, font=font)
  return np.asarray(img)


def legend_strip(width: int, scale: ColourScale, threshold: Optional[float] = None,
                 ground_truth: bool = False) -> np.ndarray:
  """(h, width, 3) uint8: the colour bar from scale.lo to scale.hi (a tick at the threshold), and
  a key for the contour and the ground truth, in the overlays' own colours."""
  size = max(11, min(28, round(width / 40)))
  font, pad = _font(size), max(4, size // 2)
  bar_h = max(8, size)
  h = pad + bar_h + pad + size + pad + (size + pad)
  img = Image.new("RGB", (width, h), (24, 24, 24))
  draw = ImageDraw.Draw(img)
  x0, x1 = pad, max(pad + 2, width - pad)
  ramp = colour(np.linspace(0.0, 1.0, x1 - x0, dtype=np.float32)[None, :])     # (1, W', 3)
  img.paste(Image.fromarray(np.repeat(ramp, bar_h, 0)), (x0, pad))
  y_text = pad + bar_h + pad // 2
  draw.text((x0, y_text), f"{scale.lo:.3g}", fill=CAPTION, font=font)
  hi = f"{scale.hi:.3g}"
  draw.text((x1 - draw.textlength(hi, font=font), y_text), hi, fill=CAPTION, font=font)
  if threshold is not None and scale.lo <= threshold <= scale.hi:
    xt = x0 + round(float(scale.unit(np.float32(threshold))) * (x1 - x0 - 1))
    draw.rectangle((xt - 1, pad - 2, xt + 1, pad + bar_h + 2), fill=CONTOUR)
  keys = [(CONTOUR, f"map >= {threshold:.3g}: defect" if threshold is not None else None),
          (GROUND_TRUTH, "ground truth" if ground_truth else None)]
  x, y = x0, h - pad - size
  for rgb, text in keys:
    if text is None:
      continue
    draw.rectangle((x, y + size // 3, x + size, y + size // 3 + max(2, size // 6)), fill=rgb)
    draw.text((x + size + pad // 2, y), text, fill=CAPTION, font=font)
    x += size + pad + round(draw.textlength(text, font=font)) + 2 * pad
  return np.asarray(img)


def read_original(image_path: str) -> np.ndarray:
  """The image as uint8 RGB at its own size (any mode converted as the loader does)."""
  return np.asarray(read_rgb(image_path))


def shrunk_size(hw: Tuple[int, int], max_side: Optional[int]) -> Optional[Tuple[int, int]]:
  """(width, height) of an (H, W) image shrunk to a longest side of max_side; None when it fits
  (or max_side is None)."""
  h, w = hw
  if not max_side or max(h, w) <= max_side:
    return None
  f = max_side / max(h, w)
  return max(1, round(w * f)), max(1, round(h * f))


def save_overlay(path: str, rgb: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale,
                 threshold: Optional[float] = None, score: Optional[float] = None,
                 ground_truth: Optional[np.ndarray] = None, max_side: Optional[int] = None,
                 legend: bool = False) -> None:
  """Write the overlay of an image (`read_original`'s array) as PNG at its own size (or shrunk to
  max_side), with the legend strip under it if asked."""
  size = shrunk_size(rgb.shape[:2], max_side)
  if size is not None:                      # shrink first, so the lines and text keep their size
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    if ground_truth is not None:
      ground_truth = np.asarray(Image.fromarray(ground_truth.astype(np.uint8) * 255).resize(
          size, Image.Resampling.NEAREST)) > 0
  save_png(path, Image.fromarray(render(rgb, anomaly_map, scale, threshold, score, ground_truth,
                                        legend)))


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

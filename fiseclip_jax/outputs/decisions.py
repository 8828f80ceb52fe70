"""A run's decisions (docs/DESIGN.md §13): which parts are flagged and which of their pixels.
NumPy (and `overlays` to draw a part), never JAX.

- One decision per part: the pixel threshold applies only inside the parts the image threshold
  flags; a part it passes gets no contour and an all-zero mask.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from fiseclip_jax.outputs import overlays


def part_pixel_threshold(score: float, image_threshold: Optional[float],
                         pixel_threshold: Optional[float]) -> Optional[float]:
  """The pixel threshold inside one part: None (no contour, an all-zero mask) when the image
  threshold passes it (score < image_threshold); the pixel rule alone without an image threshold."""
  if image_threshold is not None and not score >= image_threshold:
    return None
  return pixel_threshold


def write_part(overlay_path: str, mask_path: Optional[str], rgb: np.ndarray, anomaly_map,
               scale: "overlays.ColourScale", score: float, threshold: Optional[float]) -> None:
  """A part's overlay, with the contour at `threshold` (none when None), and its mask (mask_path
  None: none; all zero when threshold is None, the part passed). rgb (H, W, 3) uint8, anomaly_map
  (S, S) or (H, W)."""
  overlays.save_overlay(overlay_path, rgb, anomaly_map, scale, threshold, score)
  if mask_path is None:
    return
  hw = rgb.shape[:2]
  if threshold is None:
    overlays.save_png(mask_path, Image.fromarray(np.zeros(hw, np.uint8), mode="L"))
  else:
    overlays.save_mask(mask_path, anomaly_map, threshold, hw)

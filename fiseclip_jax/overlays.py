"""Heat-map overlays: an anomaly map in colour over its image, as a PNG."""
from __future__ import annotations

import os

import numpy as np


def jet(m: np.ndarray) -> np.ndarray:
  """Values in [0, 1] (H, W) -> uint8 RGB (H, W, 3) on a jet-like scale (blue low, red high)."""
  m = np.clip(m, 0.0, 1.0)
  rgb = np.stack([np.clip(1.5 - np.abs(4 * m - 3), 0, 1), np.clip(1.5 - np.abs(4 * m - 2), 0, 1),
                  np.clip(1.5 - np.abs(4 * m - 1), 0, 1)], -1)
  return (255 * rgb).astype(np.uint8)


def save_overlay(path: str, image_path: str, anomaly_map: np.ndarray) -> None:
  """Heat map (min-max normalized per image) blended over the input image."""
  from PIL import Image
  from fiseclip_jax.data import to_uint8_rgb
  size = anomaly_map.shape[0]
  rgb = to_uint8_rgb(image_path, size).astype(np.float32)
  m = anomaly_map - anomaly_map.min()
  m = m / max(float(m.max()), 1e-12)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray((0.5 * rgb + 0.5 * jet(m)).astype(np.uint8)).save(path)


def map_name(image_path: str, root: str) -> str:
  """A file name for an image's outputs that no other image of the run can share: its path
  relative to the run's root, extension kept ('a.jpg' and 'a.png' differ)."""
  return os.path.relpath(os.path.abspath(image_path), os.path.abspath(root))

"""Tiles of a large frame at its own resolution, and their maps stitched back (DESIGN.md §17).

A frame of (H, W) pixels is cut, per axis, into tiles of `tile` pixels that overlap by at least
`overlap`: the first starts at 0, the last ends flush with the frame, the rest are spread evenly
between them. An axis no longer than `tile` is one tile covering it, so a tile at least the
frame's longest side is one tile: the whole frame, exactly the untiled input. Each tile's map
(model size) is resized to its box and the maps are averaged with weights that ramp linearly
across each overlap (1 at the frame's borders), so seams do not show and the weights sum to 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

import numpy as np

from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.datasets import Sample
from fiseclip_jax.data.preprocess import read_size

Box = Tuple[int, int, int, int]       # (top, left, height, width) in frame pixels


@dataclasses.dataclass(frozen=True)
class Tiling:
  """tile: a tile's side in frame pixels; overlap: the least overlap of two neighbours."""
  tile: int
  overlap: int = 0

  def __post_init__(self):
    if self.tile < 1:
      raise ValueError(f"tile must be >= 1 pixel, got {self.tile}")
    if not 0 <= self.overlap < self.tile:
      raise ValueError(f"tile overlap must be in [0, tile = {self.tile}), got {self.overlap}")


def frame_size(samples: Sequence[Sample], what: str) -> Tuple[int, int]:
  """The one (H, W) of every sample's image (headers only): tiles take the same places on every
  frame, so frames of another size are one error naming the file."""
  if not samples:
    raise BadInputError(f"{what}: no image to tile")
  first = samples[0].path
  w, h = read_size(first)
  for s in samples[1:]:
    ws, hs = read_size(s.path)
    if (ws, hs) != (w, h):
      raise BadInputError(f"tiles are cut in the same places on every frame: {s.path} is {ws}x{hs} "
                          f"(WxH) but {first} is {w}x{h}; {what} must hold frames of one size")
  return h, w


def starts(length: int, tiling: Tiling) -> List[int]:
  """The first pixel of each tile along an axis of `length` pixels."""
  if length <= tiling.tile:
    return [0]
  step = tiling.tile - tiling.overlap
  n = math.ceil((length - tiling.tile) / step) + 1
  last = length - tiling.tile
  return [round(i * last / (n - 1)) for i in range(n)]


def boxes(hw: Tuple[int, int], tiling: Tiling) -> List[Box]:
  """The tiles of an (H, W) frame, row-major, as (top, left, height, width)."""
  h, w = hw
  th, tw = min(tiling.tile, h), min(tiling.tile, w)
  return [(top, left, th, tw) for top in starts(h, tiling) for left in starts(w, tiling)]


def _ramp(size: int, before: int, after: int) -> np.ndarray:
  """(size,) weights of one tile along an axis: a linear ramp over the `before` pixels it shares
  with the previous tile and the `after` it shares with the next, 1 elsewhere."""
  x = np.arange(size, dtype=np.float64) + 0.5          # pixel centres from the tile's start
  w = np.ones(size)
  if before > 0:
    w = np.minimum(w, x / before)
  if after > 0:
    w = np.minimum(w, (size - x) / after)
  return w


def _axis_weights(length: int, tiling: Tiling) -> List[np.ndarray]:
  """Each tile's ramps along an axis, divided by their sum at each pixel (where three tiles
  overlap, a large overlap, the ramps alone do not sum to 1)."""
  s = starts(length, tiling)
  size = min(tiling.tile, length)
  ends = [a + size for a in s]
  ramps = [_ramp(size, ends[i - 1] - a if i else 0, ends[i] - s[i + 1] if i + 1 < len(s) else 0)
           for i, a in enumerate(s)]
  total = np.zeros(length)
  for a, r in zip(s, ramps):
    total[a:a + size] += r
  return [r / total[a:a + size] for a, r in zip(s, ramps)]


def blend_weights(hw: Tuple[int, int], tiling: Tiling) -> List[np.ndarray]:
  """Each tile's (height, width) float64 weights, in `boxes` order; they sum to 1 on the frame."""
  rows, cols = _axis_weights(hw[0], tiling), _axis_weights(hw[1], tiling)
  return [np.outer(r, c) for r in rows for c in cols]


def stitch(tile_maps: Sequence[np.ndarray], hw: Tuple[int, int], tiling: Tiling,
           resize) -> np.ndarray:
  """(H, W) float32 map of a frame from its tiles' maps (in `boxes` order, any square size):
  each resized to its box by resize(map, (height, width)), then blended by `blend_weights`."""
  bxs = boxes(hw, tiling)
  if len(tile_maps) != len(bxs):
    raise ValueError(f"{len(tile_maps)} tile maps for the {len(bxs)} tiles of a {hw} frame")
  out = np.zeros(hw, np.float64)
  total = np.zeros(hw, np.float64)
  for m, (top, left, h, w), wt in zip(tile_maps, bxs, blend_weights(hw, tiling)):
    out[top:top + h, left:left + w] += wt * np.asarray(resize(m, (h, w)), np.float64)
    total[top:top + h, left:left + w] += wt
  return (out / total).astype(np.float32)

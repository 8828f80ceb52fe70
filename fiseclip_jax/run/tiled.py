"""Tiled scoring (DESIGN.md §17): large frames cut into tiles at their own resolution, each tile
position scored as its own set of slots, the maps stitched back at the frame's size.

A batch of frames is scored once per tile position: the slots of a call are the same tile of
each frame, so a tile's references are the same place on the other frames (and on the bank's
frames, whose bank is built per position), which is what aligned parts need and keeps each call
the untiled program's shape. Results come back as the untiled scorer's: one `BatchResult` per
batch of frames, with the frame's own samples, the image score the maximum over its tiles and the
map at the frame's (H, W).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from fiseclip_jax import data
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data import Sample
from fiseclip_jax.data.tiles import Tiling, boxes, frame_size, stitch
from fiseclip_jax.outputs.overlays import resize_map
from fiseclip_jax.run import scoring, towers
from fiseclip_jax.run.scoring import BatchResult, Collector, Scored


def at(samples: Sequence[Sample], box) -> List[Sample]:
  """The samples restricted to one tile."""
  return [dataclasses.replace(s, box=box) for s in samples]


def banks_on(model, conf, samples: Sequence[Sample], tiling: Tiling, hw: Tuple[int, int], mesh):
  """One known-good bank per tile position, in `boxes` order (the bank's frames must be hw)."""
  got = frame_size(samples, "the known-good images")
  if got != tuple(hw):
    raise BadInputError(f"--tile: the known-good image {samples[0].path} is {got[1]}x{got[0]} "
                        f"(WxH) but the scored frames are {hw[1]}x{hw[0]}; a bank's tiles must "
                        "be the same places as the frames'")
  return [towers.bank_on(model, conf, at(samples, b), mesh) for b in boxes(hw, tiling)]


def _combine(parts: List[BatchResult], frames: List[Optional[Sample]], hw, tiling: Tiling,
             with_masks: bool) -> BatchResult:
  """One batch's tile results (one per position, the same slots) as its frames' result."""
  first = parts[0]
  b = len(first.query)
  maps = np.zeros((b, *hw), np.float32)                              # (B, H, W)
  for j in np.flatnonzero(first.query):
    maps[j] = stitch([p.maps[j] for p in parts], hw, tiling, resize_map)
  masks = None
  if with_masks:
    masks = np.zeros((b, *hw), bool)
    for j in np.flatnonzero(first.query):
      masks[j] = data.sample_mask(frames[j], None, hw)
  batch = dataclasses.replace(first.batch, samples=frames, masks=masks)
  stack = lambda f: np.stack([getattr(p, f) for p in parts])         # (T, B)
  return BatchResult(batch, first.query, first.reference, stack("scores").max(0), maps,
                     stack("n_ref").min(0), stack("seclip_only").any(0),
                     stack("n_candidates").min(0), stack("embeds").mean(0))   # a frame: its tiles' mean


def score_tiled(samples: Sequence[Sample], *, tiling: Tiling, model, conf, text, mesh,
                batch_size: int, banks=None, top_up_pool: Optional[Sequence[Sample]] = None,
                indices: Optional[Sequence[int]] = None, with_masks: bool = False,
                keep_maps: bool = False, skip_bad_images: bool = False,
                on_batch: Optional[Callable[[BatchResult], None]] = None,
                on_progress: Optional[Callable[[int], None]] = None,
                on_skip: Optional[Callable[[str, Exception], None]] = None) -> Scored:
  """`scoring.score_samples` over tiles: the same arguments (banks: `banks_on`'s list, one per
  tile position), maps and masks at the frames' (H, W). Batches, top-up and skips are the untiled
  scorer's, decided per batch of frames, so every tile position sees the same slots."""
  if conf.streaming or conf.letterbox:
    raise ValueError("tiled scoring takes batch and bank references, not a stream, and squashes "
                     "its tiles (not letterbox)")
  samples = list(samples)
  indices = list(range(len(samples)) if indices is None else indices)
  collect = Collector(keep_maps, with_masks and keep_maps)
  if not samples:
    return collect.result((0, 0), [])
  hw = frame_size(samples, "the scored images")
  bxs = boxes(hw, tiling)
  if banks is not None and len(banks) != len(bxs):
    raise ValueError(f"{len(banks)} banks for {len(bxs)} tile positions")
  pools = [at(top_up_pool, b) for b in bxs] if top_up_pool is not None else [None] * len(bxs)
  skipped: List[str] = []

  def skip(path, err):                    # every tile position meets an unreadable frame: once
    if path not in skipped:
      skipped.append(path)
      if on_skip is not None:
        on_skip(path, err)

  done = 0
  for start in range(0, len(samples), batch_size):
    group, where = samples[start:start + batch_size], indices[start:start + batch_size]
    parts = []
    for t, box in enumerate(bxs):
      got: List[BatchResult] = []
      scoring.score_samples(at(group, box), indices=where, model=model, conf=conf, text=text,
                            mesh=mesh, batch_size=batch_size,
                            bank=None if banks is None else banks[t], top_up_pool=pools[t],
                            keep_maps=True, skip_bad_images=skip_bad_images,
                            on_batch=got.append, on_skip=skip)
      parts.extend(got)                   # one batch (none when every frame was unreadable)
    if not parts:
      continue
    frames = [None if s is None else dataclasses.replace(s, box=None) for s in parts[0].batch.samples]
    r = _combine(parts, frames, hw, tiling, with_masks)
    collect.add(r)
    if on_batch is not None:
      on_batch(r)
    done += int(r.query.sum())
    if on_progress is not None:
      on_progress(done)
  return collect.result(hw, skipped)

"""What every ViT tower here shares: LayerNorm over a plain dict, patchify, scanned block segments.

Blocks are stacked on a leading axis; a tower runs as `lax.scan` segments that end at the blocks
whose output is read, so a 24-block tower traces one block per segment, not 24.
"""
from __future__ import annotations

from typing import Dict, Iterable

import jax
import jax.numpy as jnp

Array = jax.Array


def layer_norm(p: dict, x: Array, eps: float) -> Array:
  """LayerNorm in float32 over a plain {"scale", "bias"} dict."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def patchify(images: Array, patch: int) -> Array:
  """(B, H, W, 3) -> (B, h*w, p*p*3) row-major patches, pixels in (row, col, channel) order."""
  b, hs, ws, _ = images.shape
  if hs % patch or ws % patch:
    raise ValueError(f"image side {hs}x{ws} is not a multiple of the patch size {patch}")
  h, w = hs // patch, ws // patch
  x = images.reshape(b, h, patch, w, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, patch * patch * 3)


def run_blocks(block, stacked: dict, x: Array, start: int, stop: int) -> Array:
  """Blocks [start, stop) (0-based) of a stacked block tree over x (B, T, W), as one scan."""
  if stop <= start:
    return x
  sub = jax.tree.map(lambda a: a[start:stop], stacked)
  x, _ = jax.lax.scan(lambda h, p: (block.apply({"params": p}, h), None), x, sub)
  return x


def block_params(stacked: dict, i: int) -> dict:
  """Params of block i (0-based) of a stacked block tree."""
  return jax.tree.map(lambda a: a[i], stacked)


def streams(block, stacked: dict, x: Array, ends: Iterable[int]) -> Dict[int, Array]:
  """The residual stream after each block in `ends` (1-based; 0 is x itself), one scan a segment."""
  seen, done = {0: x}, 0
  for end in sorted(set(ends)):
    x = run_blocks(block, stacked, x, done, end)
    seen[end], done = x, end
  return {e: seen[e] for e in ends}

"""Aligned matching (`match_window` w, DESIGN.md §4): a patch meets only the patches of a
reference within w grid cells of its own position.

For fixtured parts the same place on another part is the right comparison. Instead of an N x N
distance matrix the grid is cut into t x t tiles (t = 2w + 1, the grid padded to whole tiles);
each tile's t^2 patches meet the R^2 patches of the R x R region around it (R = t + 2w), which
holds every patch within w of any of them: one batched matmul over the tiles, fixed shapes,
about 2 N R^2 C FLOPs per pair and map instead of 2 N^2 C, and the pairs farther than w apart
masked. Rows (u against v) are a minimum over each tile's region; columns (v against u) are a
minimum over the tile, accumulated at the region's positions (a region overlaps its neighbours').
Squared distances as `ficlip._sq_dists`: the matmul of the vectors as they are (bf16 in bf16,
float32 accumulation) and their squared norms.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def covers_grid(window: int, grid: Tuple[int, int]) -> bool:
  """True when every position is within `window` cells of every other: unrestricted matching."""
  return window >= max(grid) - 1


class Tiling(NamedTuple):
  """Static indices of a grid's tiles and regions, in the grid padded by w around whole tiles."""
  tile: int              # t
  region: int            # R = t + 2w
  padded: Tuple[int, int]  # (H, W) of the padded grid
  queries: np.ndarray    # (n_tiles, t^2) flat padded positions of each tile's patches
  regions: np.ndarray    # (n_tiles, R^2) flat padded positions of each tile's region
  near: np.ndarray       # (t^2, R^2) bool: the region position is within w of the tile position


@functools.lru_cache(maxsize=64)
def tiling(grid: Tuple[int, int], window: int) -> Tiling:
  h, wd = grid
  w = int(window)
  t = 2 * w + 1
  r = t + 2 * w
  th, tw = -(-h // t), -(-wd // t)
  big_h, big_w = th * t + 2 * w, tw * t + 2 * w
  ty, tx = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
  ty, tx = ty.reshape(-1, 1), tx.reshape(-1, 1)                       # (n_tiles, 1)
  i, j = np.divmod(np.arange(t * t), t)                                 # tile offsets
  a, b = np.divmod(np.arange(r * r), r)                                 # region offsets
  queries = (w + ty * t + i) * big_w + (w + tx * t + j)                 # (n_tiles, t^2)
  regions = (ty * t + a) * big_w + (tx * t + b)                         # (n_tiles, R^2)
  near = (np.abs(i[:, None] - (a[None, :] - w)) <= w) & (np.abs(j[:, None] - (b[None, :] - w)) <= w)
  return Tiling(t, r, (big_h, big_w), queries.astype(np.int32), regions.astype(np.int32), near)


# Tiles pay gathers, masks and a scatter that a plain matmul does not: where they would compute
# more than this share of the N^2 pairs, the window is a static mask on the full N x N matmul
# instead (measured on CPU, docs/PERFORMANCE.md: at the 37 x 37 grid w = 1 and 2 are faster tiled,
# at 14 x 14 w = 1 and at 37 x 37 w = 4 the masked matmul is).
TILED_BELOW = 0.1


def strategy(grid, window) -> str:
  """How a window is computed: "all" (it covers the grid: unrestricted), "tiled" or "masked"."""
  if window is None or grid is None or covers_grid(window, grid):
    return "all"
  n = grid[0] * grid[1]
  return "tiled" if compared_positions(tuple(grid), window) < TILED_BELOW * n * n else "masked"


@functools.lru_cache(maxsize=64)
def near_matrix(grid: Tuple[int, int], window: int) -> np.ndarray:
  """(N, N) bool: positions p, q of the grid within `window` cells of each other."""
  ys, xs = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  return (np.abs(ys[:, None] - ys[None, :]) <= window) & (np.abs(xs[:, None] - xs[None, :]) <= window)


def compared_positions(grid: Tuple[int, int], window: int) -> int:
  """Query x reference positions a pair's matmul computes (padding included): the FLOP count's N R^2."""
  tl = tiling(tuple(grid), window)
  return tl.queries.size * tl.region ** 2


def _padded(x: Array, grid, tl: Tiling, w: int, value) -> Array:
  """(G, N, ...) on the grid -> (G, H * W, ...) on the padded grid (w before, the rest after)."""
  h, wd = grid
  big_h, big_w = tl.padded
  x = x.reshape(x.shape[:1] + (h, wd) + x.shape[2:])
  pad = [(0, 0), (w, big_h - h - w), (w, big_w - wd - w)] + [(0, 0)] * (x.ndim - 3)
  x = jnp.pad(x, pad, constant_values=value)
  return x.reshape(x.shape[:1] + (big_h * big_w,) + x.shape[3:])


def pair_distances(fu: Array, fv: Array, nu: Array, nv: Array, ex_u: Array, ex_v: Array,
                   grid: Tuple[int, int], window: int, both: bool = True):
  """Windowed nearest-patch distances of one pair of slots.

  fu, fv (G, N, C); nu, nv (G, N) their squared norms; ex_u, ex_v (N,) excluded patches.
  Returns rows (G, N): rows[p] = min over kept q of v within the window of p of |F_u(p) - F_v(q)|;
  and, if both, cols (G, N) the same for v against u's kept patches. inf where none.
  """
  g, n, _ = fu.shape
  h, wd = grid
  w = int(window)
  tl = tiling((h, wd), w)
  q, reg = jnp.asarray(tl.queries), jnp.asarray(tl.regions)
  u = _padded(fu, grid, tl, w, 0)[:, q]                                   # (G, T, t^2, C)
  v = _padded(fv, grid, tl, w, 0)[:, reg]                                 # (G, T, R^2, C)
  sim = jnp.einsum("gtpc,gtqc->gtpq", u, v, preferred_element_type=jnp.float32)
  d2 = (_padded(nu, grid, tl, w, 0.0)[:, q][..., None]
        + _padded(nv, grid, tl, w, 0.0)[:, reg][:, :, None, :] - 2.0 * sim)   # (G, T, t^2, R^2)
  far = ~jnp.asarray(tl.near)[None, None]                                 # (1, 1, t^2, R^2)
  gone_v = _padded(ex_v[None], grid, tl, w, True)[0][reg]                 # (T, R^2)
  inf = jnp.float32(jnp.inf)
  rows = jnp.min(jnp.where(far | gone_v[None, :, None, :], inf, d2), axis=3)  # (G, T, t^2)
  big_h, big_w = tl.padded
  th, tw, t = (big_h - 2 * w) // tl.tile, (big_w - 2 * w) // tl.tile, tl.tile
  rows = rows.reshape(g, th, tw, t, t).transpose(0, 1, 3, 2, 4).reshape(g, th * t, tw * t)
  rows = jnp.sqrt(jnp.maximum(rows[:, :h, :wd], 0.0)).reshape(g, n)
  if not both:
    return rows
  gone_u = _padded(ex_u[None], grid, tl, w, True)[0][q]                   # (T, t^2)
  best = jnp.min(jnp.where(far | gone_u[None, :, :, None], inf, d2), axis=2)   # (G, T, R^2)
  cols = jnp.full((g, big_h * big_w), inf).at[:, reg.reshape(-1)].min(best.reshape(g, -1))
  cols = cols.reshape(g, big_h, big_w)[:, w:w + h, w:w + wd]
  return rows, jnp.sqrt(jnp.maximum(cols, 0.0)).reshape(g, n)

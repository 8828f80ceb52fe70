"""Aligned matching (`match_window` w, DESIGN.md §4): a patch meets only the patches of a
reference within w grid cells of its own position.

For fixtured parts the same place on another part is the right comparison. Instead of an N x N
distance matrix, each of the (2w + 1)^2 offsets d = (dy, dx) is one fixed-shape shifted view of
the reference's grid (zero-padded by w, the padding excluded): D_d(p) = |F_u(p) - F_v(p + d)|^2 for
all p at once, a running minimum over offsets, about N (2w + 1)^2 C per pair and map instead of
N^2 C. Rows (u against v) and columns (v against u) come from the same D_d: the column of v's
position q = p + d is accumulated in a padded grid at q. Products are taken in float32 of the
vectors the matmul would see (bf16 ones in bf16), as `ficlip._sq_dists` does.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def covers_grid(window: int, grid: Tuple[int, int]) -> bool:
  """True when every position is within `window` cells of every other: unrestricted matching."""
  return window >= max(grid) - 1


def offsets(window: int) -> np.ndarray:
  """(K, 2) int32 offsets (dy, dx), K = (2w + 1)^2, row-major."""
  r = np.arange(-window, window + 1)
  return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def _pad(x: Array, w: int, value) -> Array:
  """Pad the grid axes (1, 2) of (G, h, wd, ...) by w on each side."""
  pad = [(0, 0), (w, w), (w, w)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pad, constant_values=value)


def _shifted(x: Array, dy, dx, w: int, grid) -> Array:
  """The (G, h, wd, ...) view of a padded grid x at offset (dy, dx): out[p] = x[p + d]."""
  h, wd = grid
  start = (0, w + dy, w + dx) + (0,) * (x.ndim - 3)
  return jax.lax.dynamic_slice(x, start, (x.shape[0], h, wd) + x.shape[3:])


def pair_distances(fu: Array, fv: Array, nu: Array, nv: Array, ex_u: Array, ex_v: Array,
                   grid: Tuple[int, int], window: int, both: bool = True):
  """Windowed nearest-patch distances of one pair of slots.

  fu, fv (G, N, C); nu, nv (G, N) their squared norms; ex_u, ex_v (N,) excluded patches.
  Returns rows (G, N): rows[p] = min over kept q of v within the window of p of |F_u(p) - F_v(q)|;
  and, if both, cols (G, N) the same for v against u's kept patches. inf where none.
  """
  g, n, c = fu.shape
  h, wd = grid
  w = int(window)
  fu_g = fu.reshape(g, h, wd, c).astype(jnp.float32)
  fv_p = _pad(fv.reshape(g, h, wd, c).astype(jnp.float32), w, 0.0)          # (G, h+2w, wd+2w, C)
  nv_p = _pad(nv.reshape(g, h, wd), w, 0.0)
  exv_p = _pad(ex_v.reshape(1, h, wd), w, True)[0]                            # (h+2w, wd+2w)
  nu_g = nu.reshape(g, h, wd)
  exu_g = ex_u.reshape(h, wd)
  inf = jnp.float32(jnp.inf)

  def step(carry, d):
    rows, cols = carry
    dy, dx = d[0], d[1]
    fv_d = _shifted(fv_p, dy, dx, w, grid)                                  # (G, h, wd, C)
    d2 = nu_g + _shifted(nv_p, dy, dx, w, grid) - 2.0 * jnp.sum(fu_g * fv_d, axis=-1)
    gone = jax.lax.dynamic_slice(exv_p, (w + dy, w + dx), (h, wd))          # v's q excluded / outside
    rows = jnp.minimum(rows, jnp.where(gone[None], inf, d2))
    if both:
      # v's position q = p + d gets D_d(p) when u keeps p; a q off the grid lands in the
      # padding, cut away at the end (whether v keeps q does not matter to q's own score).
      val = jnp.where(exu_g[None], inf, d2)
      here = jax.lax.dynamic_slice(cols, (0, w + dy, w + dx), (g, h, wd))
      cols = jax.lax.dynamic_update_slice(cols, jnp.minimum(here, val), (0, w + dy, w + dx))
    return (rows, cols), None

  rows0 = jnp.full((g, h, wd), inf)
  cols0 = jnp.full((g, h + 2 * w, wd + 2 * w), inf) if both else jnp.zeros((1, 1, 1))
  (rows, cols), _ = jax.lax.scan(step, (rows0, cols0), jnp.asarray(offsets(w)))
  rows = jnp.sqrt(jnp.maximum(rows, 0.0)).reshape(g, n)
  if not both:
    return rows
  cols = cols[:, w:w + h, w:w + wd]
  return rows, jnp.sqrt(jnp.maximum(cols, 0.0)).reshape(g, n)


def window_positions(grid: Tuple[int, int], window: int) -> int:
  """Candidate positions summed over the grid (the border cuts the window): the matching's work."""
  h, wd = grid
  ys = np.arange(h)
  xs = np.arange(wd)
  ny = np.minimum(ys + window, h - 1) - np.maximum(ys - window, 0) + 1
  nx = np.minimum(xs + window, wd - 1) - np.maximum(xs - window, 0) + 1
  return int(ny.sum() * nx.sum())

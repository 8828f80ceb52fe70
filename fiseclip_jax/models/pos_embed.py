"""Position-embedding resampling with PyTorch's bicubic kernel (a = -0.75, align_corners=False).

`jax.image.resize(..., "cubic")` uses Keys' a = -0.5 and would not match transformers'
`interpolate_pos_encoding`; the resampling is a constant separable matrix per (grid, size).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch's 1-D bicubic resize, border samples clamped."""
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5     # half-pixel centres
  base = np.floor(src).astype(np.int64)
  frac = src - base
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(-1, 3):                            # the 4 taps
    idx = np.clip(base + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), _cubic(frac - k))
  return m


def resample_pos_embed(pos: jnp.ndarray, grid: int, out_hw: tuple) -> jnp.ndarray:
  """(1 + grid**2, W) -> (1 + h*w, W): class row kept, patch rows resampled bicubic."""
  h, w = out_hw
  if (h, w) == (grid, grid):
    return pos
  patch = pos[1:].reshape(grid, grid, -1)                                # (g, g, W)
  mh = jnp.asarray(bicubic_matrix(grid, h), pos.dtype)                   # (h, g)
  mw = jnp.asarray(bicubic_matrix(grid, w), pos.dtype)                   # (w, g)
  patch = jnp.einsum("ai,ijc->ajc", mh, patch, precision="highest")
  patch = jnp.einsum("bj,ajc->abc", mw, patch, precision="highest")      # (h, w, W)
  return jnp.concatenate([pos[:1], patch.reshape(h * w, -1)], axis=0)

"""Patch map -> pixel map: bilinear upsampling (half-pixel centres) then Gaussian smoothing.

Both are linear and separable, so they fold into one constant (S, h) matrix per side:
map = K_h @ A @ K_w^T. The Gaussian matches `scipy.ndimage.gaussian_filter(sigma, truncate=4,
mode="reflect")`; the bilinear matches torch's `interpolate(mode="bilinear", align_corners=False)`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) 1-D bilinear resize, half-pixel centres, edges clamped."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
  """scipy's "reflect" boundary (d c b a | a b c d | d c b a), any distance."""
  period = 2 * n
  i = np.mod(i, period)
  return np.where(i < n, i, period - 1 - i)


@functools.lru_cache(maxsize=32)
def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """(n, n) 1-D Gaussian filter as scipy.ndimage.gaussian_filter1d computes it."""
  if sigma <= 0:
    return np.eye(n)
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1)
  k = np.exp(-0.5 / float(sigma) ** 2 * x ** 2)
  k /= k.sum()
  m = np.zeros((n, n))
  rows = np.repeat(np.arange(n), len(x))
  cols = _reflect((np.arange(n)[:, None] + x[None, :]).ravel(), n)
  np.add.at(m, (rows, cols), np.tile(k, n))
  return m


@functools.lru_cache(maxsize=32)
def upsample_smooth_matrix(n_in: int, n_out: int, sigma: float) -> np.ndarray:
  """(n_out, n_in): Gaussian(sigma) after bilinear upsampling, as one matrix."""
  return (gaussian_matrix(n_out, sigma) @ bilinear_matrix(n_in, n_out)).astype(np.float32)


def pixel_maps(patch_map: jax.Array, out_hw, sigma: float) -> jax.Array:
  """(B, h, w) -> (B, H, W) bilinear upsampling then Gaussian smoothing."""
  _, h, w = patch_map.shape
  kh = jnp.asarray(upsample_smooth_matrix(h, out_hw[0], sigma))
  kw = jnp.asarray(upsample_smooth_matrix(w, out_hw[1], sigma))
  return jnp.einsum("ah,bhw,cw->bac", kh, patch_map.astype(jnp.float32), kw, precision="highest")


def flops(b: int, grid: int, size: int) -> float:
  """The two separable matrix products of `pixel_maps` for a batch of square maps."""
  return b * 2.0 * (grid * grid * size + grid * size * size)

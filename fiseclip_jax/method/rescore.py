"""Image-level re-scoring after any scoring mode: MuSc's RsCIN (DESIGN.md §18).

An image's score is replaced by the mean, over window sizes k, of the similarity-weighted mean of
the scores in its window: itself and its k - 1 most similar other images of the category by the
cosine of their image-level (CLS) embeddings. A normal image with a noisy peak in its map sits
among low-scored look-alikes and is pulled down; its own window (k = 1) keeps a share of its
score. Why: image scores are a maximum over a map, which one noisy patch can raise; the images'
global embeddings say which images are alike. Image scores only; maps are untouched.

Fixed shapes: n slots with a validity mask, so one compile serves every category of a run.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_ks(ks: Sequence[int]) -> tuple:
  ks = tuple(ks)
  if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
    raise ValueError(f"rscin: window sizes ks must be integers >= 1, at least one; got {ks!r}")
  return ks


def similarity(embeds: Array, valid: Array) -> Array:
  """(n, D) embeddings, (n,) bool -> (n, n) cosines; rows and columns of invalid slots are 0."""
  e = jnp.where(valid[:, None], embeds.astype(jnp.float32), 0.0)                  # (n, D)
  norm = jnp.linalg.norm(e, axis=-1, keepdims=True)                                # (n, 1)
  u = e / jnp.where(norm > 0, norm, 1.0)        # a zero vector stays 0: cosine 0 with everyone
  return jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)                   # (n, n)


def neighbour_rank(cos: Array, valid: Array) -> Array:
  """(n, n) rank of j among i's other valid images by cosine (0: the most similar; ties: the
  smaller index first); self and invalid j rank after all of them."""
  n = cos.shape[0]
  others = valid[None, :] & ~jnp.eye(n, dtype=bool)                                # (n, n)
  key = jnp.where(others, -cos, jnp.inf)        # ascending: largest cosine first
  order = jnp.argsort(key, axis=-1, stable=True)                                   # (n, n)
  return jnp.argsort(order, axis=-1, stable=True)                                  # (n, n)


def rscin(scores: Array, embeds: Array, valid: Optional[Array] = None,
          ks: Sequence[int] = (1, 2, 3)) -> Array:
  """(n,) image scores, (n, D) image embeddings (CLS), (n,) bool -> (n,) float32 re-scored.

  For a valid i: w_ij = max(cos(e_i, e_j), 0), w_ii = 1; window W_i(k) = i and its
  min(k - 1, n_valid - 1) most similar other valid images; r_i(k) = sum_W w s / sum_W w;
  result mean_k r_i(k). Invalid slots: their input, and in no window. One valid image: unchanged.
  `ks` is static (a Python tuple of ints >= 1).
  """
  ks = _check_ks(ks)
  s = scores.astype(jnp.float32)                                                   # (n,)
  n = s.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)            # (n,)
  s_in = jnp.where(valid, s, 0.0)               # padding (even NaN) reaches no valid output
  cos = similarity(embeds, valid)                                                  # (n, n)
  eye = jnp.eye(n, dtype=bool)                                                     # (n, n)
  w = jnp.where(eye, 1.0, jnp.maximum(cos, 0.0))                                   # (n, n)
  rank = neighbour_rank(cos, valid)                                                # (n, n)
  n_other = jnp.sum(valid) - 1                                                     # ()
  total = jnp.zeros((n,), jnp.float32)
  for k in ks:                                  # static, a few window sizes
    m = jnp.minimum(k - 1, n_other)             # k clipped to the valid images
    in_window = eye | (valid[None, :] & ~eye & (rank < m))                         # (n, n)
    wk = jnp.where(in_window, w, 0.0)                                              # (n, n)
    num = jnp.matmul(wk, s_in, precision=jax.lax.Precision.HIGHEST)                # (n,)
    total = total + num / jnp.sum(wk, axis=-1)   # the sum is >= 1: w_ii = 1           # (n,)
  return jnp.where(valid, total / len(ks), s)

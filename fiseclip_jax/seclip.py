"""SeCLIP-AD (paper section 3.2): image-text probabilities and the initial anomalous-patch mask.

The proxy last block itself lives in the CLIP port (`encode_image(...).proxy_patch_embed`): it is
part of the single pass over the tower.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def unit(x: Array, axis: int = -1) -> Array:
  """L2-normalize (float32), safe at zero."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def text_probs(embed: Array, text: Array, scale: Array) -> Array:
  """softmax(scale * unit(embed) . unit(text)^T): (..., D), (2, D) -> (..., 2) [normal, abnormal]."""
  logits = jnp.einsum("...d,kd->...k", unit(embed), unit(text), precision="highest")
  return jax.nn.softmax(scale * logits, axis=-1)


def cls_score(cls_embed: Array, text: Array, scale: Array) -> Array:
  """Eq. 6: probability that each image (B, D) is abnormal -> (B,)."""
  return text_probs(cls_embed, text, scale)[..., 1]


def initial_mask(seg_prob: Array, lam: float) -> Array:
  """Eq. 9: M0 = P_a > lam * P_n, (B, N, 2) -> (B, N) bool."""
  return seg_prob[..., 1] > lam * seg_prob[..., 0]

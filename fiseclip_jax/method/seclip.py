"""SeCLIP-AD (paper §3.2, DESIGN.md §3): the proxy last block, text probabilities, the initial mask.

Built from the hooks a text-aligned tower exposes (`models.tower.TextAlignedTower`): the q/k/v of a
block on its input stream, a block's output projection, the embedding head. The tower itself stays the
unmodified model; SeCLIP reads two of its streams (the inputs of block `proxy_layer` and of the
last block) and recomputes the last block its own way.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fiseclip_jax.models import attention
from fiseclip_jax.models.tower import Encoded, TextAlignedTower

Array = jax.Array
PROXY_CHUNK = 8   # images per step of the proxy block: its (b, H, T, T) float32 attention is big


class SeCLIPOut(NamedTuple):
  cls_score: Array     # (B,) probability that the image is abnormal (Eq. 6)
  seg_prob: Array      # (B, N, 2) per-patch [P_n, P_a] (Eq. 7)
  mask0: Array         # (B, N) bool initial anomalous-patch mask (Eq. 9)


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


def streams_needed(depth: int, conf) -> tuple:
  """The block outputs SeCLIP reads: the input of the attention block and of the last block."""
  attn_block = conf.proxy_layer if conf.proxy_attention == "layer" else depth
  return (attn_block - 1, depth - 1)


def attention_probs(tower: TextAlignedTower, params, block: int, x: Array, kind: str, heads: str,
                    dtype: str) -> Array:
  """(B, H or 1, T, T) attention probabilities of block `block` on its input x.

  kind "layer": the block's own q-k attention (the proxy layer); "vv" / "qq" / "kk": the
  self-similarity of one projection (paper Table 5). heads "mean" averages over heads.
  """
  q, k, v = tower.block_qkv(params, block, x, dtype)                         # (B, T, H, Dh)
  a, b = {"layer": (q, k), "vv": (v, v), "qq": (q, q), "kk": (k, k)}[kind]
  logits = jnp.einsum("bthd,bshd->bhts", a, b, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (a.shape[-1] ** -0.5), axis=-1)
  return probs.mean(1, keepdims=True) if heads == "mean" else probs


def proxy_block(tower: TextAlignedTower, params, x_in: Array, probs: Array, dtype: str) -> Array:
  """Eq. 5 with ClearCLIP's cut: out_proj(A @ v(ln_1(x_in))) of the last block, no residual,
  no MLP. x_in: the last block's input (B, T, W); probs (B, H or 1, T, T)."""
  depth = tower.depth
  _, _, v = tower.block_qkv(params, depth, x_in, dtype)                       # (B, T, H, Dh)
  probs = jnp.broadcast_to(probs, (v.shape[0], v.shape[2]) + probs.shape[2:])
  o = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return tower.block_out(params, depth, o, dtype)


def proxy_block_blocked(tower: TextAlignedTower, params, block: int, x_attn: Array, x_in: Array,
                        kind: str, heads: str, dtype: str) -> Array:
  """`proxy_block` of `attention_probs` without the (B, H, T, T) probabilities: the borrowed
  attention applied to the last block's v query block by query block (models/attention.py)."""
  q, k, v = tower.block_qkv(params, block, x_attn, dtype)                    # (B, T, H, Dh)
  a, b = {"layer": (q, k), "vv": (v, v), "qq": (q, q), "kk": (k, k)}[kind]
  _, _, v = tower.block_qkv(params, tower.depth, x_in, dtype)                # the last block's v
  if heads == "mean":
    o = attention.mean_head_attention_apply(a, b, v)
  else:
    o = attention.dot_product_attention(a, b, v, implementation="blocked")
  return tower.block_out(params, tower.depth, o, dtype)


def proxy_patch_embed(tower: TextAlignedTower, params, conf, encoded: Encoded,
                      attention_impl: str = "xla") -> Array:
  """SeCLIP's patch embeddings F_s before normalization (B, h*w, D), in chunks of images.

  attention_impl: the scorer's resolved kernel ("blocked": the proxy attention is never formed)."""
  dtype = conf.compute_dtype
  attn_in, last_in = streams_needed(tower.depth, conf)
  attn_block = attn_in + 1

  def chunk_embed(xs):
    x_attn, x_last = xs
    if attention_impl == "blocked":
      x_final = proxy_block_blocked(tower, params, attn_block, x_attn, x_last,
                                    conf.proxy_attention, conf.proxy_heads, dtype)
    else:
      probs = attention_probs(tower, params, attn_block, x_attn, conf.proxy_attention,
                              conf.proxy_heads, dtype)
      x_final = proxy_block(tower, params, x_last, probs, dtype)
    return tower.embed_tokens(params, x_final[:, 1:], dtype)

  x_attn, x_last = encoded.streams[attn_in], encoded.streams[last_in]
  b = x_last.shape[0]
  chunk = max(c for c in range(1, min(b, PROXY_CHUNK) + 1) if b % c == 0)   # divides B: no padding
  split = lambda a: a.reshape(b // chunk, chunk, *a.shape[1:])
  out = jax.lax.map(chunk_embed, (split(x_attn), split(x_last)))
  return out.reshape(b, *out.shape[2:])


def branch(tower: TextAlignedTower, params, conf, encoded: Encoded, text: Array,
           attention_impl: str = "xla") -> SeCLIPOut:
  """The SeCLIP stage: image and patch probabilities against the text, and M0."""
  scale = tower.logit_scale(params)
  patches = proxy_patch_embed(tower, params, conf, encoded, attention_impl)
  seg_prob = text_probs(patches, text, scale)                                 # (B, N, 2)
  return SeCLIPOut(cls_score(encoded.cls_embed, text, scale), seg_prob,
                   initial_mask(seg_prob, conf.lam))


def flops(width: int, embed_dim: int, grid: int, conf) -> float:
  """FLOPs per image of the proxy block: the borrowed attention, the last block's v and output
  projection, the patch embedding head."""
  t = 1 + grid * grid
  n_proj = 2 if conf.proxy_attention == "layer" else 1
  probs = 2.0 * t * n_proj * width * width + 2.0 * t * t * width
  block = 2.0 * t * width * width + 2.0 * t * t * width + 2.0 * t * width * width
  return probs + block + 2.0 * grid * grid * width * embed_dim

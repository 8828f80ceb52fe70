"""Scaled dot-product attention kernels over (B, T, H, Dh) heads.

Self-contained (it imports only jax and the standard library): any tower may use it.

  dot_product_attention(q, k, v, implementation=...)   softmax(q k^T / sqrt(Dh)) v per head
  mean_head_attention_apply(q, k, v)                    (mean over heads of those softmaxes) v

implementation:
  "xla", "cudnn", None   `jax.nn.dot_product_attention` (cuDNN in float32 falls back to its
                         default: cuDNN's flash attention is half precision only).
  "blocked"              `blocked_attention`: the CPU kernel below.

Why a CPU kernel (2-core AVX-512 VM, jax 0.10.2, CLIP ViT-L/14 at 518 px: B=2, T=1370, H=16,
Dh=64, float32): XLA's attention materializes the (B, H, T, T) float32 scores, 240 MB, and passes
over them several times; allocating and streaming them through memory costs more than the
arithmetic (~400 ms a call against torch SDPA's ~60-70 ms). `blocked_attention` (~100 ms) loops
(`lax.scan`) over the heads, g at a time, sliced out of (B, T, H, Dh) in the loop (no transposed
copies of q, k, v), and within a step over query blocks whose full (g, rows, S) score block fits a
cache-sized budget (`BLOCK_ELEMENTS`): at T=1370 one head and 2 blocks of 685 queries per step, at
T=577 2 heads of one block. Each block's softmax is the plain one (the block sees every key: no
running max, no rescaling), with
  - 1/sqrt(Dh) * log2(e) folded into q (float32 inputs) or into the f32 scores (bfloat16), and exp2;
  - the normalization applied after the PV product, on the (rows, Dh) output rather than on the
    (rows, S) probabilities;
  - scores and softmax in float32 whatever the input dtype; both dots take the input dtype and
    accumulate in float32 (bfloat16: the probabilities are rounded to bf16 for the PV dot, their
    row sum taken before, as torch's bf16 SDPA does). XLA CPU runs bf16 x bf16 -> f32 dots on
    AMX / AVX512-BF16 (YNNPACK), an f32 PV dot at f32 speed: on a Sapphire Rapids VM the f32 PV
    dots were 14 % of the bf16 ViT-L encoder's time. (The proxy block's head-mean A below stays
    float32 into its product with v: one block of 25, tested at float32 accuracy.)
XLA CPU fuses the score dot with the max, subtract and exp into one library (YNNPACK) call; the
loop is a handful of ops per step, the same trace at every T. What is left to torch is mostly the
dots themselves: XLA CPU's f32 GEMM runs at ~75 % of torch's MKL on these shapes, and its bf16
dots, AMX too, at a quarter to a half of oneDNN's rate (docs/PERFORMANCE.md, 2026-12-03).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")
# Most float32 score elements one block holds: 2**20 (4 MiB) -> 2 blocks of 685 queries at T=1370,
# 1 block at T=577. Queries are split into ceil(T / rows) near-equal blocks, so the padding is < n.
BLOCK_ELEMENTS = 1 << 20
_LOG2E = math.log2(math.e)


def dot_product_attention(q: Array, k: Array, v: Array, *, is_causal: bool = False,
                          implementation: Optional[str] = None) -> Array:
  """softmax(q k^T / sqrt(Dh)) v for each batch and head: q, k, v (B, T, H, Dh) -> (B, T, H, Dh)."""
  if implementation == "blocked":
    return blocked_attention(q, k, v, is_causal=is_causal)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation == "cudnn" and q.dtype == jnp.float32:
    implementation = None                    # cuDNN flash attention is half precision only
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=implementation)


def _blocks(t: int, s: int, block_elements: int = BLOCK_ELEMENTS):
  """(n, rows): t queries against s keys in n near-equal blocks (n * rows >= t, rows * s within
  the budget unless one row alone exceeds it)."""
  n = -(-t // max(1, block_elements // max(s, 1)))
  return n, -(-t // n)


def _group(n_heads: int, per_head: int, block_elements: int = BLOCK_ELEMENTS) -> int:
  """Heads per loop step: the largest divisor of n_heads whose score blocks fit the budget (>= 1).
  Short sequences batch several heads into each step, so the per-step overhead stays small."""
  return max(g for g in range(1, n_heads + 1) if n_heads % g == 0 and (g == 1 or g * per_head <= block_elements))


def _dot(a: Array, b: Array, a_contract: int, b_contract: int) -> Array:
  """A plain 2-D matmul with float32 accumulation and output."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _bdot(a: Array, b: Array, a_contract: int, b_contract: int) -> Array:
  """A matmul batched over the leading (head) axis, float32 accumulation and output."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0,), (0,))),
                         preferred_element_type=jnp.float32)


def blocked_attention(q: Array, k: Array, v: Array, *, is_causal: bool = False,
                      block_elements: int = BLOCK_ELEMENTS, heads_per_step: Optional[int] = None) -> Array:
  """The CPU kernel (module docstring): q (B, T, H, Dh), k, v (B, S, H, Dh) -> (B, T, H, Dh) in
  q's dtype. Float32 scores and softmax whatever the input dtype; causal masking (top-left
  aligned, as jax.nn's) masks each block's scores."""
  bsz, t, heads, d = q.shape
  s_kv = k.shape[1]
  n, rows = _blocks(t, s_kv, block_elements)
  g = heads_per_step or _group(heads, rows * s_kv, block_elements)          # divides H
  steps_per_image = heads // g
  pad = n * rows - t
  c = d ** -0.5 * _LOG2E                    # exp(x / sqrt(d)) = exp2(x * c)
  f32_in = q.dtype == jnp.float32

  def block(qb, kb, vb, start):             # (g, rows, Dh), (g, S, Dh), (g, S, Dh), ()
    sc = _bdot(qb, kb, 2, 2)                                               # (g, rows, S) f32
    if is_causal:
      row = start + lax.broadcasted_iota(jnp.int32, sc.shape, 1)
      sc = jnp.where(lax.broadcasted_iota(jnp.int32, sc.shape, 2) <= row, sc, -jnp.inf)
    m = sc.max(axis=-1, keepdims=True)      # finite: every row has its own diagonal key at least
    p = jnp.exp2(sc - m if f32_in else (sc - m) * c)                       # in (0, 1]
    l = p.sum(axis=-1, keepdims=True)                                      # f32, before rounding
    return _bdot(p.astype(vb.dtype), vb, 2, 1) / l                         # (g, rows, Dh)

  def step(carry, i):                       # heads i*g .. i*g + g-1 of image i // (H / g)
    b, h = i // steps_per_image, (i % steps_per_image) * g
    take = lambda x: lax.dynamic_slice(x, (b, 0, h, 0), (1, x.shape[1], g, d))[0].transpose(1, 0, 2)
    qg, kg, vg = take(q), take(k), take(v)                                 # (g, T or S, Dh)
    if f32_in:
      qg = qg * c                           # folded into q: a pass over (T, Dh), not (rows, S)
    if n == 1:
      return carry, block(qg, kg, vg, 0)
    qs = jnp.pad(qg, ((0, 0), (0, pad), (0, 0))).reshape(g, n, rows, d).transpose(1, 0, 2, 3)
    out = lax.map(lambda a: block(a[0], kg, vg, a[1]), (qs, jnp.arange(n, dtype=jnp.int32) * rows))
    return carry, out.transpose(1, 0, 2, 3).reshape(g, n * rows, d)[:, :t]

  _, out = lax.scan(step, None, jnp.arange(bsz * steps_per_image))         # (B*H/g, g, T, Dh)
  out = out.reshape(bsz, heads, t, d).transpose(0, 2, 1, 3)                # (B, T, H, Dh)
  return out.astype(q.dtype)


def mean_head_attention_apply(q: Array, k: Array, v: Array, *,
                              block_elements: int = BLOCK_ELEMENTS) -> Array:
  """A v_h for every head h of v, A = the mean over q's heads of softmax(q_h k_h^T / sqrt(Dh)).

  q, k (B, T, H, Dh), v (B, S, Hv, Dv) (S = k's length) -> (B, T, Hv, Dv) float32 (SeCLIP's proxy
  block, DESIGN §3). Blocked like `blocked_attention`: per image and query block the head-mean
  A (rows, S) is accumulated head by head in float32, then applied to all of v's heads in one
  (rows, S) x (S, Hv * Dv) product; the (B, H, T, S) probabilities never exist.
  """
  bsz, t, heads, d = q.shape
  s_kv, hv, dv = v.shape[1], v.shape[2], v.shape[3]
  n, rows = _blocks(t, s_kv, block_elements)
  pad = n * rows - t
  c = d ** -0.5 * _LOG2E
  f32_in = q.dtype == jnp.float32

  def image(args):
    qi, ki, vi = args                                                        # (T, H, Dh), (S, H, Dh), (S, Hv, Dv)
    qi = jnp.pad(qi * c if f32_in else qi, ((0, pad), (0, 0), (0, 0)))
    qi = qi.reshape(n, rows, heads, d).transpose(0, 2, 1, 3)                 # (n, H, rows, Dh)
    ki = ki.transpose(1, 0, 2)                                               # (H, S, Dh)
    vi = vi.reshape(s_kv, hv * dv).astype(jnp.float32)                       # (S, Hv*Dv)

    def block(qb):                                                           # (H, rows, Dh)
      def add_head(h, acc):
        sc = _dot(qb[h], ki[h], 1, 1)                                        # (rows, S) f32
        m = sc.max(axis=-1, keepdims=True)
        p = jnp.exp2(sc - m if f32_in else (sc - m) * c)
        return acc + p * (1.0 / (heads * p.sum(axis=-1, keepdims=True)))
      a = lax.fori_loop(0, heads, add_head, jnp.zeros((rows, s_kv), jnp.float32))
      return _dot(a, vi, 1, 0)                                               # (rows, Hv*Dv)

    out = lax.map(block, qi)                                                 # (n, rows, Hv*Dv)
    return out.reshape(n * rows, hv, dv)[:t]

  return lax.map(image, (q, k, v))                                           # (B, T, Hv, Dv)

"""The blocked CPU attention kernels (fiseclip_jax/models/attention.py) against XLA's attention and a
NumPy float64 reference.

Tolerances. Float32: 1e-5 max abs on inputs of the scale CLIP's heads have (|q.k| / sqrt(Dh) up to
~10, v ~ N(0, 1)); what differs is float32 rounding and summation order (scores ~1e-6 relative,
outputs a few 1e-7 abs), so 1e-5 leaves a 10x margin and still catches any softmax or masking slip
(those are O(0.1)). bfloat16 (bf16 inputs, float32 scores, softmax and PV): against the float64
reference of the same bf16-rounded inputs, 1e-2 abs, i.e. the rounding of the bf16 output (|o| < 2,
half an ulp of 2 in bf16 is 2^-7 ~ 8e-3); the float32 computation inside adds nothing visible.
"""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax.models import attention

F32_TOL = 1e-5
BF16_TOL = 1e-2
SMALL_BLOCK = 64   # elements per score block in the tests: several query blocks at T of a few tens


def qkv(b, t, h, d, s=None, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = rng.standard_normal((b, t, h, d)).astype(np.float32) * scale
  k = rng.standard_normal((b, s, h, d)).astype(np.float32) * scale
  v = rng.standard_normal((b, s, h, d)).astype(np.float32)
  return q, k, v


def reference(q, k, v, causal=False, mean_heads=False):
  """softmax(q k^T / sqrt(d)) v in float64, (B, T, H, D)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if mean_heads:
    p = np.broadcast_to(p.mean(1, keepdims=True), (p.shape[0], v.shape[2]) + p.shape[2:])
  return np.einsum("bhts,bshd->bthd", p, v)


def err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.lru_cache(maxsize=None)
def blocked(block_elements=attention.BLOCK_ELEMENTS, causal=False, heads_per_step=None):
  return jax.jit(functools.partial(attention.blocked_attention, is_causal=causal,
                                   block_elements=block_elements, heads_per_step=heads_per_step))


# With SMALL_BLOCK elements per step and S = T keys (H = 4 heads): T=1 is one step of an image's
# 4 heads, T=5 (below one block) steps of 2 heads, T=16 4 blocks of 4 rows per head, T=20 7 blocks
# of 3 rows (T not a multiple of the rows: 1 padded query).
@pytest.mark.parametrize("t", [1, 5, 16, 20])
def test_blocked_matches_float64(t):
  q, k, v = qkv(2, t, 4, 16, seed=t, scale=2.0)       # |q.k| / 4 up to ~10: peaked rows too
  out = blocked(SMALL_BLOCK)(q, k, v)
  assert out.shape == (2, t, 4, 16) and out.dtype == jnp.float32
  assert err(out, reference(q, k, v)) < F32_TOL


def test_blocked_matches_xla():
  """At the default budget (one block per head here) and with several heads per step over
  several query blocks (a combination the default budget never picks)."""
  q, k, v = qkv(2, 37, 4, 16, seed=2, scale=2.0)
  xla = jax.nn.dot_product_attention(q, k, v)
  assert err(blocked()(q, k, v), xla) < F32_TOL
  assert err(blocked(SMALL_BLOCK * 4, heads_per_step=2)(q, k, v), xla) < F32_TOL


def test_blocked_block_split():
  """ceil(T / rows) near-equal blocks within the budget; one block when T * S fits; as many heads
  per step as fit, a divisor of H."""
  assert attention._blocks(1370, 1370) == (2, 685)
  assert attention._blocks(577, 577) == (1, 577)
  assert attention._blocks(20, 20, 64) == (7, 3)
  assert attention._blocks(1, 1, 64) == (1, 1)
  assert attention._blocks(5, 100, 64) == (5, 1)      # a row over the budget: one row per block
  assert attention._group(16, 685 * 1370) == 1
  assert attention._group(16, 577 * 577) == 2         # 3 fit, 3 does not divide 16
  assert attention._group(16, 77 * 77) == 16
  assert attention._group(3, 100, 64) == 1


def test_cross_attention_lengths():
  q, k, v = qkv(1, 7, 2, 8, s=13, seed=1)
  out = blocked(SMALL_BLOCK)(q, k, v)
  assert out.shape == (1, 7, 2, 8)
  assert err(out, reference(q, k, v)) < F32_TOL


@pytest.mark.parametrize("t", [1, 20])
def test_causal(t):
  q, k, v = qkv(2, t, 2, 8, seed=3, scale=2.0)
  ref = reference(q, k, v, causal=True)
  assert err(blocked(SMALL_BLOCK, causal=True)(q, k, v), ref) < F32_TOL
  if t > 1:
    assert err(attention.dot_product_attention(q, k, v, is_causal=True, implementation="blocked"),
               ref) < F32_TOL
    assert err(attention.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
               ref) < F32_TOL


def test_bfloat16():
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(2, 20, 3, 16, seed=5, scale=2.0))
  out = blocked(SMALL_BLOCK)(q, k, v)
  assert out.dtype == jnp.bfloat16
  ref = reference(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)))
  assert err(out.astype(jnp.float32), ref) < BF16_TOL
  xla = jax.nn.dot_product_attention(q, k, v)          # bf16 probabilities in its PV product
  assert err(out.astype(jnp.float32), xla.astype(jnp.float32)) < 2 * BF16_TOL


def test_dispatch():
  q, k, v = qkv(1, 6, 2, 8, seed=7)
  ref = reference(q, k, v)
  for impl in (None, "xla", "cudnn", "blocked"):   # cudnn in float32 falls back to XLA's default
    assert err(attention.dot_product_attention(q, k, v, implementation=impl), ref) < F32_TOL
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")


def test_trace_size_fixed_in_t():
  """The loops are lax.scan / lax.map: the jaxpr has the same equations at every T."""
  def count(jaxpr):
    return sum(1 + sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)

  def n_eqns(t):
    x = jax.ShapeDtypeStruct((2, t, 4, 16), jnp.float32)
    return count(jax.make_jaxpr(functools.partial(attention.blocked_attention,
                                                  block_elements=256))(x, x, x).jaxpr)
  sizes = {t: n_eqns(t) for t in (40, 400, 4000)}       # 7, 400 and 4000 query blocks
  # one pad equation more where the blocks' rows do not divide T (T=40: 7 blocks of 6 rows)
  assert sizes[400] == sizes[4000] and sizes[40] == sizes[400] + 1, sizes


@pytest.mark.parametrize("t,s", [(20, 20), (9, 13)])
def test_mean_head_attention_apply(t, s):
  q, k, _ = qkv(2, t, 3, 16, s=s, seed=11, scale=2.0)
  v = np.random.default_rng(12).standard_normal((2, s, 5, 8)).astype(np.float32)   # other heads
  ref = reference(q, k, v, mean_heads=True)
  out = jax.jit(functools.partial(attention.mean_head_attention_apply, block_elements=SMALL_BLOCK))(q, k, v)
  assert out.shape == (2, t, 5, 8) and out.dtype == jnp.float32
  assert err(out, ref) < F32_TOL
  if t == s:   # the default budget (one block), and bf16 inputs (float32 inside and out)
    assert err(attention.mean_head_attention_apply(q, k, v), ref) < F32_TOL
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    ref_bf = reference(*(np.asarray(x.astype(jnp.float32)) for x in (qb, kb, vb)), mean_heads=True)
    assert err(attention.mean_head_attention_apply(qb, kb, vb), ref_bf) < 1e-4

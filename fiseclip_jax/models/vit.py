"""What every ViT tower here shares: LayerNorm over a plain dict, patchify, scanned block segments,
and the dense layers' matmul on CPU.

Blocks are stacked on a leading axis; a tower runs as `lax.scan` segments that end at the blocks
whose output is read, so a 24-block tower traces one block per segment, not 24.
"""
from __future__ import annotations

from typing import Dict, Iterable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def wide_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> Array:
  """`lax.dot_general` asking for a float32 result, rounded to the inputs' dtype after.

  The numbers of a bfloat16-output dot (XLA accumulates in float32 either way), but XLA CPU has
  bfloat16 kernels (YNNPACK's, on AMX or AVX512-BF16) only for the float32-output form: it rewrites
  a bfloat16-output dot into a float32 one and, allowed excess precision, drops the casts around
  it, so a "bfloat16" tower ran every dense layer as a float32 matmul. A no-op for float32 inputs.
  The towers' dense layers use it with the CPU kernels (attention_impl "blocked"); on GPU the
  float32 output would be an extra pass over memory."""
  out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def dense_dot_general(attention_impl):
  """The dot_general of a tower's nn.Dense layers: the CPU one with the CPU kernels, else XLA's."""
  return wide_dot_general if attention_impl == "blocked" else None


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

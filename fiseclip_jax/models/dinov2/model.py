"""DINOv2 ViT in Flax (linen): the block as a module, the tower as functions over params.

A port of transformers' `Dinov2Model` (no register tokens). Params are a plain pytree; the blocks
are stacked on a leading axis and run with `lax.scan`, one scan per segment ending at a block whose
output is read.

  params = {"patch_embed": {"kernel": (p, p, 3, W), "bias": (W,)}, "cls_token": (W,),
            "pos_embed": (1 + g*g, W),
            "blocks": {"ln_1", "q", "k", "v", "out", "ls_1", "ln_2", "ls_2",
                       "fc1", "fc2" | "gate", "up", "down": (L, ...)},
            "ln_final": {"scale", "bias"}}     # transformers' `layernorm`, not applied by `encode`
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax.models import attention, vit
from fiseclip_jax.models.dinov2.config import IMAGENET_MEAN, IMAGENET_STD, Dinov2Config
from fiseclip_jax.models.pos_embed import resample_pos_embed
from fiseclip_jax.models.tower import Encoded

Array = jax.Array
# Random LayerScale gammas. DINOv2 trains from 1e-5, but a random tower at 1e-5 is the identity
# (every block's contribution vanishes), which would hide block bugs from tests on random params.
# 1.0 (transformers' default `layerscale_value`) with the residual outputs shrunk by (2 L)^-1/2
# keeps each block's contribution O(1 / sqrt(L)): a 40-block tower mixes tokens without collapsing
# them.
LAYERSCALE_INIT = 1.0


class Block(nn.Module):
  """Pre-LN DINOv2 block: x + ls_1 * attn(ln_1(x)), then x + ls_2 * mlp(ln_2(x)).

  The MLP is exact-GELU fc1 -> fc2, or SwiGLU down(silu(gate(h)) * up(h)).
  """
  width: int
  heads: int
  mlp: int
  swiglu: bool = False
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              dot_general=vit.dense_dot_general(self.attention_impl))
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=jnp.float32,
                             param_dtype=jnp.float32)
    scale = lambda name: self.param(name, nn.initializers.constant(LAYERSCALE_INIT), (self.width,),
                                    jnp.float32)
    self.ln_1, self.ln_2 = norm(), norm()
    self.q, self.k, self.v, self.out = (dense(self.width), dense(self.width), dense(self.width),
                                        dense(self.width))
    self.ls_1, self.ls_2 = scale("ls_1"), scale("ls_2")
    if self.swiglu:
      self.gate, self.up, self.down = dense(self.mlp), dense(self.mlp), dense(self.width)
    else:
      self.fc1, self.fc2 = dense(self.mlp), dense(self.width)

  def _split(self, x: Array) -> Array:
    return x.reshape(*x.shape[:-1], self.heads, self.width // self.heads)     # (B, T, H, Dh)

  def attention(self, x: Array) -> Array:
    """Attention branch on the block input x (B, T, W), before LayerScale."""
    h = self.ln_1(x)
    q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
    a = attention.dot_product_attention(q, k, v, implementation=self.attention_impl)  # (B, T, H, Dh)
    return self.out(a.reshape(*a.shape[:-2], self.width))

  def ffn(self, x: Array) -> Array:
    """MLP branch on the mid-block stream x (B, T, W), before LayerScale."""
    h = self.ln_2(x)
    if self.swiglu:
      return self.down(jax.nn.silu(self.gate(h)) * self.up(h))
    return self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))

  def __call__(self, x: Array) -> Array:
    x = x + self.ls_1 * self.attention(x)          # float32 stream: the f32 gammas promote bf16
    return x + self.ls_2 * self.ffn(x)


def block_for(cfg: Dinov2Config, dtype=jnp.float32, attention_impl=None) -> Block:
  return Block(cfg.width, cfg.heads, cfg.mlp, cfg.use_swiglu_ffn, cfg.layer_norm_eps, dtype=dtype,
               attention_impl=attention_impl)


# ------------------------------------------------------------------------------------------------
# Parameter initialisation.


def init_params(cfg: Dinov2Config, seed: int = 0) -> dict:
  """Random DINOv2 params (tests, benchmarks; features need real weights).

  Dense kernels are lecun-normal, the residual-branch outputs (attention out, fc2 / down) shrunk by
  (2 L)^-1/2 and LayerScale at LAYERSCALE_INIT, as in the CLIP port: a deep random tower keeps the
  spatial content of its input instead of collapsing all tokens together. cls / position
  embeddings are 0.02-normal as in DINOv2, small next to the O(1) patch embeddings.
  """
  return _init_jit(cfg, int(seed))


def _normals(key, shapes: dict, stds: dict) -> dict:
  """name -> normal(shape) * std from ONE draw: each random call site costs ~1 s of CPU compile."""
  sizes = [math.prod(s) for s in shapes.values()]
  z = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)
  return {name: z[o:o + n].reshape(shape) * stds[name]
          for (name, shape), o, n in zip(shapes.items(), offsets, sizes)}


def _block_init(cfg: Dinov2Config, key) -> dict:
  """One block: lecun-normal kernels (residual outputs shrunk by (2 L)^-1/2), zero biases, unit
  LayerNorms, LayerScale at LAYERSCALE_INIT."""
  x = jnp.zeros((1, 1, cfg.width), jnp.float32)
  tree = jax.eval_shape(lambda: block_for(cfg).init(jax.random.PRNGKey(0), x))["params"]
  dense = {n: t["kernel"].shape for n, t in tree.items() if isinstance(t, dict) and "kernel" in t}
  shrink = {"out": (2 * cfg.layers) ** -0.5, "fc2": (2 * cfg.layers) ** -0.5,
            "down": (2 * cfg.layers) ** -0.5}
  stds = {n: shape[0] ** -0.5 * shrink.get(n, 1.0) for n, shape in dense.items()}
  kernels = _normals(key, dense, stds)
  out = {}
  for n, t in tree.items():
    if n in kernels:
      out[n] = {"kernel": kernels[n], "bias": jnp.zeros(t["bias"].shape, jnp.float32)}
    elif isinstance(t, dict):                       # LayerNorm
      out[n] = {"scale": jnp.ones(t["scale"].shape, jnp.float32),
                "bias": jnp.zeros(t["bias"].shape, jnp.float32)}
    else:                                           # LayerScale gamma
      out[n] = jnp.full(t.shape, LAYERSCALE_INIT, jnp.float32)
  return out


def _init_params(cfg: Dinov2Config, seed: int) -> dict:
  k_embed, k_blocks = jax.random.split(jax.random.PRNGKey(seed))
  w, p = cfg.width, cfg.patch_size
  embed = _normals(k_embed, {"patch": (p, p, 3, w), "cls": (w,), "pos": (1 + cfg.grid ** 2, w)},
                   {"patch": (3 * p * p) ** -0.5, "cls": 0.02, "pos": 0.02})
  blocks = jax.lax.map(functools.partial(_block_init, cfg), jax.random.split(k_blocks, cfg.layers))
  return {
      "patch_embed": {"kernel": embed["patch"], "bias": jnp.zeros((w,), jnp.float32)},
      "cls_token": embed["cls"],
      "pos_embed": embed["pos"],
      "blocks": blocks,
      "ln_final": {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)},
  }


_init_jit = jax.jit(_init_params, static_argnums=(0, 1))


def param_shapes(cfg: Dinov2Config) -> dict:
  """The expected params tree as ShapeDtypeStructs (no allocation)."""
  return jax.eval_shape(lambda: _init_params(cfg, 0))


def num_params(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------------
# Forward.


def embed_patches(params: dict, cfg: Dinov2Config, images: Array, dtype) -> Array:
  """Images (B, H, W, 3) -> tokens (B, 1 + h*w, W): [cls; patches] + resampled position embedding.

  No LayerNorm here (DINOv2 has no ln_pre). The position embedding is resampled to the (h, w) grid
  with PyTorch's bicubic (a = -0.75, align_corners=False, no antialias, size= not scale_factor=),
  which is what transformers' `Dinov2Embeddings.interpolate_pos_encoding` does; identity when the
  grid is the trained one.
  """
  b = images.shape[0]
  p = cfg.patch_size
  h, w = images.shape[1] // p, images.shape[2] // p
  x = vit.patchify(images, p)                                         # (B, h*w, p*p*3)
  kernel = params["patch_embed"]["kernel"].reshape(p * p * 3, -1)     # HWIO -> (p*p*3, W)
  x = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
  x = x + params["patch_embed"]["bias"]                               # (B, h*w, W)
  cls = jnp.broadcast_to(params["cls_token"].astype(jnp.float32), (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1)                               # (B, 1 + h*w, W)
  return x + resample_pos_embed(params["pos_embed"].astype(jnp.float32), cfg.grid, (h, w))


def encode(params: dict, cfg: Dinov2Config, images: Array, layers, compute_dtype="float32",
           attention_impl: Optional[str] = None) -> Encoded:
  """One pass of the tower (un-jitted), as `clip.model.encode`: the stream after each block of
  `layers` (1-based; 0 = the embeddings), only as deep as the deepest one; no image embedding
  (DINOv2 has no text space).

  images: (B, H, W, 3) NHWC float32, ImageNet-normalized (IMAGENET_MEAN / IMAGENET_STD), H and W
  multiples of the patch size. compute_dtype "bfloat16": bf16 matmuls with float32 accumulation,
  LayerNorm, softmax and the residual stream in float32.
  """
  n = cfg.layers
  if not layers or min(layers) < 0 or max(layers) > n:
    raise ValueError(f"layers {tuple(layers)} must lie in 1..{n} (0: the embeddings)")
  block = block_for(cfg, jnp.dtype(compute_dtype), attention_impl)
  x = embed_patches(params, cfg, images.astype(jnp.float32), jnp.dtype(compute_dtype))
  return Encoded(vit.streams(block, params["blocks"], x, layers), None)


def _hidden_states(params, cfg: Dinov2Config, images, layers, compute_dtype, attention_impl) -> Array:
  seen = encode(params, cfg, images, layers, compute_dtype, attention_impl).streams
  return jnp.stack([seen[i] for i in layers])      # (n_layers, B, 1 + h*w, W)


_hidden_states_jit = jax.jit(_hidden_states, static_argnums=(1, 3, 4, 5))


def hidden_states(params: dict, cfg: Dinov2Config, images: Array, layers: Tuple[int, ...],
                  compute_dtype: str = "float32", attention_impl: Optional[str] = None) -> Array:
  """transformers' `hidden_states[layers[i]]` (output_hidden_states=True) as one array
  (n_layers, B, 1 + h*w, W), cls token first, before the final LayerNorm; jit-compiled per shape,
  config and layers. images as in `encode`."""
  return _hidden_states_jit(params, cfg, images, tuple(int(i) for i in layers), compute_dtype,
                            attention_impl)


def tower_flops(cfg: Dinov2Config, size: int) -> float:
  """FLOPs per image of a full pass at size x size (multiply-add = 2): patch embedding and every
  block (q, k, v, out; the MLP, with SwiGLU's extra matrix; 4 T^2 W of attention)."""
  g = size // cfg.patch_size
  t, w, m = 1 + g * g, cfg.width, cfg.mlp
  mlp = (3 if cfg.use_swiglu_ffn else 2) * w * m
  return 2.0 * g * g * 3 * cfg.patch_size ** 2 * w + cfg.layers * (2.0 * t * (4 * w * w + mlp)
                                                                    + 4.0 * t * t * w)


def final_layer_norm(params: dict, cfg: Dinov2Config, tokens: Array) -> Array:
  """transformers' `layernorm` on tokens (..., W): last block's output -> `last_hidden_state`."""
  return vit.layer_norm(params["ln_final"], tokens, cfg.layer_norm_eps)


__all__ = ["Block", "IMAGENET_MEAN", "IMAGENET_STD", "LAYERSCALE_INIT", "embed_patches", "encode",
           "final_layer_norm", "hidden_states", "init_params", "num_params", "param_shapes",
           "tower_flops"]

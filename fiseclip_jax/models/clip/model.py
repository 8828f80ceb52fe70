"""CLIP ViT in Flax (linen): the residual block as a module, the towers as functions over params.

Params are a plain pytree; each tower's blocks are stacked on a leading axis and run as `lax.scan`
segments (`vit.streams`) that end at the blocks whose output is read. The vision tower returns
streams and the per-block hooks any text-aligned method can use (DESIGN.md §2, §10); nothing here
is specific to SeCLIP.

  params = {"visual": {"patch_embed": {"kernel": (p, p, 3, W)}, "class_embedding": (W,),
                       "pos_embed": (1 + g*g, W), "ln_pre", "blocks": {...: (L, ...)}, "ln_post",
                       "proj": (W, D)},
            "text": {"token_embed": (V, Wt), "pos_embed": (T, Wt), "blocks", "ln_final",
                     "proj": (Wt, D)},
            "logit_scale": ()}          # log of CLIP's logit scale (exp -> 100 for OpenAI CLIP)
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
from fiseclip_jax.models.clip.config import CLIPConfig
from fiseclip_jax.models.pos_embed import resample_pos_embed
from fiseclip_jax.models.tower import Encoded

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


class Block(nn.Module):
  """Pre-LN transformer block of CLIP (attention then quick-gelu MLP, both residual).

  Besides the forward pass it exposes its pieces as hooks: the q/k/v heads of an input, and the
  output projection of attention heads.
  """
  width: int
  heads: int
  mlp: int
  eps: float = 1e-5
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              dot_general=vit.dense_dot_general(self.attention_impl))
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=jnp.float32,
                             param_dtype=jnp.float32)
    self.ln_1, self.ln_2 = norm(), norm()
    self.q, self.k, self.v, self.out = dense(self.width), dense(self.width), dense(self.width), dense(self.width)
    self.fc1, self.fc2 = dense(self.mlp), dense(self.width)

  def _split(self, x: Array) -> Array:
    return x.reshape(*x.shape[:-1], self.heads, self.width // self.heads)     # (B, T, H, Dh)

  def qkv(self, x: Array) -> Tuple[Array, Array, Array]:
    """Per-head q, k, v of `x` (the block's input), each (B, T, H, Dh)."""
    h = self.ln_1(x)
    return self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))

  def merge_out(self, heads_out: Array) -> Array:
    """(B, T, H, Dh) attention output -> out projection (B, T, W)."""
    return self.out(heads_out.reshape(*heads_out.shape[:-2], self.width))

  def __call__(self, x: Array) -> Array:
    q, k, v = self.qkv(x)
    a = attention.dot_product_attention(q, k, v, is_causal=self.causal,
                                        implementation=self.attention_impl)
    x = x + self.merge_out(a)
    return x + self.fc2(quick_gelu(self.fc1(self.ln_2(x))))


def block_for(cfg: CLIPConfig, tower: str, dtype=jnp.float32, attention_impl=None) -> Block:
  if tower == "visual":
    return Block(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp, cfg.layer_norm_eps,
                 causal=False, dtype=dtype, attention_impl=attention_impl)
  return Block(cfg.text_width, cfg.text_heads, cfg.text_mlp, cfg.layer_norm_eps,
               causal=True, dtype=dtype, attention_impl=attention_impl)


# ------------------------------------------------------------------------------------------------
# Parameter initialisation.


def _tower_init(key, block: Block, n_layers: int, width: int) -> dict:
  """Stacked random blocks with OpenAI CLIP's init: the residual-branch outputs (attention out,
  MLP fc2) scaled by (2 L)^-1/2, so a deep random tower keeps its input's spatial content instead
  of collapsing all tokens together (random-weight demos and tests stay informative)."""
  x = jnp.zeros((1, 1, width), jnp.float32)
  keys = jax.random.split(key, n_layers)
  params = jax.vmap(lambda k: block.init(k, x)["params"])(keys)
  shrink = (2 * n_layers) ** -0.5
  for name in ("out", "fc2"):
    params[name]["kernel"] = params[name]["kernel"] * shrink
  return params


def init_params(cfg: CLIPConfig, seed: int = 0) -> dict:
  """Random CLIP params (for tests, benchmarks and the demo; the method needs real weights)."""
  k = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
  wv, wt = cfg.vision_width, cfg.text_width
  ln = lambda w: {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)}
  normal = lambda key, shape, std: std * jax.random.normal(key, shape, jnp.float32)
  p = cfg.patch_size
  visual = {
      "patch_embed": {"kernel": normal(next(k), (p, p, 3, wv), (3 * p * p) ** -0.5)},
      "class_embedding": normal(next(k), (wv,), wv ** -0.5),
      "pos_embed": normal(next(k), (1 + cfg.grid ** 2, wv), wv ** -0.5),
      "ln_pre": ln(wv),
      "blocks": _tower_init(next(k), block_for(cfg, "visual"), cfg.vision_layers, wv),
      "ln_post": ln(wv),
      "proj": normal(next(k), (wv, cfg.embed_dim), wv ** -0.5),
  }
  text = {
      "token_embed": normal(next(k), (cfg.vocab_size, wt), 0.02),
      "pos_embed": normal(next(k), (cfg.context_length, wt), 0.01),
      "blocks": _tower_init(next(k), block_for(cfg, "text"), cfg.text_layers, wt),
      "ln_final": ln(wt),
      "proj": normal(next(k), (wt, cfg.embed_dim), wt ** -0.5),
  }
  # log(100): the value pre-trained CLIP ends at, so random models are as sharp as real ones.
  return {"visual": visual, "text": text, "logit_scale": jnp.asarray(math.log(100.0), jnp.float32)}


# ------------------------------------------------------------------------------------------------
# Vision tower.


def embed_patches(visual: dict, cfg: CLIPConfig, images: Array, dtype) -> Array:
  """Images (B, S, S, 3) -> tokens (B, 1 + h*w, W) after ln_pre, position embedding resampled."""
  p = cfg.patch_size
  h, w = images.shape[1] // p, images.shape[2] // p
  x = vit.patchify(images, p)                                            # (B, h*w, p*p*3)
  kernel = visual["patch_embed"]["kernel"].reshape(p * p * 3, -1)       # HWIO -> (p*p*3, W)
  x = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
  cls = jnp.broadcast_to(visual["class_embedding"], (x.shape[0], 1, x.shape[-1]))
  x = jnp.concatenate([cls.astype(jnp.float32), x], axis=1)
  x = x + resample_pos_embed(visual["pos_embed"], cfg.grid, (h, w))
  return vit.layer_norm(visual["ln_pre"], x, cfg.layer_norm_eps)


def project(ln_p: dict, proj: Array, x: Array, eps: float, dtype) -> Array:
  """ln then projection to the joint embedding space, float32 out."""
  x = vit.layer_norm(ln_p, x, eps)
  return jnp.dot(x.astype(dtype), proj.astype(dtype), preferred_element_type=jnp.float32)


def encode(params: dict, cfg: CLIPConfig, images: Array, layers, compute_dtype: str = "float32",
           attention_impl: Optional[str] = None) -> Encoded:
  """One pass of the vision tower (un-jitted): the stream after each block of `layers` (1-based,
  0 = after ln_pre), and the CLS embedding of the unmodified model, `ln_post(x_L[:, 0]) @ proj`.

  images: (B, H, W, 3) NHWC, OpenAI-normalized, sides multiples of the patch size.
  """
  n = cfg.vision_layers
  if any(not 0 <= i <= n for i in layers):
    raise ValueError(f"layers {tuple(layers)} must lie in 0..{n}")
  dtype = jnp.dtype(compute_dtype)
  visual = params["visual"]
  block = block_for(cfg, "visual", dtype, attention_impl)
  x = embed_patches(visual, cfg, images.astype(jnp.float32), dtype)
  seen = vit.streams(block, visual["blocks"], x, set(layers) | {n})
  cls_embed = project(visual["ln_post"], visual["proj"], seen[n][:, 0], cfg.layer_norm_eps, dtype)
  return Encoded({i: seen[i] for i in layers}, cls_embed)


# Hooks: per-block access to the vision tower (DESIGN.md §10); `block` is 1-based.


def block_qkv(params: dict, cfg: CLIPConfig, block: int, x: Array, compute_dtype: str = "float32"):
  """q, k, v (each (B, T, H, Dh)) of block `block` on its input stream x (B, T, W)."""
  mod = block_for(cfg, "visual", jnp.dtype(compute_dtype))
  bp = vit.block_params(params["visual"]["blocks"], block - 1)
  return mod.apply({"params": bp}, x, method=Block.qkv)


def block_out(params: dict, cfg: CLIPConfig, block: int, heads: Array,
              compute_dtype: str = "float32") -> Array:
  """Block `block`'s output projection of attention heads (B, T, H, Dh) -> (B, T, W)."""
  mod = block_for(cfg, "visual", jnp.dtype(compute_dtype))
  bp = vit.block_params(params["visual"]["blocks"], block - 1)
  return mod.apply({"params": bp}, heads.astype(jnp.dtype(compute_dtype)), method=Block.merge_out)


def embed_tokens(params: dict, cfg: CLIPConfig, tokens: Array, compute_dtype: str = "float32") -> Array:
  """The image embedding head on any tokens: ln_post then proj, (B, T, W) -> (B, T, D)."""
  visual = params["visual"]
  return project(visual["ln_post"], visual["proj"], tokens, cfg.layer_norm_eps, jnp.dtype(compute_dtype))


def tower_flops(cfg: CLIPConfig, size: int) -> float:
  """FLOPs per image of one vision pass at size x size (multiply-add = 2): patch embedding, every
  block (2 * params per token * T + 4 T^2 W for attention), the CLS projection."""
  g = size // cfg.patch_size
  t, w, m = 1 + g * g, cfg.vision_width, cfg.vision_mlp
  patch = 2.0 * g * g * 3 * cfg.patch_size ** 2 * w
  blocks = cfg.vision_layers * (2.0 * t * (4 * w * w + 2 * w * m) + 4.0 * t * t * w)
  return patch + blocks + 2.0 * w * cfg.embed_dim


# ------------------------------------------------------------------------------------------------
# Text tower.


def _encode_text(params, cfg: CLIPConfig, ids, compute_dtype) -> Array:
  dtype = jnp.dtype(compute_dtype)
  text = params["text"]
  t = ids.shape[1]
  x = text["token_embed"][ids] + text["pos_embed"][:t]                   # (N, T, Wt)
  block = block_for(cfg, "text", dtype)
  x = vit.run_blocks(block, text["blocks"], x.astype(jnp.float32), 0, cfg.text_layers)
  eot = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]              # (N, Wt) EOT pooling
  return project(text["ln_final"], text["proj"], eot, cfg.layer_norm_eps, dtype)


_encode_text_jit = jax.jit(_encode_text, static_argnums=(1, 3))


def encode_text(params: dict, cfg: CLIPConfig, ids, compute_dtype: str = "float32") -> Array:
  """Token ids (N, T) -> projected EOT features (N, D), not normalized."""
  return _encode_text_jit(params, cfg, jnp.asarray(ids, jnp.int32), compute_dtype)


def logit_scale(params: dict) -> Array:
  """CLIP's logit scale (exp of the stored log), 100 for OpenAI CLIP."""
  return jnp.exp(params["logit_scale"])


def param_shapes(cfg: CLIPConfig) -> dict:
  """The expected params tree as ShapeDtypeStructs (no allocation)."""
  return jax.eval_shape(lambda: init_params(cfg, 0))


def num_params(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))

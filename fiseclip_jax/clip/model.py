"""CLIP ViT in Flax (linen): the residual block as a module, the towers as functions over params.

Params are a plain pytree; each tower's blocks are stacked on a leading axis and run with
`lax.scan`, so a 24-block tower traces one block per segment of the stack. The segments end at the
blocks FiSeCLIP reads (feature layers, the proxy-attention layer, the last block's input).

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
from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax.clip.pos_embed import resample_pos_embed
from fiseclip_jax.config import CLIPConfig

Array = jax.Array
PROXY_CHUNK = 8   # at most this many images per step of the SeCLIP proxy block (its attention is (b, H, T, T) float32)


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


class Block(nn.Module):
  """Pre-LN transformer block of CLIP (attention then quick-gelu MLP, both residual).

  Besides the forward pass it exposes the pieces SeCLIP needs: the q/k/v heads and attention
  probabilities of this block, and its value/output path alone.
  """
  width: int
  heads: int
  mlp: int
  eps: float = 1e-5
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
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
    impl = self.attention_impl
    if impl == "cudnn" and q.dtype == jnp.float32:
      impl = None
    a = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=impl)
    x = x + self.merge_out(a)
    return x + self.fc2(quick_gelu(self.fc1(self.ln_2(x))))


def block_for(cfg: CLIPConfig, tower: str, dtype=jnp.float32, attention_impl=None) -> Block:
  if tower == "visual":
    return Block(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp, cfg.layer_norm_eps,
                 causal=False, dtype=dtype, attention_impl=attention_impl)
  return Block(cfg.text_width, cfg.text_heads, cfg.text_mlp, cfg.layer_norm_eps,
               causal=True, dtype=dtype, attention_impl=attention_impl)


def layer_norm(p: dict, x: Array, eps: float) -> Array:
  """LayerNorm with CLIP's eps, in float32, over a plain {"scale", "bias"} dict."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def run_blocks(block: Block, stacked: dict, x: Array, start: int, stop: int) -> Array:
  """Blocks [start, stop) (0-based) of a stacked block tree over x (B, T, W), as one scan."""
  if stop <= start:
    return x
  sub = jax.tree.map(lambda a: a[start:stop], stacked)
  x, _ = jax.lax.scan(lambda h, p: (block.apply({"params": p}, h), None), x, sub)
  return x


def block_params(stacked: dict, i: int) -> dict:
  """Params of block i (0-based) of a stacked block tree."""
  return jax.tree.map(lambda a: a[i], stacked)


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


class ImageFeatures(NamedTuple):
  cls_embed: Array            # (B, D) ln_post(x[:, 0]) @ proj of the unmodified model
  layer_tokens: Array         # (n_layers, B, 1 + HW, W) residual stream after each requested block
  proxy_patch_embed: Array    # (B, HW, D) SeCLIP patch embeddings (not normalized)


def embed_patches(visual: dict, cfg: CLIPConfig, images: Array, dtype) -> Array:
  """Images (B, S, S, 3) -> tokens (B, 1 + h*w, W) after ln_pre, position embedding resampled."""
  b, hs, ws, _ = images.shape
  p = cfg.patch_size
  if hs % p or ws % p:
    raise ValueError(f"image side {hs}x{ws} is not a multiple of the patch size {p}")
  h, w = hs // p, ws // p
  x = images.reshape(b, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * 3)
  kernel = visual["patch_embed"]["kernel"].reshape(p * p * 3, -1)       # HWIO -> (p*p*3, W)
  x = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
  cls = jnp.broadcast_to(visual["class_embedding"], (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls.astype(jnp.float32), x], axis=1)
  x = x + resample_pos_embed(visual["pos_embed"], cfg.grid, (h, w))
  return layer_norm(visual["ln_pre"], x, cfg.layer_norm_eps)


def project(ln_p: dict, proj: Array, x: Array, eps: float, dtype) -> Array:
  """ln then projection to the joint embedding space, float32 out."""
  x = layer_norm(ln_p, x, eps)
  return jnp.dot(x.astype(dtype), proj.astype(dtype), preferred_element_type=jnp.float32)


def proxy_attention_probs(block: Block, bp: dict, x: Array, kind: str, heads: str) -> Array:
  """Attention probabilities (B, H or 1, T, T) from `x` through block params `bp`.

  kind "qk": the block's own q-k attention (the proxy layer); "vv" / "qq" / "kk": the
  self-similarity of one projection (paper Table 5). heads "mean" averages over heads.
  """
  q, k, v = block.apply({"params": bp}, x, method=Block.qkv)               # (B, T, H, Dh)
  a, b = {"qk": (q, k), "vv": (v, v), "qq": (q, q), "kk": (k, k)}[kind]
  logits = jnp.einsum("bthd,bshd->bhts", a, b, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (a.shape[-1] ** -0.5), axis=-1)
  return probs.mean(1, keepdims=True) if heads == "mean" else probs


def proxy_block(block: Block, bp_last: dict, x_in: Array, probs: Array) -> Array:
  """SeCLIP's modified last block: out_proj(A @ v(ln_1(x_in))), no residual, no MLP."""
  _, _, v = block.apply({"params": bp_last}, x_in, method=Block.qkv)       # (B, T, H, Dh)
  probs = jnp.broadcast_to(probs, (v.shape[0], v.shape[2]) + probs.shape[2:])
  o = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return block.apply({"params": bp_last}, o.astype(v.dtype), method=Block.merge_out)


def _encode_image(params, cfg: CLIPConfig, images, feature_layers, proxy_layer, proxy_heads,
                  proxy_attention, compute_dtype, attention_impl) -> ImageFeatures:
  dtype = jnp.dtype(compute_dtype)
  n = cfg.vision_layers
  if not feature_layers or min(feature_layers) < 1 or max(feature_layers) > n:
    raise ValueError(f"feature_layers {feature_layers} must lie in 1..{n}")
  if not 1 <= proxy_layer <= n:
    raise ValueError(f"proxy_layer {proxy_layer} must lie in 1..{n}")
  visual = params["visual"]
  block = block_for(cfg, "visual", dtype, attention_impl)
  stacked = visual["blocks"]
  # Segment ends (number of blocks done) at which the stream is read.
  attn_at = proxy_layer - 1 if proxy_attention == "layer" else n - 1
  ends = sorted(set(feature_layers) | {attn_at, n - 1})
  x = embed_patches(visual, cfg, images.astype(jnp.float32), dtype)
  seen, done = {0: x}, 0
  for end in ends:
    x = run_blocks(block, stacked, x, done, end)
    seen[end], done = x, end
  x_last = run_blocks(block, stacked, x, done, n)
  seen[n] = x_last
  eps = cfg.layer_norm_eps
  cls_embed = project(visual["ln_post"], visual["proj"], x_last[:, 0], eps, dtype)
  kind = "qk" if proxy_attention == "layer" else proxy_attention
  attn_block = proxy_layer - 1 if proxy_attention == "layer" else n - 1
  bp_attn, bp_last = block_params(stacked, attn_block), block_params(stacked, n - 1)

  def seclip_patches(xs):
    """Proxy block for a few images: bounds the (b, H, T, T) attention probabilities in memory."""
    x_attn, x_in = xs
    probs = proxy_attention_probs(block, bp_attn, x_attn, kind, proxy_heads)
    x_final = proxy_block(block, bp_last, x_in, probs)
    return project(visual["ln_post"], visual["proj"], x_final[:, 1:], eps, dtype)

  b = images.shape[0]
  chunk = max(c for c in range(1, min(b, PROXY_CHUNK) + 1) if b % c == 0)   # divides B: no padding
  split = lambda a: a.reshape(b // chunk, chunk, *a.shape[1:])
  proxy = jax.lax.map(seclip_patches, (split(seen[attn_at]), split(seen[n - 1])))
  proxy = proxy.reshape(b, *proxy.shape[2:])
  layer_tokens = jnp.stack([seen[i] for i in feature_layers])
  return ImageFeatures(cls_embed, layer_tokens, proxy)


_encode_image_jit = jax.jit(_encode_image, static_argnums=(1, 3, 4, 5, 6, 7, 8))


def encode_image(params: dict, cfg: CLIPConfig, images: Array,
                 feature_layers: Tuple[int, ...] = (6, 12, 18, 24), proxy_layer: int = 12,
                 proxy_heads: str = "mean", proxy_attention: str = "layer",
                 compute_dtype: str = "float32",
                 attention_impl: Optional[str] = None) -> ImageFeatures:
  """One pass over the vision tower for both FiSeCLIP branches (jit-compiled per shape/config).

  images: (B, S, S, 3) NHWC, OpenAI-normalized, S a multiple of the patch size.
  """
  return _encode_image_jit(params, cfg, images, tuple(feature_layers), int(proxy_layer),
                           proxy_heads, proxy_attention, compute_dtype, attention_impl)


# ------------------------------------------------------------------------------------------------
# Text tower.


def _encode_text(params, cfg: CLIPConfig, ids, compute_dtype) -> Array:
  dtype = jnp.dtype(compute_dtype)
  text = params["text"]
  t = ids.shape[1]
  x = text["token_embed"][ids] + text["pos_embed"][:t]                   # (N, T, Wt)
  block = block_for(cfg, "text", dtype)
  x = run_blocks(block, text["blocks"], x.astype(jnp.float32), 0, cfg.text_layers)
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

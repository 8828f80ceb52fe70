"""What a vision tower is to the method (DESIGN.md §10): a frozen object built from its config.

A `Tower` owns its input normalization (images arrive as RGB in [0, 1]), its param shapes and one
pass that returns the residual stream after any requested block. A `TextAlignedTower` also has a
text encoder (prompts go through it, with its tokenizer) and the per-block hooks SeCLIP builds its
proxy block from: the q/k/v of a block on its input stream, a block's output projection and the
embedding head. Towers are hashable (their config is), so a jitted function takes them as static
arguments; params stay plain pytrees beside them.

A tower of your own: subclass `Tower` (or `TextAlignedTower`), set `name` and `config_type`, and
register it (`fj.register_tower`) so its config builds it. README
"Backbones" shows a complete one.
"""
from __future__ import annotations

import abc
import dataclasses
import types
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Encoded(NamedTuple):
  """One pass of a tower."""
  streams: Dict[int, Array]       # block (1-based; 0 = embeddings) -> (B, 1 + h*w, W), CLS first
  cls_embed: Optional[Array]      # (B, D) image embedding of the unmodified model (text-aligned only)


@dataclasses.dataclass(frozen=True)
class Tower(abc.ABC):
  """A vision tower: `encode` gives the residual stream after each requested block.

  Subclasses set `name` (stored in converted checkpoints), `config_type`, `mean` / `std` (the
  input normalization it was trained with), and implement `forward`, `init_params` and `flops`.
  `depth`, `patch_size` and `width` are read from the config's attributes of those names.
  """
  cfg: Any

  name: ClassVar[str]
  config_type: ClassVar[type]
  mean: ClassVar[Tuple[float, float, float]]
  std: ClassVar[Tuple[float, float, float]]
  text_aligned: ClassVar[bool] = False

  @property
  def depth(self) -> int:
    return int(self.cfg.depth)

  @property
  def patch_size(self) -> int:
    return int(self.cfg.patch_size)

  @property
  def width(self) -> int:
    return int(self.cfg.width)

  def grid(self, image_hw: Sequence[int]) -> Tuple[int, int]:
    """The patch grid (h, w) of an input of (H, W) pixels."""
    return int(image_hw[0]) // self.patch_size, int(image_hw[1]) // self.patch_size

  def normalize(self, images: Array) -> Array:
    """RGB in [0, 1] (..., 3) -> the tower's normalized input, float32."""
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (jnp.asarray(images, jnp.float32) - mean) / std

  def encode(self, params, images: Array, layers: Sequence[int], compute_dtype: str = "float32",
             attention_impl: Optional[str] = None) -> Encoded:
    """One pass on images (B, H, W, 3), RGB in [0, 1]: the stream after each block of `layers`
    (1-based; 0 = the embeddings). Un-jitted: the pipeline jits it with the rest."""
    return self.forward(params, self.normalize(images), tuple(layers), compute_dtype,
                        attention_impl)

  @abc.abstractmethod
  def forward(self, params, x: Array, layers: Tuple[int, ...], compute_dtype: str,
              attention_impl: Optional[str]) -> Encoded:
    """`encode` on an input already normalized with the tower's mean and std."""

  @abc.abstractmethod
  def init_params(self, seed: int = 0):
    """Random params (tests, benchmarks, demos)."""

  def param_shapes(self):
    """The params tree as ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(lambda: self.init_params(0))

  @abc.abstractmethod
  def flops(self, image_size: int) -> float:
    """FLOPs per image of one pass at image_size x image_size (multiply-add = 2)."""


@dataclasses.dataclass(frozen=True)
class PortedTower(Tower):
  """A tower whose pass, params and FLOPs are its port module's functions of (params, cfg, ...):
  `port.encode(params, cfg, x, layers, dtype, attention_impl)`, `port.init_params(cfg, seed)`,
  `port.param_shapes(cfg)`, `port.tower_flops(cfg, size)` (the CLIP and DINOv2 ports)."""
  port: ClassVar[types.ModuleType]

  def forward(self, params, x: Array, layers: Tuple[int, ...], compute_dtype: str,
              attention_impl: Optional[str]) -> Encoded:
    return self.port.encode(params, self.cfg, x, layers, compute_dtype, attention_impl)

  def init_params(self, seed: int = 0):
    return self.port.init_params(self.cfg, seed)

  def param_shapes(self):
    return self.port.param_shapes(self.cfg)

  def flops(self, image_size: int) -> float:
    return self.port.tower_flops(self.cfg, image_size)


@dataclasses.dataclass(frozen=True)
class TextAlignedTower(Tower):
  """A tower with a text encoder in the same embedding space (CLIP), and the hooks SeCLIP reads.

  `block` arguments are 1-based; x is a block's input stream (B, T, W).
  """
  text_aligned: ClassVar[bool] = True

  @property
  def embed_dim(self) -> int:
    return int(self.cfg.embed_dim)

  @abc.abstractmethod
  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids (N, context length) of the text encoder."""

  @abc.abstractmethod
  def encode_text(self, params, ids, compute_dtype: str = "float32") -> Array:
    """Token ids (N, T) -> text embeddings (N, D), not normalized."""

  @abc.abstractmethod
  def logit_scale(self, params) -> Array:
    """The scale of image-text cosine logits (100 for OpenAI CLIP)."""

  @abc.abstractmethod
  def block_qkv(self, params, block: int, x: Array, compute_dtype: str = "float32"):
    """q, k, v (each (B, T, H, Dh)) of block `block` on its input stream x."""

  @abc.abstractmethod
  def block_out(self, params, block: int, heads: Array, compute_dtype: str = "float32") -> Array:
    """Block `block`'s output projection of attention heads (B, T, H, Dh) -> (B, T, W)."""

  @abc.abstractmethod
  def embed_tokens(self, params, tokens: Array, compute_dtype: str = "float32") -> Array:
    """The image embedding head on any tokens (B, T, W) -> (B, T, D), in the text space."""

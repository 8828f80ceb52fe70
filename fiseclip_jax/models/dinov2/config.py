"""DINOv2 ViT architecture (transformers' `Dinov2Model`, no register tokens), its input norm and
its named variants. Light: no JAX."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict

from fiseclip_jax.core.config import config_from_dict
from fiseclip_jax.models.variants import Variant, lookup, quarters

# DINOv2 was trained on ImageNet-normalized pixels (RGB, after scaling to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HIDDEN_ACTS = ("gelu",)   # exact (erf) GELU, transformers' ACT2FN["gelu"]


def mlp_width(width: int, mlp_ratio: float, use_swiglu_ffn: bool) -> int:
  """Hidden width of the MLP as transformers derives it from `mlp_ratio`.

  SwiGLU keeps two thirds of int(width * mlp_ratio), rounded up to a multiple of 8 (ViT-g: 4096).
  """
  hidden = int(width * mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8 if use_swiglu_ffn else hidden


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Architecture of a DINOv2 ViT.

  `image_size` is the size the position embedding was trained at (518: a 37x37 grid); any input
  whose sides are multiples of `patch_size` works (the embedding is resampled bicubically). `mlp`
  is the MLP hidden width: fc1's output, or the width of each SwiGLU branch (gate and up).
  """
  image_size: int = 518
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp: int = 4096
  use_swiglu_ffn: bool = False
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"

  text_aligned: ClassVar[bool] = False   # no text tower: FiCLIP's features only

  def __post_init__(self):
    for name in ("image_size", "patch_size", "width", "layers", "heads", "mlp"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Dinov2Config.{name}={getattr(self, name)!r}; expected a positive int")
    if self.width % self.heads:
      raise ValueError(f"Dinov2Config.width={self.width} is not a multiple of heads={self.heads}")
    if self.image_size < self.patch_size:
      raise ValueError(f"Dinov2Config.image_size={self.image_size} < patch_size={self.patch_size}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"Dinov2Config.hidden_act={self.hidden_act!r}; expected one of "
                       f"{HIDDEN_ACTS}")

  @classmethod
  def vit_s14(cls) -> "Dinov2Config":
    return cls(width=384, layers=12, heads=6, mlp=1536)

  @classmethod
  def vit_b14(cls) -> "Dinov2Config":
    return cls(width=768, layers=12, heads=12, mlp=3072)

  @classmethod
  def vit_l14(cls) -> "Dinov2Config":
    return cls()

  @classmethod
  def vit_g14(cls) -> "Dinov2Config":
    """ViT-g/14: SwiGLU MLP of width 4096 (two thirds of 4 * 1536)."""
    return cls(width=1536, layers=40, heads=24, mlp=mlp_width(1536, 4, True), use_swiglu_ffn=True)

  @classmethod
  def tiny(cls, layers: int = 4, image_size: int = 56, patch_size: int = 14, width: int = 48,
           heads: int = 4, use_swiglu_ffn: bool = False) -> "Dinov2Config":
    """A small DINOv2 for tests (random weights); mlp from ratio 4 as transformers does."""
    return cls(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
               heads=heads, mlp=mlp_width(width, 4, use_swiglu_ffn), use_swiglu_ffn=use_swiglu_ffn)

  @property
  def depth(self) -> int:
    return self.layers

  @property
  def grid(self) -> int:
    """Patch grid side at the trained image size."""
    return self.image_size // self.patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Dinov2Config":
    return config_from_dict(cls, d)


VARIANTS: Dict[str, Variant] = {
    name: Variant(cfg, quarters(cfg.layers)) for name, cfg in (
        ("vit_s14", Dinov2Config.vit_s14()), ("vit_b14", Dinov2Config.vit_b14()),
        ("vit_l14", Dinov2Config.vit_l14()), ("vit_g14", Dinov2Config.vit_g14()),
        ("tiny", Dinov2Config.tiny()))}


def variant(name: str) -> Variant:
  return lookup(VARIANTS, name, "DINOv2")

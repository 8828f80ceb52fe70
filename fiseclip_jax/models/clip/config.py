"""The CLIP architecture (vision tower + text tower) and its named variants. Light: no JAX."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict

from fiseclip_jax.core.config import config_from_dict
from fiseclip_jax.models.variants import Variant, lookup

# OpenAI CLIP was trained on pixels in [0, 1] normalized with these (RGB).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a CLIP ViT (vision tower + text tower).

  `image_size` is the size the position embedding was trained at; any other input side that is a
  multiple of `patch_size` works (the embedding is resampled).
  """
  image_size: int = 336
  patch_size: int = 14
  vision_width: int = 1024
  vision_layers: int = 24
  vision_heads: int = 16
  vision_mlp: int = 4096
  embed_dim: int = 768
  text_width: int = 768
  text_layers: int = 12
  text_heads: int = 12
  text_mlp: int = 3072
  context_length: int = 77
  vocab_size: int = 49408
  layer_norm_eps: float = 1e-5

  text_aligned: ClassVar[bool] = True    # the tower built from it has a text tower (SeCLIP)

  @classmethod
  def vit_l14_336(cls) -> "CLIPConfig":
    """OpenAI CLIP ViT-L/14 at 336 px, the FiSeCLIP backbone."""
    return cls()

  @classmethod
  def vit_b16(cls) -> "CLIPConfig":
    return cls(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
               vision_mlp=3072, embed_dim=512, text_width=512, text_layers=12, text_heads=8,
               text_mlp=2048)

  @classmethod
  def tiny(cls, vision_layers: int = 4, image_size: int = 56, patch_size: int = 14,
           width: int = 32, vocab_size: int = 49408) -> "CLIPConfig":
    """A small CLIP for tests and the demo (random weights)."""
    return cls(image_size=image_size, patch_size=patch_size, vision_width=width,
               vision_layers=vision_layers, vision_heads=4, vision_mlp=4 * width, embed_dim=width,
               text_width=width, text_layers=2, text_heads=4, text_mlp=4 * width,
               vocab_size=vocab_size)

  @property
  def depth(self) -> int:
    """Blocks of the vision tower."""
    return self.vision_layers

  @property
  def width(self) -> int:
    """Width of the vision tower's residual stream."""
    return self.vision_width

  @property
  def grid(self) -> int:
    """Patch grid side at the trained image size."""
    return self.image_size // self.patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    return config_from_dict(cls, d)


# The table every user of a named CLIP reads (tests, benchmark, demo, --model).
VARIANTS: Dict[str, Variant] = {
    "vit_l14_336": Variant(CLIPConfig.vit_l14_336(), (6, 12, 18, 24), 12),
    "vit_b16": Variant(CLIPConfig.vit_b16(), (3, 6, 9, 12), 6),
    "tiny": Variant(CLIPConfig.tiny(), (1, 2, 3, 4), 2),
    # The demo's random CLIP: as deep as ViT-L/14 (24 blocks), 64 wide, the paper's blocks.
    "demo": Variant(CLIPConfig.tiny(vision_layers=24, image_size=224, patch_size=14, width=64),
                    (6, 12, 18, 24), 12),
}


def variant(name: str) -> Variant:
  return lookup(VARIANTS, name, "CLIP")

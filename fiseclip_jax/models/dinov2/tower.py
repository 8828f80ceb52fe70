"""DINOv2 as a tower object: ImageNet normalization and the port's pass (no text, no hooks); it
gives FiCLIP its features while CLIP keeps SeCLIP (DESIGN.md §10)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from fiseclip_jax.models.dinov2 import model
from fiseclip_jax.models.dinov2.config import IMAGENET_MEAN, IMAGENET_STD, Dinov2Config
from fiseclip_jax.models.tower import Encoded, Tower


@dataclasses.dataclass(frozen=True)
class Dinov2Tower(Tower):
  cfg: Dinov2Config
  name = "dinov2"
  config_type = Dinov2Config
  mean = IMAGENET_MEAN
  std = IMAGENET_STD

  def forward(self, params, x, layers: Tuple[int, ...], compute_dtype: str,
              attention_impl: Optional[str]) -> Encoded:
    return model.encode(params, self.cfg, x, layers, compute_dtype, attention_impl)

  def init_params(self, seed: int = 0):
    return model.init_params(self.cfg, seed)

  def param_shapes(self):
    return model.param_shapes(self.cfg)

  def flops(self, image_size: int) -> float:
    return model.tower_flops(self.cfg, image_size)

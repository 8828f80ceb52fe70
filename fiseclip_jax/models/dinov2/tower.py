"""DINOv2 as a tower object: ImageNet normalization and the port's pass (no text, no hooks); it
gives FiCLIP its features while CLIP keeps SeCLIP (DESIGN.md §10)."""
from __future__ import annotations

import dataclasses

from fiseclip_jax.models.dinov2 import model
from fiseclip_jax.models.dinov2.config import IMAGENET_MEAN, IMAGENET_STD, Dinov2Config
from fiseclip_jax.models.tower import PortedTower


@dataclasses.dataclass(frozen=True)
class Dinov2Tower(PortedTower):
  cfg: Dinov2Config
  name = "dinov2"
  config_type = Dinov2Config
  mean = IMAGENET_MEAN
  std = IMAGENET_STD
  port = model

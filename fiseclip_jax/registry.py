"""The backbones this library can run, as a table (DESIGN.md §10): name -> `Backbone`.

Adding one is a module that builds a `backbone.Backbone` and a line here.
"""
from __future__ import annotations

from typing import Dict

from fiseclip_jax import clip, dinov2
from fiseclip_jax.backbone import Backbone
from fiseclip_jax.checkpoint import CheckpointError

BACKBONES: Dict[str, Backbone] = {b.name: b for b in (clip.BACKBONE, dinov2.BACKBONE)}


def by_name(name: str, where: str = "") -> Backbone:
  if name not in BACKBONES:
    raise CheckpointError(f"{where}: backbone {name!r} unknown; expected one of {sorted(BACKBONES)}")
  return BACKBONES[name]


def for_config(cfg) -> Backbone:
  """The backbone whose architecture dataclass `cfg` is."""
  for b in BACKBONES.values():
    if isinstance(cfg, b.config_type):
      return b
  raise TypeError(f"{type(cfg).__name__} is no backbone's config; expected one of "
                  f"{[b.config_type.__name__ for b in BACKBONES.values()]}")


def text_aligned(cfg) -> bool:
  """Whether `cfg`'s backbone exposes the hooks SeCLIP needs (a text tower: CLIP, not DINOv2)."""
  return for_config(cfg).hooks is not None


def for_hf_config(hf_config: dict, where: str) -> Backbone:
  """The backbone of a Hugging Face config.json (CLIPModel, Dinov2Model)."""
  for b in BACKBONES.values():
    if b.is_hf_config(hf_config):
      return b
  raise CheckpointError(f"{where}: not a config this library converts (model_type="
                        f"{hf_config.get('model_type')!r}); expected a CLIPModel or Dinov2Model folder")

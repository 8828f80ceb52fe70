"""Which converter reads a Hugging Face folder, as a table: conversion is apart from running.

Each entry recognises its model's config.json and maps its state dict to a tower's params; add one
with `register` for a tower of your own (the tower itself is registered in `models.registry`).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple

from fiseclip_jax.convert import clip, dinov2
from fiseclip_jax.core.errors import CheckpointError


class Converter(NamedTuple):
  name: str                 # the tower name the converted checkpoint stores
  is_hf_config: Callable    # HF config.json dict -> whether this converter reads it
  from_hf: Callable         # (hf config, state dict, config file, weights file) -> (params, cfg)


CONVERTERS: List[Converter] = [
    Converter("clip", clip.is_hf_config, clip.from_hf),
    Converter("dinov2", dinov2.is_dinov2_config, dinov2.from_hf),
]


def register(converter: Converter) -> None:
  CONVERTERS.append(converter)


def for_hf_config(hf_config: dict, where: str) -> Converter:
  """The converter of a Hugging Face config.json (CLIPModel, Dinov2Model)."""
  for c in CONVERTERS:
    if c.is_hf_config(hf_config):
      return c
  raise CheckpointError(f"{where}: not a config this library converts (model_type="
                        f"{hf_config.get('model_type')!r}); expected a CLIPModel or Dinov2Model folder")

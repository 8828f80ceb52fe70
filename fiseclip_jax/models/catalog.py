"""Which architecture config a tower name stands for, without JAX: what a checkpoint's header
needs (it stores the name and the config), so programs read and check checkpoints before JAX
starts. `registry.register_tower` adds a tower's name here too."""
from __future__ import annotations

from typing import Dict

from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.models.clip.config import CLIPConfig
from fiseclip_jax.models.dinov2.config import Dinov2Config

CONFIG_TYPES: Dict[str, type] = {"clip": CLIPConfig, "dinov2": Dinov2Config}


def add(name: str, config_type: type) -> None:
  """Declare a tower name's config type (what `registry.register_tower` calls)."""
  known = CONFIG_TYPES.get(name)
  if known is not None and known is not config_type:
    raise ValueError(f"tower name {name!r} is taken by {known.__name__}")
  CONFIG_TYPES[name] = config_type


def config_type(name: str, where: str = "") -> type:
  """The config class of a tower name; CheckpointError naming `where` if it is unknown."""
  if name not in CONFIG_TYPES:
    raise CheckpointError(f"{where}: backbone {name!r} unknown; expected one of "
                          f"{sorted(CONFIG_TYPES)}")
  return CONFIG_TYPES[name]


def name_of(cfg) -> str:
  """The tower name of an architecture config (by its class)."""
  for name, t in CONFIG_TYPES.items():
    if type(cfg) is t:
      return name
  raise TypeError(f"{type(cfg).__name__} is no registered tower's config; expected one of "
                  f"{sorted(t.__name__ for t in CONFIG_TYPES.values())}")

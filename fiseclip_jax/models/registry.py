"""The towers this library can build from a config (DESIGN.md §10): config type -> tower class.

CLIP and DINOv2 are registered here; code outside the package adds its own with `register_tower`
(also `fj.register_tower`), after which its config works wherever a config is accepted:
`fj.detect(params, MyConfig(...), ...)`, banks, streams, the sharded round. A tower object may
also be passed directly wherever a config is.
"""
from __future__ import annotations

from typing import Dict, Type

from fiseclip_jax.models import catalog
from fiseclip_jax.models.clip.tower import CLIPTower
from fiseclip_jax.models.dinov2.tower import Dinov2Tower
from fiseclip_jax.models.tower import TextAlignedTower, Tower

_TOWERS: Dict[type, Type[Tower]] = {}


def register_tower(tower_cls: Type[Tower]) -> Type[Tower]:
  """Add a tower class (a `Tower` subclass with `name` and `config_type`); usable as a decorator.

  Its config type must declare `text_aligned` as the tower does (True for a `TextAlignedTower`),
  so programs can tell from a checkpoint's config alone which branches it feeds.
  """
  if not (isinstance(tower_cls, type) and issubclass(tower_cls, Tower)):
    raise TypeError(f"{tower_cls!r} is not a Tower subclass")
  for attr in ("name", "config_type", "mean", "std"):
    if not hasattr(tower_cls, attr):
      raise TypeError(f"{tower_cls.__name__} lacks the class attribute {attr!r}")
  aligned = issubclass(tower_cls, TextAlignedTower)
  if bool(getattr(tower_cls.config_type, "text_aligned", False)) != aligned:
    raise TypeError(f"{tower_cls.config_type.__name__}.text_aligned must be {aligned} for "
                    f"{tower_cls.__name__}")
  catalog.add(tower_cls.name, tower_cls.config_type)
  _TOWERS[tower_cls.config_type] = tower_cls
  return tower_cls


def tower_for(cfg_or_tower) -> Tower:
  """The tower of an architecture config (a Tower passes through unchanged)."""
  if isinstance(cfg_or_tower, Tower):
    return cfg_or_tower
  tower_cls = _TOWERS.get(type(cfg_or_tower))
  if tower_cls is None:
    raise TypeError(f"{type(cfg_or_tower).__name__} is no registered tower's config; expected "
                    f"one of {sorted(t.__name__ for t in _TOWERS)} (or register yours with "
                    "fj.register_tower)")
  return tower_cls(cfg_or_tower)


def tower_class(name: str, where: str = "") -> Type[Tower]:
  """The registered tower class of a name (what converted checkpoints store)."""
  return _TOWERS[catalog.config_type(name, where)]


def init_params(cfg, seed: int = 0):
  """Random params of a tower (or of a config's tower): tests, benchmarks, demos."""
  return tower_for(cfg).init_params(seed)


register_tower(CLIPTower)
register_tower(Dinov2Tower)

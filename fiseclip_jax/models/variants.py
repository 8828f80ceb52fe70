"""Named architectures and the blocks the method reads on each: one table per tower, used by the
tests, the benchmark, the demo and the programs' --model (DESIGN.md §10).

Light (no JAX): a program resolves --model before it starts JAX.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

from fiseclip_jax.core.config import FiSeConfig


class Variant(NamedTuple):
  """An architecture config with the 1-based blocks FiCLIP matches and SeCLIP borrows on it."""
  config: Any
  feature_layers: Tuple[int, ...]
  proxy_layer: Optional[int] = None     # None: a tower without text alignment

  def fise_config(self, **kw) -> FiSeConfig:
    """The method's default config with this architecture's blocks (kw: any other knob)."""
    layers = {"feature_layers": self.feature_layers}
    if self.proxy_layer is not None:
      layers["proxy_layer"] = self.proxy_layer
    return FiSeConfig(**{**layers, **kw})


def quarters(depth: int) -> Tuple[int, ...]:
  """The blocks at 1/4, 1/2, 3/4 and the end of a tower (6, 12, 18, 24 for 24 blocks)."""
  return tuple(depth * i // 4 for i in (1, 2, 3, 4))


def lookup(table: Dict[str, Variant], name: str, what: str) -> Variant:
  if name not in table:
    raise ValueError(f"unknown {what} variant {name!r}; expected one of {', '.join(table)}")
  return table[name]

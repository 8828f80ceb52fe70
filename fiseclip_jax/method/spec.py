"""The static half of a scorer: the method's config and the towers, resolved once (DESIGN.md §9).

A `Spec` is hashable and is the static argument of every jitted stage; `Params` is its dynamic
twin, the towers' params as one pytree (`api.Model` holds both towers and params). The text-aligned tower (CLIP) gives SeCLIP and, unless
another tower is given, FiCLIP's features; `fi` is FiCLIP's own tower when it is another (DINOv2).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.method.references import BuiltUnder
from fiseclip_jax.models.tower import Tower


class Params(NamedTuple):
  text: Optional[dict]        # the text-aligned tower's params (None without one)
  fi: Optional[dict]          # FiCLIP's own tower's params (None: the text tower's)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One compile per Spec and input shapes.

  text: the text-aligned tower (SeCLIP, the prompts), None for FiCLIP alone.
  fi: FiCLIP's tower when it is another one (DINOv2), None to use the text tower's features.
  """
  conf: FiSeConfig
  text: Optional[Tower]
  fi: Optional[Tower] = None
  attention_impl: str = "xla"

  def __post_init__(self):
    if self.text is None and self.fi is None:
      raise ValueError("a Spec needs a text-aligned tower, a FiCLIP tower, or both")
    if self.text is not None and not self.text.text_aligned:
      raise ValueError(f"{type(self.text).__name__} has no text tower: pass it as the FiCLIP tower")

  @property
  def fi_tower(self) -> Tower:
    """The tower whose features FiCLIP matches."""
    return self.fi if self.fi is not None else self.text

  @property
  def has_text(self) -> bool:
    return self.text is not None

  def grid(self, image_hw) -> Tuple[int, int]:
    return self.fi_tower.grid(image_hw)

  def built_under(self) -> BuiltUnder:
    """What a bank or a ring made by this scorer is bound to (DESIGN.md §5)."""
    c = self.conf
    return BuiltUnder(self.fi_tower, c.feature_layers, c.r_list, c.filter_loop, c.image_size,
                      c.compute_dtype, c.resize)


def resolve_attention(conf: FiSeConfig, backend: Optional[str] = None) -> str:
  """cuDNN fused attention on GPU in bfloat16, the blocked kernel on CPU (models/attention.py: XLA's
  would form every (B, H, T, T) score), XLA's attention elsewhere (TPU, GPU in float32).
  backend: "cpu", "gpu" or "tpu" (default: this process's; an export names its target's)."""
  if conf.attention_impl is not None:
    return conf.attention_impl
  backend = backend or jax.default_backend()
  if backend == "gpu" and conf.compute_dtype == "bfloat16":
    return "cudnn"
  if backend == "cpu":
    return "blocked"
  return "xla"


def matmul_precision(conf: FiSeConfig):
  """float32 means float32 everywhere (DESIGN.md §8): HIGHEST where a backend would use TF32/bf16."""
  if conf.compute_dtype == "float32":
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()

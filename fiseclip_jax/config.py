"""Configurations: the CLIP architecture and the FiSeCLIP method knobs (paper defaults)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


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
  def grid(self) -> int:
    """Patch grid side at the trained image size."""
    return self.image_size // self.patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown CLIPConfig fields {unknown}; expected a subset of {sorted(names)}")
    return cls(**d)


VOTES = ("majority", "and", "or", "text", "off")
REFERENCE_MODES = ("batch", "bank", "both", "rolling")
REF_AGGS = ("interval", "min")
IMAGE_SCORES = ("mean", "max", "cls")
PROXY_HEADS = ("mean", "per_head")
PROXY_ATTENTIONS = ("layer", "vv", "qq", "kk")
FILTER_LOOPS = ("r", "layer", "flat")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class FiSeConfig:
  """Every knob of the method, with the paper's defaults (DESIGN.md sections 3 and 4).

  Ablations of the paper as configs:
    Table 2 "w/o filtering": vote="off"; "M": vote="text"; "M^{r-,i}": r_list=(5, 3, 1);
      "M^{i,r}": filter_loop="layer"; "M^{i*r}": filter_loop="flat".
    Table 3 / 4 (feature matching alone): se_weight=0.0, image_score="max", and lam / mu.
    Table 5: proxy_layer=k, or proxy_attention in {"vv", "qq", "kk"}.
  """
  image_size: int = 518
  feature_layers: Tuple[int, ...] = (6, 12, 18, 24)
  r_list: Tuple[int, ...] = (1, 3, 5)
  # SeCLIP-AD.
  proxy_layer: int = 12
  proxy_heads: str = "mean"
  proxy_attention: str = "layer"
  lam: float = 1.1
  # FiCLIP-AD and mutual filtering.
  references: str = "batch"              # who is compared with whom (DESIGN.md §5)
  mu: float = 0.57
  vote: str = "majority"
  filter_loop: str = "r"
  ref_agg: str = "interval"
  topk_frac: float = 0.3
  # Fusion: share of the SeCLIP patch probability in the map (None: equal share 1 / (1 + len(r_list))).
  se_weight: Optional[float] = None
  image_score: str = "mean"
  sigma: float = 4.0
  # Execution.
  compute_dtype: str = "float32"
  attention_impl: Optional[str] = None   # None: cuDNN on GPU with bf16, else XLA.
  pair_chunk: int = 32                   # unordered pairs per lax.map step (memory bound).

  def __post_init__(self):
    def check(name, value, allowed):
      if value not in allowed:
        raise ValueError(f"FiSeConfig.{name}={value!r}; expected one of {allowed}")
    check("vote", self.vote, VOTES)
    check("references", self.references, REFERENCE_MODES)
    check("ref_agg", self.ref_agg, REF_AGGS)
    check("image_score", self.image_score, IMAGE_SCORES)
    check("proxy_heads", self.proxy_heads, PROXY_HEADS)
    check("proxy_attention", self.proxy_attention, PROXY_ATTENTIONS)
    check("filter_loop", self.filter_loop, FILTER_LOOPS)
    check("compute_dtype", self.compute_dtype, DTYPES)
    check("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    if not self.feature_layers or not self.r_list:
      raise ValueError("FiSeConfig.feature_layers and r_list must be non-empty")
    if any(r < 1 or r % 2 == 0 for r in self.r_list):
      raise ValueError(f"FiSeConfig.r_list={self.r_list}: each r must be odd and >= 1")
    if not 0.0 < self.topk_frac <= 1.0:
      raise ValueError(f"FiSeConfig.topk_frac={self.topk_frac}; expected 0 < topk_frac <= 1")
    if self.se_weight is not None and not 0.0 <= self.se_weight <= 1.0:
      raise ValueError(f"FiSeConfig.se_weight={self.se_weight}; expected None or 0..1")
    if self.pair_chunk < 1:
      raise ValueError("FiSeConfig.pair_chunk must be >= 1")
    object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
    object.__setattr__(self, "r_list", tuple(int(r) for r in self.r_list))

  @property
  def fusion_weight(self) -> float:
    """Share of the SeCLIP patch probability P_a in the fused patch map."""
    return 1.0 / (1 + len(self.r_list)) if self.se_weight is None else float(self.se_weight)

  def replace(self, **kw) -> "FiSeConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

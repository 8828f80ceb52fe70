"""The FiSeCLIP method's settings (paper defaults), each declared once with its help and choices.

Tower architectures are declared beside their towers (`models/clip/config.py`,
`models/dinov2/config.py`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from fiseclip_jax.core.rules import IMAGE_SCORE_RULES, VOTE_RULES


def config_from_dict(cls, d: dict):
  """A frozen config dataclass from a dict, naming any field it does not have."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(names)}")
  return cls(**d)


VOTES = tuple(VOTE_RULES)
IMAGE_SCORES = tuple(IMAGE_SCORE_RULES)
REFERENCE_MODES = ("batch", "bank", "both")
REFERENCE_SCOPES = ("batch", "category")
REF_AGGS = ("interval", "min")
PROXY_HEADS = ("mean", "per_head")
PROXY_ATTENTIONS = ("layer", "vv", "qq", "kk")
FILTER_LOOPS = ("r", "layer", "flat")
RESIZES = ("squash", "letterbox")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = (None, "xla", "cudnn", "blocked")   # models/attention.py


class ConfigError(ValueError):
  """A FiSeConfig value out of range; `field` names the knob (the CLI reports it as --field)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.detail = message


def knob(default, help: str, choices: Optional[tuple] = None, element: Optional[type] = None):
  """A config field with its help text and allowed values (the flags are generated from these).

  element: the type of a tuple field's items (default: the type of the default's first item);
  choices then constrain each item.
  """
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                      "element": element})


def check_choices(config) -> None:
  """ConfigError for any field of a config dataclass outside its declared choices."""
  for f in dataclasses.fields(config):
    choices = f.metadata.get("choices")
    value = getattr(config, f.name)
    if choices is None:
      continue
    items = value if isinstance(value, tuple) else (value,)
    bad = [v for v in items if v not in choices]
    if bad:
      raise ConfigError(f.name, f"{', '.join(map(repr, bad))}; expected "
                        f"{'each of' if isinstance(value, tuple) else 'one of'} "
                        f"{', '.join(str(c) for c in choices if c is not None)}")


@dataclasses.dataclass(frozen=True)
class FiSeConfig:
  """Every knob of the method, with the paper's defaults (DESIGN.md §3 to §8).

  Ablations of the paper as configs (files in eval/configs/):
    Table 2 "w/o filtering": vote="off"; "M": vote="text"; "M^{r-,i}": r_list=(5, 3, 1);
      "M^{i,r}": filter_loop="layer"; "M^{i*r}": filter_loop="flat".
    Table 3 / 4 (feature matching alone): se_weight=0.0, image_score="max", and lam / mu.
    Table 5: proxy_layer=k, or proxy_attention in {"vv", "qq", "kk"}.
  """
  image_size: int = knob(518, "Input side S in pixels (a multiple of the patch size).")
  resize: str = knob("squash", "How an image becomes S x S: squashed (the paper; the aspect ratio "
                     "is lost), or letterboxed (the longer side S, the aspect kept, centred on "
                     "grey padding that matching and the image score leave out; DESIGN.md §2).",
                     RESIZES)
  feature_layers: Tuple[int, ...] = knob((6, 12, 18, 24), "1-based blocks whose patch tokens FiCLIP matches.")
  r_list: Tuple[int, ...] = knob((1, 3, 5), "LNAMD neighbourhoods r (odd), in filtering order.")
  # SeCLIP-AD.
  proxy_layer: int = knob(12, "1-based block whose attention the SeCLIP proxy block borrows (Eq. 5).")
  proxy_heads: str = knob("mean", "Proxy attention averaged over heads, or per head.", PROXY_HEADS)
  proxy_attention: str = knob("layer", "Proxy attention: block proxy_layer's q-k, or the last "
                              "block's v-v / q-q / k-k (Table 5).", PROXY_ATTENTIONS)
  lam: float = knob(1.1, "Initial mask M0 = P_a > lam * P_n (Eq. 9, Table 3); >= 0.")
  # FiCLIP-AD and mutual filtering.
  references: str = knob("batch", "Who is compared with whom: the other images of the batch "
                         "(paper), a known-good bank, or both (DESIGN.md §5).", REFERENCE_MODES)
  reference_scope: str = knob("batch", "What 'the other images' are for references 'batch' and "
                             "'both': those of the image's batch (paper), or every other image of "
                             "its category, scored in blocks of the batch size (MuSc's protocol; "
                             "DESIGN.md §5).", REFERENCE_SCOPES)
  stream_window: int = knob(0, "Score a stream (a production line): each image against the K "
                            "images just before it, in the batch or in a ring buffer (DESIGN.md "
                            "§5); 0: not a stream. With references 'batch' only.")
  mu: float = knob(0.57, "Intermediate mask: FiCLIP score > mu (Eq. 13, Table 4); in [0, 2].")
  vote: str = knob("majority", "How FiCLIP's votes refine the mask (DESIGN.md §6).", VOTES)
  filter_loop: str = knob("r", "Filtering steps: one per r, per layer, or per (r, layer) (Table 2).",
                          FILTER_LOOPS)
  ref_agg: str = knob("interval", "Aggregation over references: mean of the k closest, or min.", REF_AGGS)
  topk_frac: float = knob(0.3, "k = max(1, floor(topk_frac * n_ref)) for 'interval'; in (0, 1].")
  match_window: Optional[int] = knob(None, "Aligned parts: a patch is matched only with a "
                                     "reference's patches within this many grid cells of its "
                                     "position (0: the same position; unset: every patch; "
                                     "DESIGN.md §4).", element=int)
  # Fusion.
  se_weight: Optional[float] = knob(None, "Share of SeCLIP's P_a in the map, in [0, 1] "
                                    "(default 1 / (1 + len(r_list))).")
  image_score: str = knob("mean", "Image score: mean of the SeCLIP probability and the map's max, "
                          "the max, or SeCLIP alone.", IMAGE_SCORES)
  sigma: float = knob(4.0, "Gaussian smoothing of the maps, in pixels; >= 0.")
  # Execution.
  compute_dtype: str = knob("float32", "Matmul dtype (float32: HIGHEST precision on every backend).",
                            DTYPES)
  attention_impl: Optional[str] = knob(None, "Attention kernel (default: cuDNN on GPU in bfloat16, "
                                       "blocked on CPU, XLA elsewhere).", ATTENTION_IMPLS)
  pair_chunk: int = knob(32, "Image pairs per step of the matching loop (bounds memory); >= 1.")

  def __post_init__(self):
    check_choices(self)
    object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
    object.__setattr__(self, "r_list", tuple(int(r) for r in self.r_list))
    if not self.feature_layers:
      raise ConfigError("feature_layers", "empty; expected at least one block")
    if not self.r_list or any(r < 1 or r % 2 == 0 for r in self.r_list):
      raise ConfigError("r_list", f"{list(self.r_list)}; expected odd values >= 1, e.g. 1,3,5")
    if min(self.feature_layers) < 1 or self.proxy_layer < 1:
      raise ConfigError("feature_layers" if min(self.feature_layers) < 1 else "proxy_layer",
                        "blocks are 1-based; expected >= 1")
    if self.image_size < 1:
      raise ConfigError("image_size", f"{self.image_size}; expected a positive multiple of the patch size")
    if not 0.0 < self.topk_frac <= 1.0:
      raise ConfigError("topk_frac", f"{self.topk_frac}; expected 0 < topk_frac <= 1")
    if not self.lam >= 0.0:
      raise ConfigError("lam", f"{self.lam}; expected >= 0 (M0 = P_a > lam * P_n; inf: M0 empty)")
    if not 0.0 <= self.mu <= 2.0:
      raise ConfigError("mu", f"{self.mu}; expected 0 <= mu <= 2 (FiCLIP scores are distances "
                        "between unit vectors)")
    if self.se_weight is not None and not 0.0 <= self.se_weight <= 1.0:
      raise ConfigError("se_weight", f"{self.se_weight}; expected 0..1 (or unset)")
    if not (self.sigma >= 0.0 and math.isfinite(self.sigma)):
      raise ConfigError("sigma", f"{self.sigma}; expected >= 0 (0: no smoothing)")
    if self.stream_window < 0:
      raise ConfigError("stream_window", f"{self.stream_window}; expected >= 0 (0: not a stream)")
    if self.stream_window and self.references != "batch":
      raise ConfigError("stream_window", f"{self.stream_window} with references "
                        f"{self.references!r}: a stream's references are the images before each "
                        "one (references 'batch'); a bank does not combine with a stream")
    if self.whole_category and self.references == "bank":
      raise ConfigError("reference_scope", "'category' with references 'bank': the scope is "
                        "that of the other images, and a bank alone compares none; use "
                        "references 'batch' or 'both'")
    if self.whole_category and self.stream_window:
      raise ConfigError("reference_scope", f"'category' with stream_window {self.stream_window}: "
                        "a stream's references are the images before each one")
    if self.match_window is not None and self.match_window < 0:
      raise ConfigError("match_window", f"{self.match_window}; expected >= 0 (or unset: every "
                        "patch)")
    if self.pair_chunk < 1:
      raise ConfigError("pair_chunk", f"{self.pair_chunk}; expected >= 1")

  def check_model(self, depth: int, patch_size: int, feature_layers: bool = True,
                  proxy_layer: bool = True) -> None:
    """Raise ConfigError where the knobs do not fit a backbone of `depth` blocks and patch size
    (feature_layers / proxy_layer False: a tower FiCLIP, resp. SeCLIP, does not read)."""
    if feature_layers and max(self.feature_layers) > depth:
      raise ConfigError("feature_layers", f"{list(self.feature_layers)}; the model has {depth} "
                        f"blocks: expected values in 1..{depth}")
    if proxy_layer and self.proxy_layer > depth:
      raise ConfigError("proxy_layer", f"{self.proxy_layer}; the model has {depth} blocks")
    if self.image_size % patch_size:
      raise ConfigError("image_size", f"{self.image_size} is not a multiple of the patch size "
                        f"{patch_size} (e.g. {patch_size * round(self.image_size / patch_size) or patch_size})")
    grid = self.image_size // patch_size
    if grid < 2:
      raise ConfigError("image_size", f"{self.image_size} gives a {grid} x {grid} patch grid; "
                        f"expected at least 2 x 2 patches ({2 * patch_size} px)")
    if feature_layers and max(self.r_list) > grid:
      raise ConfigError("r_list", f"{list(self.r_list)}: r = {max(self.r_list)} is wider than the "
                        f"{grid} x {grid} patch grid at {self.image_size} px; expected r <= {grid}")

  def check_grids(self, text_patch: Optional[int], fi_patch: Optional[int]) -> None:
    """SeCLIP's mask must lie on FiCLIP's patch grid: two towers need one grid at image_size
    (ValueError otherwise; None: that tower is absent)."""
    if text_patch is None or fi_patch is None:
      return
    gt, gf = self.image_size // text_patch, self.image_size // fi_patch
    if gt != gf:
      raise ValueError(f"the text tower's patch grid ({gt}) differs from the FiCLIP tower's "
                       f"({gf}) at {self.image_size} px; they must match")

  @property
  def fusion_weight(self) -> float:
    """Share of the SeCLIP patch probability P_a in the fused patch map."""
    return 1.0 / (1 + len(self.r_list)) if self.se_weight is None else float(self.se_weight)

  @property
  def letterbox(self) -> bool:
    """Whether images are letterboxed (their aspect kept) rather than squashed."""
    return self.resize == "letterbox"

  @property
  def whole_category(self) -> bool:
    """Whether every image of a category is a reference of every other (not only its batch's)."""
    return self.reference_scope == "category"

  @property
  def streaming(self) -> bool:
    """Whether this config scores a stream (each image against the `stream_window` before it)."""
    return self.stream_window > 0

  @property
  def n_steps(self) -> int:
    """Filtering steps: one per r, per layer, or per (r, layer)."""
    n_r, n_l = len(self.r_list), len(self.feature_layers)
    return {"r": n_r, "layer": n_l, "flat": n_r * n_l}[self.filter_loop]

  def replace(self, **kw) -> "FiSeConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

"""What a benchmark run measures, each setting declared once (the program's flags are generated
from these fields). Light: no JAX, so the flags are checked before JAX starts."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from fiseclip_jax.core.config import ATTENTION_IMPLS, DTYPES, ConfigError, check_choices, knob
from fiseclip_jax.models.clip.config import VARIANTS

MODELS = tuple(m for m in VARIANTS if m != "demo")
STAGES = ("encoder", "seclip", "lnamd", "mutual_filtering", "maps", "end_to_end")
REFERENCE_STAGES = ("bank_features", "end_to_end_bank", "stream_step")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  model: str = knob("vit_l14_336", "CLIP architecture (random weights; models/clip/config.py).",
                    MODELS)
  image_size: int = knob(518, "Input side S (a multiple of the patch size).")
  batch_sizes: Tuple[int, ...] = knob((2, 8, 16, 32, 64), "Batch sizes B.")
  dtypes: Tuple[str, ...] = knob(DTYPES, "Compute dtypes.", DTYPES)
  stages: Tuple[str, ...] = knob(STAGES + REFERENCE_STAGES, "Stages to time.",
                                 STAGES + REFERENCE_STAGES)
  match_windows: Optional[Tuple[int, ...]] = knob(None, "Also time mutual_filtering with "
                                                   "aligned matching at each match window w, "
                                                   "e.g. 1,2,4 (DESIGN.md §4).", element=int)
  bank_size: int = knob(16, "K: images of the bank and of a stream's ring (references rows).")
  repeats: int = knob(5, "Timed calls per stage (median reported).")
  torch_compare: bool = knob(True, "Also time transformers' CLIPVisionModel tower.")
  torch_threads: Optional[int] = knob(None, "torch.set_num_threads for the CPU comparison "
                                      "(default: torch's own choice).", element=int)
  devices: Optional[Tuple[int, ...]] = knob(None, "Device counts for data-parallel end-to-end "
                                            "rows, e.g. 1,2,4,8.", element=int)
  dp_batch_size: int = knob(16, "Per-device batch of the data-parallel rows.")
  dp_dtype: Optional[str] = knob(None, "dtype of the data-parallel rows (default: bfloat16 off "
                                 "CPU when listed in --dtypes, else the first of --dtypes).",
                                 (None,) + DTYPES)
  category_sizes: Optional[Tuple[int, ...]] = knob(None, "Also time whole-category references "
                                                   "(--references category) at each category "
                                                   "size n, e.g. 16,64,256, with batch mode over "
                                                   "the same images beside.", element=int)
  category_batch: int = knob(16, "B of the category rows: their block and batch mode's batch.")
  metrics_bench: bool = knob(True, "Time the metrics on random maps and blob masks.")
  metrics_n: int = knob(150, "Maps in the metrics benchmark.")
  metrics_size: int = knob(518, "Side of the maps in the metrics benchmark.")
  peak_tflops: Optional[float] = knob(None, "Peak TFLOP/s for MFU, every dtype. Default: 870 on "
                                      "an H200 (its bf16 matmul); on CPU a 2048^3 matmul of each "
                                      "dtype, measured at start and end; elsewhere a bf16 8192^3 "
                                      "matmul.")
  seed: int = knob(0, "Seed of the random weights and inputs.")
  attention_impl: Optional[str] = knob(None, "Attention kernel of every row (default: the "
                                       "pipeline's choice, method/spec.resolve_attention).",
                                       ATTENTION_IMPLS)

  def __post_init__(self):
    check_choices(self)
    if any(w < 0 for w in self.match_windows or ()):
      raise ConfigError("match_windows", f"{','.join(map(str, self.match_windows))}; expected "
                        "integers >= 0")
    for name in ("batch_sizes", "devices", "category_sizes"):
      values = getattr(self, name) or ()
      if any(v < 1 for v in values) or (name == "batch_sizes" and not values):
        raise ConfigError(name, f"{','.join(map(str, values)) or '(empty)'}; expected positive "
                          "integers")
    if not self.dtypes or not self.stages:
      raise ConfigError("dtypes" if not self.dtypes else "stages", "empty; expected at least one")
    for name in ("image_size", "bank_size", "repeats", "dp_batch_size", "category_batch",
                 "metrics_n", "metrics_size"):
      if getattr(self, name) < 1:
        raise ConfigError(name, f"{getattr(self, name)}; expected >= 1")
    if self.torch_threads is not None and self.torch_threads < 1:
      raise ConfigError("torch_threads", f"{self.torch_threads}; expected >= 1 (or unset)")
    if self.peak_tflops is not None and not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
      raise ConfigError("peak_tflops", f"{self.peak_tflops}; expected a positive number")
    patch = VARIANTS[self.model].config.patch_size
    if self.image_size % patch:
      raise ConfigError("image_size", f"{self.image_size} is not a multiple of {self.model}'s "
                        f"patch size {patch}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

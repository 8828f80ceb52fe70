"""What the repeated-defect stress benchmark runs, each setting declared once (fiseclip-stress's
flags are generated from these fields). Light: no JAX."""
from __future__ import annotations

import dataclasses
from typing import Tuple

from fiseclip_jax.core.config import REF_AGGS, ConfigError, check_choices, knob

PLACEMENTS = ("same", "random")
STRESS_REFERENCES = ("batch", "bank", "both")


@dataclasses.dataclass(frozen=True)
class StressConfig:
  """One real defect pasted into k of B known-good images (DESIGN.md §16)."""
  batch_size: int = knob(16, "B: images of the batch, k of them with the pasted defect.")
  repeats: Tuple[int, ...] = knob((1, 2, 4, 8), "k: how many images of the batch carry the "
                                  "defect.")
  placements: Tuple[str, ...] = knob(PLACEMENTS, "Where the copies go: the defect's own place in "
                                     "every image, or a random place in each.", PLACEMENTS)
  ref_aggs: Tuple[str, ...] = knob(REF_AGGS, "Aggregations over references to compare.", REF_AGGS)
  references: Tuple[str, ...] = knob(STRESS_REFERENCES, "Reference modes to compare.",
                                     STRESS_REFERENCES)
  bank_size: int = knob(8, "Known-good images of the bank (others than the batch's).")
  defect_index: int = knob(0, "Which defective test image (sorted by path) gives the defect.")
  seed: int = knob(0, "Seed of the random places and of which images carry the defect.")

  def __post_init__(self):
    check_choices(self)
    if self.batch_size < 2:
      raise ConfigError("batch_size", f"{self.batch_size}; expected >= 2")
    if not self.repeats or any(not 1 <= k < self.batch_size for k in self.repeats):
      raise ConfigError("repeats", f"{','.join(map(str, self.repeats))}; expected values in "
                        f"1..{self.batch_size - 1} (some images must stay clean)")
    if self.bank_size < 1:
      raise ConfigError("bank_size", f"{self.bank_size}; expected >= 1")
    if self.defect_index < 0:
      raise ConfigError("defect_index", f"{self.defect_index}; expected >= 0")
    for name in ("placements", "ref_aggs", "references"):
      if not getattr(self, name):
        raise ConfigError(name, "empty; expected at least one")

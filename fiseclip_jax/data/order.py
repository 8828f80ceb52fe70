"""Which samples a run takes and in which order: a seeded shuffle, a seeded few-shot draw."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.datasets import Sample


def shuffled(samples: Sequence[Sample], seed: int) -> List[Sample]:
  """A fixed shuffled order: batches mix good and defective images reproducibly."""
  order = np.random.RandomState(seed).permutation(len(samples))
  return [samples[i] for i in order]


def draw(samples: Sequence[Sample], k: int, seed: int) -> List[Sample]:
  """k samples drawn without replacement with a seed, in drawn order (the few-shot bank)."""
  if k > len(samples):
    raise BadInputError(f"--k_shot {k}: only {len(samples)} known-good image(s) available"
                        + (f" (e.g. {samples[0].path})" if samples else ""))
  order = np.random.RandomState(seed).permutation(len(samples))[:k]
  return [samples[i] for i in order]

"""The method's rule tables: how votes refine a mask, how an image score is made (DESIGN.md §6, §7).

Plain operators only, so the same table serves NumPy and JAX arrays and the config can list the
choices without importing JAX. Adding a rule is one entry here (and its twin in the NumPy
reference of the tests).
"""
from __future__ import annotations

from typing import Callable, NamedTuple


class VoteRule(NamedTuple):
  """start(mask0) -> the mask of the first step; refine(votes, voters, mask0) -> the next mask.

  votes (B, N) int: votes for "anomalous", M0 included; voters (B, 1) int: each image's voters.
  """
  start: Callable
  refine: Callable


VOTE_RULES = {
    "majority": VoteRule(lambda m0: m0, lambda votes, voters, m0: votes * 2 > voters),  # ties: normal
    "and": VoteRule(lambda m0: m0, lambda votes, voters, m0: votes == voters),
    "or": VoteRule(lambda m0: m0, lambda votes, voters, m0: votes > 0),
    "text": VoteRule(lambda m0: m0, lambda votes, voters, m0: m0),              # M0, never refined
    "off": VoteRule(lambda m0: m0 & False, lambda votes, voters, m0: m0 & False),  # no filtering
}

# Image score from the SeCLIP image probability (B,) and the maximum of the pixel map (B,).
IMAGE_SCORE_RULES = {
    "mean": lambda cls_score, peak: (cls_score + peak) / 2,
    "max": lambda cls_score, peak: peak,
    "cls": lambda cls_score, peak: cls_score,
}

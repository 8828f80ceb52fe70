"""The service's settings, declared once: fiseclip-serve's flags take their defaults from here.

Light (no JAX, no FastAPI): the program reads it before anything starts. DESIGN.md §15.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """The service's settings (fiseclip-serve's flags; DESIGN.md §15)."""
  max_wait_ms: float = 2.0           # how long the first waiting part waits for a fuller batch
  max_bytes: int = 20 * 2**20        # a request body
  max_pixels: int = 50_000_000       # an image's width x height, read from its header
  keep: int = 50                     # parts kept for the page and the links
  picture_side: int = 640            # the kept pictures' longest side
  token: Optional[str] = None        # wanted by every route but /v1/health when set
  max_waiting: int = 1024            # parts waiting for the worker (503 beyond)
  max_lines: int = 256               # rolling lines with a ring (429 beyond)
  map_range: str = "0,1"             # the overlays' colour scale (overlays.ColourScale)
  legend: bool = False               # the colour bar under each overlay

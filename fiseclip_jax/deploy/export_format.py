"""What an exported program is, in words and names only (light: no JAX), for the export program's
flag checks and the sidecar (DESIGN.md §15).

An export is one `jax.export` file (serialized StableHLO with the towers' weights, the text
features and the bank as constants) and a JSON sidecar beside it (`sidecar_path`) that says how
to feed it and read it; running it needs jax and numpy only (`snippet`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

FORMAT = "fiseclip-jaxexport/1"
PLATFORMS = ("cpu", "cuda", "tpu")                        # jax.export's names for them
BACKEND = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}      # ... and `jax.default_backend()`'s
# Several platforms: one program for all, so one attention every one of them lowers (cuDNN's
# does not lower for CPU or TPU; the blocked kernel is a CPU loop). XLA's is what TPU and GPU in
# float32 use anyway; on CPU it forms every (B, H, T, T) score (models/attention.py).
PORTABLE_ATTENTION = "xla"
RESIZE_RULE = ("read as 8-bit RGB (PIL convert('RGB')), resized with PIL bicubic to S x S, no crop "
               "(the aspect ratio is not kept), float32 / 255: RGB in [0, 1] "
               "(fiseclip_jax/data/preprocess.py)")


def sidecar_path(out: str) -> str:
  """The JSON file beside an exported program."""
  return out + ".json"


def parse_platforms(names: Sequence[str]) -> Tuple[str, ...]:
  """The platforms asked, lower-cased, each once, in order; ValueError naming a bad one."""
  out = []
  for n in names:
    n = n.strip().lower()
    if n not in PLATFORMS:
      raise ValueError(f"{n!r} is not a platform jax.export targets here; expected some of "
                       f"{','.join(PLATFORMS)}")
    if n not in out:
      out.append(n)
  if not out:
    raise ValueError(f"no platform; expected some of {','.join(PLATFORMS)}")
  return tuple(out)


def snippet(file_name: str) -> str:
  """The Python that loads and calls an export with jax and numpy only."""
  return f'''import json
import numpy as np
from jax import export
meta = json.load(open("{file_name}.json"))
program = export.deserialize(bytearray(open("{file_name}", "rb").read()))
b, s = meta["batch_size"], meta["image_size"]
n = b                                          # images in this call, at most b
images = np.zeros((b, s, s, 3), np.float32)    # fill [:n] as meta["resize"] says: RGB in [0, 1]
valid = np.arange(b) < n                       # the slots holding an image; the rest are padding
scores, maps = program.call(images, valid)     # (b,) image scores, (b, s, s) maps; read [:n]
flagged = np.asarray(scores) >= meta["thresholds"]["image"]
'''

"""A bundle's metadata, read without JAX: what a program checks before it loads any tower.

A bundle (`deploy/bundle.py`, DESIGN.md §15) is a safetensors file whose metadata entry
"fiseclip_bundle" is one JSON document; its "format" says which reader can use it.
"""
from __future__ import annotations

import json
import os

from safetensors import SafetensorError, safe_open

from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.core.version import __version__

FORMAT = "fiseclip-bundle/1"
META_KEY = "fiseclip_bundle"


class BundleError(BadInputError):
  """A bundle that cannot be used; the message names the file and what was expected."""


def read_meta(path: str) -> dict:
  """The metadata of a bundle file, its format checked; BundleError naming the file otherwise."""
  if not os.path.isfile(path):
    raise BundleError(f"bundle {path}: file not found (make one with fiseclip-bundle)")
  try:
    with safe_open(path, framework="numpy") as f:
      raw = (f.metadata() or {}).get(META_KEY)
  except (SafetensorError, OSError, ValueError) as e:
    raise BundleError(f"bundle {path}: not a readable safetensors file ({e}); expected a file "
                      "written by fiseclip-bundle") from None
  if raw is None:
    raise BundleError(f"bundle {path}: no {META_KEY!r} metadata: not a FiSeCLIP-JAX bundle (a "
                      "checkpoint? make a bundle with fiseclip-bundle --weights ...)")
  try:
    meta = json.loads(raw)
  except ValueError as e:
    raise BundleError(f"bundle {path}: its metadata is not JSON ({e}); the file is damaged") from None
  if meta.get("format") != FORMAT:
    raise BundleError(f"bundle {path}: format {meta.get('format')!r}, written by fiseclip-jax "
                      f"{meta.get('version', '?')}; this fiseclip-jax {__version__} reads "
                      f"{FORMAT!r}: rebuild the bundle with this version's fiseclip-bundle")
  return meta

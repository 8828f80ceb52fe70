"""A converted checkpoint's header, read without JAX: which tower, its architecture, the source.

Converted checkpoints are one safetensors file of '/'-joined param paths with the tower's name and
config in its metadata (format "fiseclip_jax/2"); files of the first format (CLIP only,
"clip_config") still read. Programs read headers to check a run before JAX starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict

from safetensors import SafetensorError, safe_open

from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.models import catalog

FORMAT = "fiseclip_jax/2"
FORMAT_V1 = "fiseclip_jax/1"     # CLIP only: {"clip_config": ...}


def flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


def unflatten(flat: Dict[str, object]) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def read_metadata(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file (convert one with `python -m weights.convert`)")
  try:
    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from e


def read_config(path: str):
  """The architecture a converted checkpoint declares (a tower's config), from its header alone."""
  meta = read_metadata(path)
  if meta.get("format") == FORMAT_V1 and "clip_config" in meta:
    name, key = "clip", "clip_config"
  elif meta.get("format") == FORMAT and "config" in meta:
    name, key = meta.get("backbone", ""), "config"
  else:
    raise CheckpointError(f"{path}: not a FiSeCLIP-JAX checkpoint (metadata format={meta.get('format')!r}, "
                          f"expected {FORMAT!r}); convert the source with `python -m weights.convert`")
  config_type = catalog.config_type(name, path)
  try:
    return config_type.from_dict(json.loads(meta[key]))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: bad {key} metadata of a {name} checkpoint: {e}") from e


def read_backbone(path: str) -> str:
  """The name of the tower a converted checkpoint holds ("clip", "dinov2")."""
  return catalog.name_of(read_config(path))

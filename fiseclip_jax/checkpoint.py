"""Converted checkpoints: one safetensors file of '/'-joined param paths; the backbone's name and
architecture in its metadata.

`load_checkpoint` checks every key and shape against the architecture the file declares and names
what is missing, unexpected or mis-shaped, so a wrong file fails here and not deep inside a jit.
Files of the first format (CLIP only, `clip_config`) still load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import json
import os
from typing import Dict, Tuple

import numpy as np


FORMAT = "fiseclip_jax/2"
FORMAT_V1 = "fiseclip_jax/1"     # CLIP only: {"clip_config": ...}


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, with the reason and the file."""


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


def expected_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
  """'/'-joined param path -> shape for an architecture (any backbone's config)."""
  from fiseclip_jax import registry  # jax import kept off the module's import path
  shapes = registry.for_config(cfg).param_shapes(cfg)
  return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def check_params(flat: Dict[str, np.ndarray], cfg, where: str) -> None:
  """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  bad = sorted(f"{k}: {tuple(flat[k].shape)}, expected {want[k]}" for k in set(want) & set(flat)
               if tuple(flat[k].shape) != want[k])
  if missing or extra or bad:
    parts = []
    if missing:
      parts.append(f"missing keys {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if extra:
      parts.append(f"unexpected keys {extra[:10]}" + (f" (+{len(extra) - 10} more)" if len(extra) > 10 else ""))
    if bad:
      parts.append(f"mis-shaped keys {bad[:10]}")
    raise CheckpointError(f"{where}: does not match the architecture {cfg}: " + "; ".join(parts))


def _canonical_safetensors(data: bytes) -> bytes:
  """The same safetensors file with its JSON header's keys sorted: safetensors writes metadata in
  an order that changes from process to process, so equal checkpoints would differ in bytes."""
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)                  # the data stays 8-byte aligned
  return struct.pack("<Q", len(text)) + text + data[8 + n:]


def save_checkpoint(path: str, params: dict, cfg, source_sha256: str = "", source: str = "") -> None:
  """Write params (float32), the backbone's name and its config as one safetensors file, the same
  bytes for the same content (atomically: a temporary name, then a rename)."""
  from safetensors.numpy import save
  from fiseclip_jax import registry
  flat = {k: np.array(v, np.float32, order="C") for k, v in flatten(params).items()}
  check_params(flat, cfg, path)
  meta = {"format": FORMAT, "backbone": registry.for_config(cfg).name,
          "config": json.dumps(dataclasses.asdict(cfg)), "source_sha256": source_sha256,
          "source": os.path.basename(source)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(_canonical_safetensors(save(flat, metadata=meta)))
  os.replace(tmp, path)


def read_metadata(path: str) -> dict:
  from safetensors import SafetensorError, safe_open
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file (convert one with `python -m weights.convert`)")
  try:
    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from e


def read_config(path: str):
  """The architecture a converted checkpoint declares (a backbone's config), from its header alone."""
  from fiseclip_jax import registry
  meta = read_metadata(path)
  if meta.get("format") == FORMAT_V1 and "clip_config" in meta:
    name, key = "clip", "clip_config"
  elif meta.get("format") == FORMAT and "config" in meta:
    name, key = meta.get("backbone", ""), "config"
  else:
    raise CheckpointError(f"{path}: not a FiSeCLIP-JAX checkpoint (metadata format={meta.get('format')!r}, "
                          f"expected {FORMAT!r}); convert the source with `python -m weights.convert`")
  config_type = registry.by_name(name, path).config_type
  try:
    return config_type.from_dict(json.loads(meta[key]))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: bad {key} metadata of a {name} checkpoint: {e}") from e


def read_backbone(path: str) -> str:
  """The name of the backbone a converted checkpoint holds ("clip", "dinov2")."""
  from fiseclip_jax import registry
  return registry.for_config(read_config(path)).name


def load_checkpoint(path: str) -> Tuple[dict, object]:
  """(params, cfg) from a file written by `python -m weights.convert`, for any backbone (cfg is a
  CLIPConfig or a Dinov2Config); refuses a wrong file naming what is wrong."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  cfg = read_config(path)
  try:
    flat = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from e
  check_params(flat, cfg, path)
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()}), cfg

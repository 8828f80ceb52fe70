"""Load and save converted checkpoints, every key and shape checked against the architecture.

`load_checkpoint` names what is missing, unexpected or mis-shaped, so a wrong file fails here and
not deep inside a jit. The header (tower and config) is read by `header.py`, without JAX.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Dict, Tuple

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from fiseclip_jax.convert.header import FORMAT, flatten, read_config, unflatten
from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.models import registry


def expected_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
  """'/'-joined param path -> shape for an architecture (any tower's config)."""
  shapes = registry.tower_for(cfg).param_shapes()
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


def canonical_safetensors(data: bytes) -> bytes:
  """The same safetensors file with its JSON header's keys sorted: safetensors writes metadata in
  an order that changes from process to process, so equal checkpoints would differ in bytes."""
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)                  # the data stays 8-byte aligned
  return struct.pack("<Q", len(text)) + text + data[8 + n:]


def save_checkpoint(path: str, params: dict, cfg, source_sha256: str = "", source: str = "") -> None:
  """Write params (float32), the tower's name and its config as one safetensors file, the same
  bytes for the same content (atomically: a temporary name, then a rename)."""
  flat = {k: np.array(v, np.float32, order="C") for k, v in flatten(params).items()}
  check_params(flat, cfg, path)
  meta = {"format": FORMAT, "backbone": registry.tower_for(cfg).name,
          "config": json.dumps(dataclasses.asdict(cfg)), "source_sha256": source_sha256,
          "source": os.path.basename(source)}
  atomic_write(path, canonical_safetensors(save(flat, metadata=meta)))


def load_checkpoint(path: str) -> Tuple[dict, object]:
  """(params, cfg) from a file written by `python -m weights.convert`, for any tower (cfg is a
  CLIPConfig or a Dinov2Config); refuses a wrong file naming what is wrong."""
  cfg = read_config(path)
  try:
    flat = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from e
  check_params(flat, cfg, path)
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()}), cfg

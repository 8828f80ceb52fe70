"""One file a line can score with (DESIGN.md §15): towers, class text, known-good bank, thresholds.

A bundle is a safetensors file: the tensors (the towers' params unless they are referenced by the
sha256 of their checkpoint, the class's text features, the bank's feature maps) and one JSON
metadata entry with everything else (the full `FiSeConfig`, the towers' configs, the class name,
the thresholds and how they were chosen, the compiled batch size, the package version). Nothing is
pickled: reading a bundle runs no code from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, NamedTuple, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from fiseclip_jax.convert import header
from fiseclip_jax.convert.checkpoint import load_checkpoint
from fiseclip_jax.core.config import FiSeConfig, config_from_dict
from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.core.version import __version__
from fiseclip_jax.deploy.bundle_header import FORMAT, META_KEY, BundleError, read_meta
from fiseclip_jax.models import catalog, registry

ROLES = ("text", "fi")          # the text-aligned tower (or the only one), FiCLIP's own tower


class TowerEntry(NamedTuple):
  """One tower of a bundle: its config, params and where the params came from."""
  cfg: object
  params: dict
  source: dict     # {"sha256": ... or None, "weights": path or "random:<model>:seed<k>"}


class Bundle(NamedTuple):
  """What a bundle holds, as host values."""
  conf: FiSeConfig
  towers: Dict[str, TowerEntry]       # "text" (always), "fi" (FiCLIP's own tower, optional)
  class_name: str
  text: Optional[np.ndarray]          # (2, D) float32 text features; None: FiCLIP alone
  bank: Optional[np.ndarray]          # (S, G, K, N, C) the bank's feature maps as filtering steps
  bank_names: tuple                   # (K,) the bank images' file names
  decision: dict                      # image_threshold, pixel_threshold, how, ... (DESIGN.md §13)
  batch_size: int                     # the compiled batch
  meta: dict                          # the whole metadata entry as read
  bank_padding: Optional[np.ndarray] = None   # (K, N) bool: letterboxed bank images' padding

  @property
  def references(self) -> str:
    return "rolling" if self.conf.streaming else self.conf.references


def tower_source(weights: Optional[str], model: str = "", seed: int = 0) -> dict:
  """Where a tower's params come from: a checkpoint (its sha256) or a seeded random init."""
  if weights:
    return {"sha256": header.sha256_file(weights), "weights": os.path.abspath(weights)}
  return {"sha256": None, "weights": f"random:{model}:seed{seed}", "seed": seed}


def write_bundle(path: str, b: Bundle, embed_weights: bool = True) -> int:
  """Write a bundle atomically; returns its size in bytes. embed_weights False: the towers are
  referenced by their checkpoint's sha256 and path (random towers by their seed)."""
  tensors = {}
  towers = {}
  for role, t in b.towers.items():
    entry = {"backbone": catalog.name_of(t.cfg), "config": dataclasses.asdict(t.cfg),
             "source": t.source, "embedded": bool(embed_weights)}
    if embed_weights:
      for k, v in header.flatten(t.params).items():
        tensors[f"{role}/{k}"] = np.array(v, np.float32, order="C")
    towers[role] = entry
  if b.text is not None:
    tensors["text_features"] = np.asarray(b.text, np.float32)
  if b.bank is not None:
    tensors["bank/feats"] = np.array(b.bank, np.float32, order="C")   # bf16 -> f32 is exact
  if b.bank_padding is not None:
    tensors["bank/padding"] = np.asarray(b.bank_padding, np.uint8)
  meta = {"format": FORMAT, "version": __version__, "class_name": b.class_name,
          "config": b.conf.to_dict(), "references": b.references, "towers": towers,
          "batch_size": int(b.batch_size), "image_size": b.conf.image_size,
          "decision": b.decision, "bank": {"n": len(b.bank_names), "images": list(b.bank_names)},
          **{k: v for k, v in b.meta.items() if k not in ("format", "version")}}
  data = save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
  atomic_write(path, data)
  return len(data)


def _tower_params(path: str, role: str, entry: dict, cfg, f, weights: Optional[str]) -> dict:
  """A tower's params: embedded, from the checkpoint given (checked against the bundle's sha256),
  or re-drawn from the seed of a random tower."""
  src = entry["source"]
  if entry["embedded"]:
    prefix = f"{role}/"
    return header.unflatten({k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                             if k.startswith(prefix)})
  if src.get("sha256") is None:
    return registry.init_params(cfg, int(src.get("seed", 0)))
  weights = weights or src["weights"]
  if not os.path.isfile(weights):
    raise BundleError(f"bundle {path}: its {role} tower is not embedded and its checkpoint "
                      f"{weights} is absent; pass the checkpoint it was built with (sha256 "
                      f"{src['sha256'][:16]}...)")
  got = header.sha256_file(weights)
  if got != src["sha256"]:
    raise BundleError(f"bundle {path}: checkpoint {weights} has sha256 {got[:16]}..., the bundle "
                      f"was built with {src['sha256'][:16]}...: pass the checkpoint it was built "
                      "with")
  return load_checkpoint(weights)[0]


def read_bundle(path: str, weights: Optional[Dict[str, str]] = None) -> Bundle:
  """A bundle as host values. weights: role -> checkpoint path for towers that are not embedded
  (default: the path stored in the bundle); each is checked against the bundle's sha256."""
  meta = read_meta(path)
  weights = weights or {}
  try:
    conf_dict = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    conf = config_from_dict(FiSeConfig, conf_dict)
    towers = {}
    with safe_open(path, framework="numpy") as f:
      for role, entry in meta["towers"].items():
        cfg = catalog.config_type(entry["backbone"], path).from_dict(entry["config"])
        towers[role] = TowerEntry(cfg, _tower_params(path, role, entry, cfg, f, weights.get(role)),
                                  entry["source"])
      keys = set(f.keys())
      text = f.get_tensor("text_features") if "text_features" in keys else None
      bank = f.get_tensor("bank/feats") if "bank/feats" in keys else None
      padding = f.get_tensor("bank/padding").astype(bool) if "bank/padding" in keys else None
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, BundleError):
      raise
    raise BundleError(f"bundle {path}: damaged metadata or tensors ({type(e).__name__}: {e})") from None
  return Bundle(conf, towers, meta["class_name"], text, bank, tuple(meta["bank"]["images"]),
                meta["decision"], int(meta["batch_size"]), meta, padding)

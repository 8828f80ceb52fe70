"""Prompt ensemble (APRIL-GAN family) -> normal / abnormal text features F_t (2, D).

The sentences go through the text-aligned tower's own tokenizer and text encoder, so any
`TextAlignedTower` gets its prompts the same way (DESIGN.md §3).
"""
from __future__ import annotations

from typing import List, Optional

import jax.numpy as jnp
import numpy as np

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.method.prompt_text import prompts
from fiseclip_jax.models import registry
from fiseclip_jax.models.tower import TextAlignedTower

CHUNK = 64   # prompts encoded per call: one compiled shape for every class


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_sentences(params: dict, tower: TextAlignedTower, sentences: List[str],
                     compute_dtype: str = "float32") -> jnp.ndarray:
  """(N, D) unit text embeddings, encoded in fixed-size chunks (no recompile per class)."""
  ids = np.asarray(tower.tokenize(sentences), np.int32)
  pad = (-len(ids)) % CHUNK
  ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
  feats = [tower.encode_text(params, ids[i:i + CHUNK], compute_dtype)
           for i in range(0, len(ids), CHUNK)]
  return _unit(jnp.concatenate(feats)[:len(sentences)].astype(jnp.float32))


def text_features(params: dict, cfg, class_name: str,
                  conf: Optional[FiSeConfig] = None) -> jnp.ndarray:
  """F_t (2, D): row 0 normal, row 1 abnormal; mean of unit prompt embeddings, re-normalized.

  cfg: a text-aligned tower or its config (CLIP). Compute once per category and pass it to
  `detect`: it is an argument, so changing class does not recompile.
  """
  tower = registry.tower_for(cfg)
  if not tower.text_aligned:
    raise ValueError(f"{type(tower).__name__} has no text encoder: text features need a "
                     "text-aligned tower (CLIP)")
  dtype = (conf or FiSeConfig()).compute_dtype
  normal, abnormal = prompts(class_name)
  feats = encode_sentences(params, tower, normal + abnormal, dtype)
  return _unit(jnp.stack([feats[:len(normal)].mean(0), feats[len(normal):].mean(0)]))

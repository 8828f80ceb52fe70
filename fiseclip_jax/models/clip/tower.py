"""CLIP's vision tower as the object the method runs: OpenAI normalization, the port's pass, its
text encoder and tokenizer, and the per-block hooks SeCLIP reads (DESIGN.md §2, §10)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fiseclip_jax.models.clip import model, tokenizer
from fiseclip_jax.models.clip.config import OPENAI_MEAN, OPENAI_STD, CLIPConfig
from fiseclip_jax.models.tower import PortedTower, TextAlignedTower


@dataclasses.dataclass(frozen=True)
class CLIPTower(PortedTower, TextAlignedTower):
  cfg: CLIPConfig
  name = "clip"
  config_type = CLIPConfig
  mean = OPENAI_MEAN
  std = OPENAI_STD
  port = model

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    return tokenizer.tokenize(texts, self.cfg.context_length)

  def encode_text(self, params, ids, compute_dtype: str = "float32"):
    return model.encode_text(params, self.cfg, ids, compute_dtype)

  def logit_scale(self, params):
    return model.logit_scale(params)

  def block_qkv(self, params, block: int, x, compute_dtype: str = "float32"):
    return model.block_qkv(params, self.cfg, block, x, compute_dtype)

  def block_out(self, params, block: int, heads, compute_dtype: str = "float32"):
    return model.block_out(params, self.cfg, block, heads, compute_dtype)

  def embed_tokens(self, params, tokens, compute_dtype: str = "float32"):
    return model.embed_tokens(params, self.cfg, tokens, compute_dtype)

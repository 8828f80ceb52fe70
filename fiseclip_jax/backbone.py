"""The backbone contract (DESIGN.md §10): what a tower module gives the pipeline.

A backbone converts its checkpoints, declares its param shapes and returns the residual stream
after any block. A text-aligned one (CLIP) also exposes per-block hooks (q/k/v of a block's
input, a block's output projection, the embedding head) that SeCLIP builds its proxy block from,
and a text tower. The registry (`registry.py`) is a table of these values.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax

Array = jax.Array


class Encoded(NamedTuple):
  """One pass of a tower."""
  streams: Dict[int, Array]       # block (1-based; 0 = embeddings) -> (B, 1 + h*w, W), CLS first
  cls_embed: Optional[Array]      # (B, D) image embedding of the unmodified model (text-aligned only)


class Hooks(NamedTuple):
  """Per-block access for SeCLIP's proxy block; `block` is 1-based, x a block's input stream."""
  qkv: Callable       # (params, cfg, block, x, dtype) -> q, k, v, each (B, T, H, Dh)
  out: Callable       # (params, cfg, block, heads (B, T, H, Dh), dtype) -> (B, T, W)
  embed: Callable     # (params, cfg, tokens (B, T, W), dtype) -> (B, T, D) in the text space


class Backbone(NamedTuple):
  name: str                         # stored in converted checkpoints
  config_type: type                 # its frozen architecture dataclass
  mean: Tuple[float, float, float]  # input normalization it was trained with
  std: Tuple[float, float, float]
  depth: Callable[[Any], int]       # cfg -> number of blocks
  patch_size: Callable[[Any], int]
  width: Callable[[Any], int]       # cfg -> width of the residual stream
  init_params: Callable             # (cfg, seed) -> params
  param_shapes: Callable            # cfg -> ShapeDtypeStruct tree
  encode: Callable                  # (params, cfg, images, layers, dtype, attention_impl) -> Encoded
  flops: Callable                   # (cfg, image_size) -> FLOPs per image of one pass
  is_hf_config: Callable            # HF config.json dict -> whether it is this backbone
  from_hf: Callable                 # (hf config, state dict, config file, weights file) -> (params, cfg)
  hooks: Optional[Hooks] = None     # text-aligned towers only
  encode_text: Optional[Callable] = None   # (params, cfg, ids, dtype) -> (N, D)
  logit_scale: Optional[Callable] = None   # params -> scale

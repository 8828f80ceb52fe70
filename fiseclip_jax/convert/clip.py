"""CLIP checkpoint layouts -> the CLIP port's params (Hugging Face, old Flax, OpenAI / open_clip).

Layout rules: torch Linear weights are (out, in) and become (in, out) kernels; OpenAI `proj` and
`text_projection` are already (in, out); conv weights OIHW become HWIO; OpenAI packs q, k, v in
`in_proj_weight` (split in 3). Every key of the source is consumed or the conversion fails.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.models.clip.config import CLIPConfig

StateDict = Dict[str, np.ndarray]


def _take(sd: StateDict, key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise CheckpointError(f"{where}: missing key {key!r}")
  return sd.pop(key)


def _ln(sd, prefix, where, scale="weight"):
  return {"scale": _take(sd, f"{prefix}.{scale}", where), "bias": _take(sd, f"{prefix}.bias", where)}


def _linear(sd, prefix, where):
  return {"kernel": _take(sd, f"{prefix}.weight", where).T, "bias": _take(sd, f"{prefix}.bias", where)}


def _stack(blocks: list) -> dict:
  """List of per-block trees -> one tree of (L, ...) arrays."""
  if isinstance(blocks[0], dict):
    return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
  return np.stack(blocks)


def _hf_block(sd, p, where):
  return {"ln_1": _ln(sd, f"{p}.layer_norm1", where), "q": _linear(sd, f"{p}.self_attn.q_proj", where),
          "k": _linear(sd, f"{p}.self_attn.k_proj", where), "v": _linear(sd, f"{p}.self_attn.v_proj", where),
          "out": _linear(sd, f"{p}.self_attn.out_proj", where), "ln_2": _ln(sd, f"{p}.layer_norm2", where),
          "fc1": _linear(sd, f"{p}.mlp.fc1", where), "fc2": _linear(sd, f"{p}.mlp.fc2", where)}


def _openai_block(sd, p, where):
  w = _take(sd, f"{p}.attn.in_proj_weight", where)            # (3W, W) packed q, k, v
  b = _take(sd, f"{p}.attn.in_proj_bias", where)
  (wq, wk, wv), (bq, bk, bv) = np.split(w, 3, axis=0), np.split(b, 3)
  return {"ln_1": _ln(sd, f"{p}.ln_1", where), "q": {"kernel": wq.T, "bias": bq},
          "k": {"kernel": wk.T, "bias": bk}, "v": {"kernel": wv.T, "bias": bv},
          "out": _linear(sd, f"{p}.attn.out_proj", where), "ln_2": _ln(sd, f"{p}.ln_2", where),
          "fc1": _linear(sd, f"{p}.mlp.c_fc", where), "fc2": _linear(sd, f"{p}.mlp.c_proj", where)}


def _check_consumed(sd: StateDict, where: str) -> None:
  left = sorted(k for k in sd if not k.endswith("position_ids"))
  if left:
    raise CheckpointError(f"{where}: unexpected keys {left[:10]}" + (f" (+{len(left) - 10} more)" if len(left) > 10 else ""))


def config_from_hf(hf: dict, where: str = "config.json") -> CLIPConfig:
  """CLIPConfig from a Hugging Face CLIP config.json (`where` names it in errors)."""
  v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
  for name, c in (("vision_config", v), ("text_config", t)):
    act = c.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
      raise CheckpointError(f"{where}: {name}.hidden_act={act!r}; only CLIP's quick_gelu is supported")
  eps = v.get("layer_norm_eps", 1e-5)
  return CLIPConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                    vision_width=v.get("hidden_size", 768), vision_layers=v.get("num_hidden_layers", 12),
                    vision_heads=v.get("num_attention_heads", 12), vision_mlp=v.get("intermediate_size", 3072),
                    embed_dim=hf.get("projection_dim", 512), text_width=t.get("hidden_size", 512),
                    text_layers=t.get("num_hidden_layers", 12), text_heads=t.get("num_attention_heads", 8),
                    text_mlp=t.get("intermediate_size", 2048),
                    context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                    layer_norm_eps=eps)


def hf_to_params(sd: StateDict, cfg: CLIPConfig, where: str) -> dict:
  """Hugging Face `CLIPModel` state dict -> params."""
  sd = dict(sd)
  vm, tm = "vision_model", "text_model"
  visual = {
      "patch_embed": {"kernel": _take(sd, f"{vm}.embeddings.patch_embedding.weight", where).transpose(2, 3, 1, 0)},
      "class_embedding": _take(sd, f"{vm}.embeddings.class_embedding", where),
      "pos_embed": _take(sd, f"{vm}.embeddings.position_embedding.weight", where),
      "ln_pre": _ln(sd, f"{vm}.pre_layrnorm", where),
      "blocks": _stack([_hf_block(sd, f"{vm}.encoder.layers.{i}", where) for i in range(cfg.vision_layers)]),
      "ln_post": _ln(sd, f"{vm}.post_layernorm", where),
      "proj": _take(sd, "visual_projection.weight", where).T,
  }
  text = {
      "token_embed": _take(sd, f"{tm}.embeddings.token_embedding.weight", where),
      "pos_embed": _take(sd, f"{tm}.embeddings.position_embedding.weight", where),
      "blocks": _stack([_hf_block(sd, f"{tm}.encoder.layers.{i}", where) for i in range(cfg.text_layers)]),
      "ln_final": _ln(sd, f"{tm}.final_layer_norm", where),
      "proj": _take(sd, "text_projection.weight", where).T,
  }
  params = {"visual": visual, "text": text, "logit_scale": _take(sd, "logit_scale", where).reshape(())}
  _check_consumed(sd, where)
  return params


def config_from_openai(sd: StateDict) -> CLIPConfig:
  """Infer the architecture from an OpenAI / open_clip state dict's shapes."""
  conv = sd["visual.conv1.weight"]                                  # (W, 3, p, p)
  width, patch = conv.shape[0], conv.shape[-1]
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  count = lambda prefix: len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})
  text_width = sd["ln_final.weight"].shape[0]
  return CLIPConfig(image_size=grid * patch, patch_size=patch, vision_width=width,
                    vision_layers=count("visual.transformer.resblocks"), vision_heads=width // 64,
                    vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    embed_dim=sd["text_projection"].shape[1], text_width=text_width,
                    text_layers=count("transformer.resblocks"), text_heads=text_width // 64,
                    text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    context_length=sd["positional_embedding"].shape[0],
                    vocab_size=sd["token_embedding.weight"].shape[0])


def openai_to_params(sd: StateDict, cfg: CLIPConfig, where: str) -> dict:
  """OpenAI / open_clip state dict -> params."""
  sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
  visual = {
      "patch_embed": {"kernel": _take(sd, "visual.conv1.weight", where).transpose(2, 3, 1, 0)},
      "class_embedding": _take(sd, "visual.class_embedding", where),
      "pos_embed": _take(sd, "visual.positional_embedding", where),
      "ln_pre": _ln(sd, "visual.ln_pre", where),
      "blocks": _stack([_openai_block(sd, f"visual.transformer.resblocks.{i}", where)
                        for i in range(cfg.vision_layers)]),
      "ln_post": _ln(sd, "visual.ln_post", where),
      "proj": _take(sd, "visual.proj", where),
  }
  text = {
      "token_embed": _take(sd, "token_embedding.weight", where),
      "pos_embed": _take(sd, "positional_embedding", where),
      "blocks": _stack([_openai_block(sd, f"transformer.resblocks.{i}", where) for i in range(cfg.text_layers)]),
      "ln_final": _ln(sd, "ln_final", where),
      "proj": _take(sd, "text_projection", where),
  }
  params = {"visual": visual, "text": text, "logit_scale": _take(sd, "logit_scale", where).reshape(())}
  sd.pop("attn_mask", None)
  _check_consumed({k: v for k, v in sd.items() if not k.endswith("attn_mask")}, where)
  return params


def from_hf(hf_config: dict, sd: StateDict, config_file: str, weights_file: str):
  """(params, cfg) of a Hugging Face CLIPModel from its config.json and state dict (errors name
  the file at fault)."""
  cfg = config_from_hf(hf_config, config_file)
  return hf_to_params(sd, cfg, weights_file), cfg


def is_hf_config(hf_config: dict) -> bool:
  """A CLIPModel config.json (both towers)."""
  return "vision_config" in hf_config and "text_config" in hf_config

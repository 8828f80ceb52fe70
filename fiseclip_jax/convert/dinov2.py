"""Hugging Face `Dinov2Model` (config.json + state dict) -> Dinov2Config and params.

Key names: both the checkpoint layout (Hub files and what transformers 5 `save_pretrained` writes:
`attention.attention.query`, `attention.output.dense`, SwiGLU `mlp.weights_in` / `weights_out`) and
transformers 5's in-memory module names (`attention.q_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`) are read. Layout: torch Linear (out, in) -> kernel (in, out); conv OIHW -> HWIO; the
packed SwiGLU `weights_in` (2M, W) is [gate; up] along its first axis (transformers' Chunk(dim=0));
everything float32. `embeddings.mask_token` (masked-image pre-training only) is dropped.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.models.dinov2 import model
from fiseclip_jax.models.dinov2.config import Dinov2Config, mlp_width

StateDict = Dict[str, np.ndarray]
DROPPED = ("embeddings.mask_token",)
# transformers' Dinov2Config defaults, for keys a config.json leaves out.
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   num_channels=3, qkv_bias=True, use_swiglu_ffn=False)


def is_dinov2_config(hf_config: dict) -> bool:
  """True for a transformers DINOv2 config.json (model_type "dinov2"; registers are another)."""
  return isinstance(hf_config, dict) and hf_config.get("model_type") == "dinov2"


def _square(value, key: str, where: str) -> int:
  """An int, or a square [n, n] pair, as transformers allows for image_size / patch_size."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointError(f"{where}: {key}={value!r}; only square sizes are supported")
    value = value[0]
  return int(value)


def config_from_hf(hf_config: dict, where: str = "config.json") -> Dinov2Config:
  """Dinov2Config from a transformers Dinov2Model config.json (`where` names it in errors)."""
  if not is_dinov2_config(hf_config):
    got = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config).__name__
    raise CheckpointError(f"{where}: model_type={got!r}; expected 'dinov2' (DINOv2 without "
                          "registers)")
  c = {**HF_DEFAULTS, **hf_config}
  if int(c.get("num_register_tokens") or 0) > 0:
    raise CheckpointError(f"{where}: num_register_tokens={c['num_register_tokens']}; register "
                          "tokens are not supported")
  if int(c["num_channels"]) != 3:
    raise CheckpointError(f"{where}: num_channels={c['num_channels']}; only RGB (3) is supported")
  if not c["qkv_bias"]:
    raise CheckpointError(f"{where}: qkv_bias={c['qkv_bias']!r}; only q/k/v with bias is supported")
  swiglu = bool(c["use_swiglu_ffn"])
  if not swiglu and c["hidden_act"] != "gelu":   # SwiGLU ignores hidden_act (always silu)
    raise CheckpointError(f"{where}: hidden_act={c['hidden_act']!r}; only 'gelu' is supported")
  width, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  if width % heads:
    raise CheckpointError(f"{where}: hidden_size={width} is not a multiple of "
                          f"num_attention_heads={heads}")
  if c.get("head_dim") not in (None, width // heads):
    raise CheckpointError(f"{where}: head_dim={c['head_dim']}; only hidden_size // heads is "
                          "supported")
  try:
    return Dinov2Config(image_size=_square(c["image_size"], "image_size", where),
                        patch_size=_square(c["patch_size"], "patch_size", where), width=width,
                        layers=int(c["num_hidden_layers"]), heads=heads,
                        mlp=mlp_width(width, c["mlp_ratio"], swiglu), use_swiglu_ffn=swiglu,
                        layer_norm_eps=float(c["layer_norm_eps"]), hidden_act="gelu")
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: unsupported DINOv2 config: {e}") from e


def _take(sd: StateDict, key: str, where: str, alt: Optional[str] = None) -> np.ndarray:
  """Pop `key` (or its alternative name); a missing one is named in the error."""
  for k in (key, alt):
    if k is not None and k in sd:
      a = np.asarray(sd.pop(k))
      return a.astype(np.float32) if a.dtype.kind == "f" else a
  also = f" (or {alt!r})" if alt else ""
  raise CheckpointError(f"{where}: missing key {key!r}{also}")


def _ln(sd, prefix, where):
  return {"scale": _take(sd, f"{prefix}.weight", where), "bias": _take(sd, f"{prefix}.bias", where)}


def _linear(sd, prefix, where, alt=None):
  alt_w, alt_b = (f"{alt}.weight", f"{alt}.bias") if alt else (None, None)
  return {"kernel": _take(sd, f"{prefix}.weight", where, alt_w).T,
          "bias": _take(sd, f"{prefix}.bias", where, alt_b)}


def _block(sd: StateDict, p: str, cfg: Dinov2Config, where: str) -> dict:
  a = f"{p}.attention"
  out = {"ln_1": _ln(sd, f"{p}.norm1", where),
         "q": _linear(sd, f"{a}.attention.query", where, f"{a}.q_proj"),
         "k": _linear(sd, f"{a}.attention.key", where, f"{a}.k_proj"),
         "v": _linear(sd, f"{a}.attention.value", where, f"{a}.v_proj"),
         "out": _linear(sd, f"{a}.output.dense", where, f"{a}.o_proj"),
         "ls_1": _take(sd, f"{p}.layer_scale1.lambda1", where),
         "ln_2": _ln(sd, f"{p}.norm2", where),
         "ls_2": _take(sd, f"{p}.layer_scale2.lambda1", where)}
  m = f"{p}.mlp"
  if not cfg.use_swiglu_ffn:
    out.update(fc1=_linear(sd, f"{m}.fc1", where), fc2=_linear(sd, f"{m}.fc2", where))
    return out
  if f"{m}.weights_in.weight" in sd:                  # checkpoint layout: [gate; up] packed
    w = _take(sd, f"{m}.weights_in.weight", where)    # (2M, W)
    b = _take(sd, f"{m}.weights_in.bias", where)
    if w.shape[0] % 2 or b.shape[0] != w.shape[0]:
      raise CheckpointError(f"{where}: {m}.weights_in has shape {w.shape}, bias {b.shape}; "
                            "expected (2M, W) and (2M,)")
    (wg, wu), (bg, bu) = np.split(w, 2, axis=0), np.split(b, 2)
    out.update(gate={"kernel": wg.T, "bias": bg}, up={"kernel": wu.T, "bias": bu})
  else:
    out.update(gate=_linear(sd, f"{m}.gate_proj", where), up=_linear(sd, f"{m}.up_proj", where))
  out["down"] = _linear(sd, f"{m}.weights_out", where, f"{m}.down_proj")
  return out


def _stack(blocks: list) -> dict:
  """List of per-block trees -> one tree of (L, ...) arrays."""
  if isinstance(blocks[0], dict):
    return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
  return np.stack(blocks)


def _flat_shapes(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat_shapes(v, f"{prefix}/{k}" if prefix else k))
    return out
  return {prefix: tuple(tree.shape)}


def hf_to_params(sd: StateDict, cfg: Dinov2Config, where: str) -> dict:
  """transformers `Dinov2Model` state dict (numpy arrays) -> params (numpy float32).

  Every key must be used: a missing one, a leftover one (other than the dropped mask token) or one
  whose shape disagrees with `cfg` raises CheckpointError naming it.
  """
  sd = dict(sd)
  if "embeddings.cls_token" not in sd and "dinov2.embeddings.cls_token" in sd:
    raise CheckpointError(f"{where}: keys start with 'dinov2.' (a Dinov2For... head model); "
                          "pass the Dinov2Model weights (keys without the prefix)")
  e = "embeddings"
  conv = _take(sd, f"{e}.patch_embeddings.projection.weight", where)         # (W, 3, p, p) OIHW
  params = {
      "patch_embed": {
          "kernel": conv.transpose(2, 3, 1, 0),                                   # HWIO
          "bias": _take(sd, f"{e}.patch_embeddings.projection.bias", where)},
      "cls_token": _take(sd, f"{e}.cls_token", where).reshape(-1),
      "pos_embed": _take(sd, f"{e}.position_embeddings", where),
      "blocks": _stack([_block(sd, f"encoder.layer.{i}", cfg, where) for i in range(cfg.layers)]),
      "ln_final": _ln(sd, "layernorm", where),
  }
  pos = params["pos_embed"]
  params["pos_embed"] = pos.reshape(-1, pos.shape[-1])             # (1, 1 + g*g, W) -> (1 + g*g, W)
  for k in DROPPED:
    sd.pop(k, None)
  if sd:
    left = sorted(sd)
    raise CheckpointError(f"{where}: unexpected keys {left[:10]}"
                          + (f" (+{len(left) - 10} more)" if len(left) > 10 else ""))
  want, got = _flat_shapes(model.param_shapes(cfg)), _flat_shapes(params)
  bad = sorted(f"{k}: {got[k]}, expected {want[k]}" for k in want if got.get(k) != want[k])
  if bad:
    raise CheckpointError(f"{where}: does not match the DINOv2 architecture {cfg}: mis-shaped "
                          f"{bad[:10]}")
  return _contiguous(params)


def _contiguous(tree):
  """Transposed views -> C-contiguous copies (what serializers such as safetensors expect)."""
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)


def from_hf(hf_config: dict, sd: StateDict, config_file: str, weights_file: str):
  """(params, cfg) of a transformers Dinov2Model from its config.json and state dict (errors name
  the file at fault)."""
  cfg = config_from_hf(hf_config, config_file)
  return hf_to_params(sd, cfg, weights_file), cfg

"""Convert a CLIP checkpoint to this project's safetensors format.

  python -m weights.convert --src SRC --out weights/clip-vit-l14-336.safetensors

SRC is one of
  * a Hugging Face CLIP folder (`config.json` with `model.safetensors`, `pytorch_model.bin` or the old
    `flax_model.msgpack`), e.g. a download of `openai/clip-vit-large-patch14-336`;
  * an OpenAI checkpoint `.pt` (TorchScript archive such as `ViT-L-14-336px.pt`, or a plain state
    dict), q/k/v packed in `in_proj_weight`, fp16;
  * an open_clip state dict (`.pt`/`.bin`/`.safetensors`, OpenAI key names, maybe under
    "state_dict" and "module.").
Layout rules: torch Linear weights are (out, in) and become (in, out) kernels; OpenAI `proj` and
`text_projection` are already (in, out); conv weights OIHW become HWIO; everything is upcast to
float32. The output records the CLIPConfig and the source's sha256.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
from absl import app, flags, logging

from fiseclip_jax.checkpoint import (CheckpointError, check_params, flatten, save_checkpoint,
                                     sha256_file)
from fiseclip_jax.config import CLIPConfig

StateDict = Dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# Reading sources.


def _to_numpy(sd) -> StateDict:
  """Arrays, floating point ones (fp16/bf16 included) upcast to float32."""
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):                                      # torch tensor
      v = v.detach().cpu()
      v = v.float().numpy() if v.is_floating_point() else v.numpy()
    a = np.asarray(v)
    out[k] = a.astype(np.float32) if a.dtype.name.startswith(("float", "bfloat")) else a
  return out


def _read_torch(path: str) -> StateDict:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: reading .pt/.bin files needs PyTorch (pip install 'fiseclip-jax[torch]')") from e
  try:
    with warnings.catch_warnings():                               # torch.jit is deprecated, still reads
      warnings.simplefilter("ignore", DeprecationWarning)
      module = torch.jit.load(path, map_location="cpu")           # OpenAI's TorchScript archives
    sd = module.state_dict()
  except Exception:  # noqa: BLE001 - not TorchScript: a pickled state dict.
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): {e}") from e
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
  return _to_numpy(sd)


def _read_safetensors(path: str) -> StateDict:
  import ml_dtypes  # noqa: F401 - registers numpy's bfloat16, so bf16 files load.
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return _to_numpy(load_file(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {e}") from e


def _read_msgpack(path: str) -> StateDict:
  from flax import serialization
  try:
    with open(path, "rb") as f:
      tree = serialization.msgpack_restore(f.read())
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{path}: not a readable Flax msgpack file (truncated?): {e}") from e
  if not isinstance(tree, dict):
    raise CheckpointError(f"{path}: expected a params tree, found {type(tree).__name__}")
  if set(tree) == {"params"} and isinstance(tree["params"], dict):   # {"params": ...} variables
    tree = tree["params"]
  return {k: np.asarray(v, np.float32) for k, v in flatten(tree).items()}


def read_source(src: str) -> Tuple[StateDict, str, dict, str]:
  """(state dict, layout in {"hf", "hf_flax", "openai"}, HF config or {}, weights file)."""
  if os.path.isdir(src):
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"{src}: a Hugging Face CLIP folder needs config.json")
    try:
      with open(cfg_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{cfg_path}: not a readable JSON config: {e}") from e
    if not isinstance(hf_config, dict):
      raise CheckpointError(f"{cfg_path}: expected a JSON object, found {type(hf_config).__name__}")
    if "vision_config" not in hf_config or "text_config" not in hf_config:
      raise CheckpointError(f"{cfg_path}: not a CLIPModel config (model_type={hf_config.get('model_type')!r}, "
                            "no vision_config/text_config)")
    for name, reader, layout in (("model.safetensors", _read_safetensors, "hf"),
                                 ("pytorch_model.bin", _read_torch, "hf"),
                                 ("flax_model.msgpack", _read_msgpack, "hf_flax")):
      path = os.path.join(src, name)
      if os.path.isfile(path):
        return reader(path), layout, hf_config, path
    raise CheckpointError(f"{src}: no model.safetensors, pytorch_model.bin or flax_model.msgpack")
  if not os.path.isfile(src):
    raise CheckpointError(f"{src}: no such file or folder")
  sd = _read_safetensors(src) if src.endswith(".safetensors") else _read_torch(src)
  sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
  if "visual.conv1.weight" in sd:
    return sd, "openai", {}, src
  if any(k.startswith("vision_model.") for k in sd):
    raise CheckpointError(f"{src}: looks like Hugging Face CLIP weights: pass the folder with config.json")
  raise CheckpointError(f"{src}: not a CLIP checkpoint (no visual.conv1.weight nor vision_model.* keys)")


# ------------------------------------------------------------------------------------------------
# Layout mappings.


def _take(sd: StateDict, key: str, where: str) -> np.ndarray:
  if key not in sd:
    raise CheckpointError(f"{where}: missing key {key!r}")
  return sd.pop(key)


def _ln(sd, prefix, where, scale="weight"):
  return {"scale": _take(sd, f"{prefix}.{scale}", where), "bias": _take(sd, f"{prefix}.bias", where)}


def _linear(sd, prefix, where):
  return {"kernel": _take(sd, f"{prefix}.weight", where).T, "bias": _take(sd, f"{prefix}.bias", where)}


def _stack(blocks):
  import jax
  return jax.tree.map(lambda *xs: np.stack(xs), *blocks)


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


def hf_flax_to_params(sd: StateDict, cfg: CLIPConfig, where: str) -> dict:
  """Old `FlaxCLIPModel` msgpack ('/'-joined keys, kernels already (in, out), conv HWIO)."""
  renamed = {}
  for k, v in sd.items():
    base, _, leaf = k.replace("/", ".").rpartition(".")
    if leaf == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T        # back to torch layout
    if leaf in ("kernel", "scale", "embedding"):
      leaf = "weight"
    renamed[f"{base}.{leaf}" if base else leaf] = v
  return hf_to_params(renamed, cfg, where)


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


def convert(src: str, vision_heads: Optional[int] = None,
            text_heads: Optional[int] = None) -> Tuple[dict, CLIPConfig, str]:
  """(params, cfg, weights file) from any supported source.

  OpenAI / open_clip files do not store head counts: they are taken as width // 64 (right for
  every OpenAI model); pass vision_heads / text_heads for others (open_clip ViT-H/14: 16).
  """
  sd, layout, hf_config, path = read_source(src)
  try:
    if layout == "openai":
      cfg = config_from_openai(sd)
      heads = {k: v for k, v in (("vision_heads", vision_heads), ("text_heads", text_heads)) if v}
      cfg = dataclasses.replace(cfg, **heads)
      logging.info("%s: heads not stored in OpenAI layout; using vision %d, text %d",
                   path, cfg.vision_heads, cfg.text_heads)
      params = openai_to_params(sd, cfg, path)
    else:
      cfg = config_from_hf(hf_config, os.path.join(src, "config.json"))
      fn = hf_to_params if layout == "hf" else hf_flax_to_params
      params = fn(sd, cfg, path)
  except KeyError as e:
    raise CheckpointError(f"{path}: missing key {e} needed to read the architecture") from e
  check_params(flatten(params), cfg, path)          # e.g. config.json disagrees with the tensors
  return params, cfg, path


def main(argv):
  del argv
  try:
    params, cfg, path = convert(FLAGS.src, FLAGS.vision_heads, FLAGS.text_heads)
  except CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
  digest = sha256_file(path)
  save_checkpoint(FLAGS.out, params, cfg, source_sha256=digest, source=path)
  logging.info("wrote %s (%s, source sha256 %s)", FLAGS.out, cfg, digest)
  print(f"wrote {FLAGS.out}: {cfg}\nsource {path} sha256 {digest}")


FLAGS = flags.FLAGS
if __name__ == "__main__":
  flags.DEFINE_string("src", None, "HF CLIP folder, OpenAI .pt, or open_clip state dict", required=True)
  flags.DEFINE_string("out", None, "output .safetensors file", required=True)
  flags.DEFINE_integer("vision_heads", None, "OpenAI/open_clip layout only: vision heads (default width // 64)")
  flags.DEFINE_integer("text_heads", None, "OpenAI/open_clip layout only: text heads (default width // 64)")
  app.run(main)

"""Read a checkpoint from any supported source as a tower's params (`fiseclip-convert`, DESIGN.md §2, §10).

SRC is one of
  * a Hugging Face folder (`config.json` with `model.safetensors`, `pytorch_model.bin` or the old
    `flax_model.msgpack`) of any registered backbone: a CLIPModel (e.g. a download of
    `openai/clip-vit-large-patch14-336`) or a Dinov2Model (`facebook/dinov2-large`);
  * an OpenAI checkpoint `.pt` (TorchScript archive such as `ViT-L-14-336px.pt`, or a plain state
    dict), q/k/v packed in `in_proj_weight`, fp16;
  * an open_clip state dict (`.pt`/`.bin`/`.safetensors`, OpenAI key names, maybe under
    "state_dict" and "module.").
Nothing in a file is executed: `.bin` / `.pt` state dicts are read with `torch.load(weights_only=
True)` or without torch at all (`torch_files`), TorchScript archives by their tensors alone.
Everything is upcast to float32; the output records the config and the source's sha256.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np
from absl import logging

from fiseclip_jax.convert import clip, converters, torch_files
from fiseclip_jax.convert.checkpoint import check_params
from fiseclip_jax.convert.header import flatten
from fiseclip_jax.core.errors import CheckpointError

StateDict = Dict[str, np.ndarray]


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


def _read_torch(path: str, trust_torchscript: bool = False) -> StateDict:
  """A .pt / .bin file's tensors; nothing in it runs unless trust_torchscript (see torch_files)."""
  return torch_files.read_state_dict(path, trust_torchscript=trust_torchscript)


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
  return flax_to_torch_names({k: np.asarray(v, np.float32) for k, v in flatten(tree).items()})


def flax_to_torch_names(sd: StateDict) -> StateDict:
  """An old transformers Flax model's params ('/'-joined; kernels (in, out), conv HWIO) under the
  PyTorch model's names and layouts, so one mapping per backbone serves both."""
  renamed = {}
  for k, v in sd.items():
    base, _, leaf = k.replace("/", ".").rpartition(".")
    if leaf == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T        # back to torch layout
    if leaf in ("kernel", "scale", "embedding"):
      leaf = "weight"
    renamed[f"{base}.{leaf}" if base else leaf] = v
  return renamed


def read_source(src: str, *, trust_torchscript: bool = False) -> Tuple[StateDict, str, dict, str]:
  """(state dict, layout "hf" (torch names, any backbone's folder) or "openai", HF config or {},
  weights file).

  trust_torchscript: load TorchScript archives with torch.jit.load, which runs code stored in the
  file (only for archives from a trusted source); by default their tensors are read without it.
  """
  if os.path.isdir(src):
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"{src}: a Hugging Face model folder needs config.json")
    try:
      with open(cfg_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{cfg_path}: not a readable JSON config: {e}") from e
    if not isinstance(hf_config, dict):
      raise CheckpointError(f"{cfg_path}: expected a JSON object, found {type(hf_config).__name__}")
    converters.for_hf_config(hf_config, cfg_path)        # a model this library converts
    read_torch = lambda p: _read_torch(p, trust_torchscript)  # noqa: E731
    for name, reader, layout in (("model.safetensors", _read_safetensors, "hf"),
                                 ("pytorch_model.bin", read_torch, "hf"),
                                 ("flax_model.msgpack", _read_msgpack, "hf")):
      path = os.path.join(src, name)
      if os.path.isfile(path):
        return reader(path), layout, hf_config, path
    raise CheckpointError(f"{src}: no model.safetensors, pytorch_model.bin or flax_model.msgpack")
  if not os.path.isfile(src):
    raise CheckpointError(f"{src}: no such file or folder")
  sd = _read_safetensors(src) if src.endswith(".safetensors") else _read_torch(src, trust_torchscript)
  sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
  if "visual.conv1.weight" in sd:
    return sd, "openai", {}, src
  if any(k.startswith("vision_model.") for k in sd):
    raise CheckpointError(f"{src}: looks like Hugging Face CLIP weights: pass the folder with config.json")
  raise CheckpointError(f"{src}: not a CLIP checkpoint (no visual.conv1.weight nor vision_model.* keys)")


def convert(src: str, vision_heads: Optional[int] = None, text_heads: Optional[int] = None, *,
            trust_torchscript: bool = False) -> Tuple[dict, object, str]:
  """(params, cfg, weights file) from any supported source (cfg: the tower's config).

  OpenAI / open_clip files do not store head counts: they are taken as width // 64 (right for
  every OpenAI model); pass vision_heads / text_heads for others (open_clip ViT-H/14: 16).
  trust_torchscript: see read_source (default: nothing in the file is run).
  """
  sd, layout, hf_config, path = read_source(src, trust_torchscript=trust_torchscript)
  try:
    if layout == "openai":
      cfg = clip.config_from_openai(sd)
      heads = {k: v for k, v in (("vision_heads", vision_heads), ("text_heads", text_heads)) if v}
      cfg = dataclasses.replace(cfg, **heads)
      logging.info("%s: heads not stored in OpenAI layout; using vision %d, text %d",
                   path, cfg.vision_heads, cfg.text_heads)
      params = clip.openai_to_params(sd, cfg, path)
    else:
      where = os.path.join(src, "config.json")
      params, cfg = converters.for_hf_config(hf_config, where).from_hf(hf_config, sd, where, path)
  except KeyError as e:
    raise CheckpointError(f"{path}: missing key {e} needed to read the architecture") from e
  check_params(flatten(params), cfg, path)          # e.g. config.json disagrees with the tensors
  return params, cfg, path



"""FiSeCLIP-JAX: zero-shot industrial anomaly detection (FiSeCLIP, ICCV 2025 workshops) in JAX.

Names are imported on first use, so `fiseclip_jax.config` or the data readers load without JAX and
a program can check its flags and files before paying for the model.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "encode_text": "clip", "init_params": "clip", "logit_scale": "clip", "tokenize": "clip",
    "CLIPConfig": "config", "FiSeConfig": "config", "ConfigError": "config",
    "lnamd": "ficlip", "mutual_scores": "ficlip",
    "DetectResult": "pipeline", "SeCLIPOnlyWarning": "pipeline", "build_bank": "pipeline",
    "detect": "pipeline", "empty_stream": "pipeline", "score_stream": "pipeline",
    "encode_image": "pipeline", "ImageFeatures": "pipeline", "Spec": "pipeline",
    "make_spec": "pipeline",
    "Roles": "references", "make_roles": "references",
    "text_features": "prompts",
}
__all__ = sorted(_EXPORTS) + ["metrics"]


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"fiseclip_jax.{_EXPORTS[name]}"), name)
  else:
    try:
      value = importlib.import_module(f"fiseclip_jax.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"fiseclip_jax.{name}":
        raise
      raise AttributeError(f"module 'fiseclip_jax' has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))

"""FiSeCLIP-JAX: zero-shot industrial anomaly detection (FiSeCLIP, ICCV 2025 workshops) in JAX.

The package's face for users: `import fiseclip_jax as fj`. Names are imported on first use, so
`fiseclip_jax.core` or the data readers load without JAX and a program can check its flags and
files before paying for the model. Code inside the package imports the modules themselves, never
this face. The layout and which way imports go: docs/DESIGN.md "Layout".
"""
import importlib

from fiseclip_jax.core.version import __version__  # noqa: F401  (the face says its version)

_EXPORTS = {
    # Settings and errors.
    "FiSeConfig": "core.config", "ConfigError": "core.config", "CheckpointError": "core.errors",
    # Towers.
    "Tower": "models.tower", "TextAlignedTower": "models.tower", "Encoded": "models.tower",
    "register_tower": "models.registry", "tower_for": "models.registry",
    "init_params": "models.registry",
    "CLIPConfig": "models.clip.config", "Dinov2Config": "models.dinov2.config",
    "encode_text": "models.clip.model", "logit_scale": "models.clip.model",
    "tokenize": "models.clip.tokenizer",
    # The method.
    "Spec": "method.spec", "make_spec": "method.api", "Model": "method.api",
    "DetectResult": "method.pipeline", "ImageFeatures": "method.api",
    "SeCLIPOnlyWarning": "method.api", "detect": "method.api", "build_bank": "method.api",
    "empty_stream": "method.api", "score_stream": "method.api", "encode_image": "method.api",
    "Roles": "method.references", "make_roles": "method.references",
    "lnamd": "method.ficlip", "mutual_scores": "method.ficlip",
    "text_features": "method.prompts",
    # Deploying: a bundle file in memory.
    "Predictor": "deploy.predictor", "Prediction": "deploy.predictor",
    # Checkpoints.
    "load_checkpoint": "convert.checkpoint", "save_checkpoint": "convert.checkpoint",
}
__all__ = sorted(_EXPORTS)


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

"""FiSeCLIP-JAX: zero-shot industrial anomaly detection (FiSeCLIP, ICCV 2025 workshops) in JAX."""
from fiseclip_jax.config import CLIPConfig, FiSeConfig
from fiseclip_jax.clip import encode_image, encode_text, init_params, logit_scale, tokenize
from fiseclip_jax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

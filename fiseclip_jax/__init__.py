"""FiSeCLIP-JAX: zero-shot industrial anomaly detection (FiSeCLIP, ICCV 2025 workshops) in JAX."""
from fiseclip_jax import metrics
from fiseclip_jax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fiseclip_jax.clip import encode_image, encode_text, init_params, logit_scale, tokenize
from fiseclip_jax.config import CLIPConfig, FiSeConfig
from fiseclip_jax.ficlip import lnamd, mutual_scores
from fiseclip_jax.pipeline import (DetectResult, SeCLIPOnlyWarning, build_bank, detect, empty_stream,
                                   score_stream)
from fiseclip_jax.references import Roles, make_roles
from fiseclip_jax.prompts import text_features

__version__ = "0.1.0"

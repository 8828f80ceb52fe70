"""Flax DINOv2 ViT (transformers' Dinov2Model, no registers) and conversion from transformers."""
from fiseclip_jax.dinov2.config import IMAGENET_MEAN, IMAGENET_STD, Dinov2Config, mlp_width
from fiseclip_jax.dinov2.convert import config_from_hf, hf_to_params, is_dinov2_config
from fiseclip_jax.dinov2.model import (Block, encode, final_layer_norm, init_params, num_params,
                                       param_shapes)

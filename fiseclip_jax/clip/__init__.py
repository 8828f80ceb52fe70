"""Flax CLIP: vision and text towers, tokenizer, position-embedding resampling."""
from fiseclip_jax.clip.model import (Block, ImageFeatures, encode_image, encode_text, init_params,
                                     logit_scale, num_params, param_shapes)
from fiseclip_jax.clip.pos_embed import bicubic_matrix, resample_pos_embed
from fiseclip_jax.clip.tokenizer import tokenize

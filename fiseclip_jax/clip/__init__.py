"""Flax CLIP: vision and text towers, tokenizer, position-embedding resampling, the backbone entry."""
from fiseclip_jax.backbone import Backbone, Hooks
from fiseclip_jax.clip import convert as _convert
from fiseclip_jax.clip.model import (Block, block_out, block_qkv, embed_tokens, encode, encode_text,
                                     init_params, logit_scale, num_params, param_shapes, tower_flops)
from fiseclip_jax.clip.pos_embed import bicubic_matrix, resample_pos_embed
from fiseclip_jax.clip.tokenizer import tokenize
from fiseclip_jax.config import CLIPConfig
from fiseclip_jax.data.preprocess import OPENAI_MEAN, OPENAI_STD

BACKBONE = Backbone(
    name="clip", config_type=CLIPConfig, mean=OPENAI_MEAN, std=OPENAI_STD,
    depth=lambda cfg: cfg.vision_layers, patch_size=lambda cfg: cfg.patch_size,
    width=lambda cfg: cfg.vision_width,
    init_params=init_params, param_shapes=param_shapes, encode=encode, flops=tower_flops,
    is_hf_config=_convert.is_hf_config, from_hf=_convert.from_hf,
    hooks=Hooks(qkv=block_qkv, out=block_out, embed=embed_tokens),
    encode_text=encode_text, logit_scale=logit_scale)

"""Flax DINOv2 ViT (transformers' Dinov2Model, no registers), its conversion, the backbone entry."""
from fiseclip_jax.backbone import Backbone
from fiseclip_jax.dinov2.config import IMAGENET_MEAN, IMAGENET_STD, Dinov2Config, mlp_width
from fiseclip_jax.dinov2.convert import config_from_hf, hf_to_params, is_dinov2_config
from fiseclip_jax.dinov2.model import (Block, encode, encode_streams, final_layer_norm, init_params,
                                       num_params, param_shapes, tower_flops)


def _from_hf(hf_config: dict, sd, config_file: str, weights_file: str):
  cfg = config_from_hf(hf_config, config_file)
  return hf_to_params(sd, cfg, weights_file), cfg


BACKBONE = Backbone(
    name="dinov2", config_type=Dinov2Config, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    depth=lambda cfg: cfg.layers, patch_size=lambda cfg: cfg.patch_size,
    width=lambda cfg: cfg.width,
    init_params=init_params, param_shapes=param_shapes, encode=encode_streams, flops=tower_flops,
    is_hf_config=is_dinov2_config, from_hf=_from_hf)

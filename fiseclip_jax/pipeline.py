"""detect(): one jitted call from a batch of images to image scores and anomaly maps.

A batch is always B slots (images plus a `valid` flag): padded slots are never references and their
outputs are meaningless. Whether an image has a reference is data, so the SeCLIP-only fallback is
a `jnp.where` inside the jit. One compile per (B, S, CLIPConfig, FiSeConfig); text features are an
argument, so a new category does not recompile.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax import ficlip, seclip
from fiseclip_jax.clip.model import _encode_image, logit_scale
from fiseclip_jax.config import CLIPConfig, FiSeConfig
from fiseclip_jax.maps import pixel_maps

Array = jax.Array


class SeCLIPOnlyWarning(UserWarning):
  """An image had no reference in its batch: its result is SeCLIP alone."""


class DetectResult(NamedTuple):
  image_scores: Array    # (B,) image anomaly score
  anomaly_maps: Array    # (B, S, S) pixel anomaly map
  cls_score: Array       # (B,) SeCLIP image probability of "abnormal" (Eq. 6)
  seg_prob: Array        # (B, N, 2) SeCLIP patch probabilities [P_n, P_a] (Eq. 7)
  mask0: Array           # (B, N) initial anomalous-patch mask (Eq. 9)
  step_scores: Array     # (n_steps, B, N) FiCLIP score of each filtering step (0 without reference)
  masks: Array           # (n_steps, B, N) exclusion mask each step used
  final_mask: Array      # (B, N) exclusion mask after the last vote
  n_ref: Array           # (B,) references of each image in the first step (0: SeCLIP alone)
  patch_map: Array       # (B, h, w) fused patch-level map


def resolve_attention(conf: FiSeConfig) -> str:
  """cuDNN fused attention on GPU in bfloat16, XLA's attention elsewhere (CPU, TPU, float32)."""
  if conf.attention_impl is not None:
    return conf.attention_impl
  if jax.default_backend() == "gpu" and conf.compute_dtype == "bfloat16":
    return "cudnn"
  return "xla"


def fuse(conf: FiSeConfig, seg_prob: Array, step_scores: Array, n_ref: Array) -> Array:
  """Patch map (B, N): w * P_a + (1 - w) * mean of the step scores; SeCLIP alone without reference."""
  p_a = seg_prob[..., 1]
  w = conf.fusion_weight
  fused = w * p_a + (1.0 - w) * step_scores.mean(axis=0)
  return jnp.where((n_ref > 0)[:, None], fused, p_a)


def _detect(params, cfg: CLIPConfig, conf: FiSeConfig, images, valid, text, attention_impl):
  b, s_h, s_w, _ = images.shape
  grid = (s_h // cfg.patch_size, s_w // cfg.patch_size)
  feats = _encode_image(params, cfg, images, conf.feature_layers, conf.proxy_layer, conf.proxy_heads,
                        conf.proxy_attention, conf.compute_dtype, attention_impl)
  scale = logit_scale(params)
  # SeCLIP-AD.
  cls_score = seclip.cls_score(feats.cls_embed, text, scale)                       # (B,)
  seg_prob = seclip.text_probs(feats.proxy_patch_embed, text, scale)               # (B, N, 2)
  mask0 = seclip.initial_mask(seg_prob, conf.lam)                                  # (B, N)
  # FiCLIP-AD with mutual filtering.
  tokens = feats.layer_tokens
  if conf.compute_dtype == "bfloat16":
    tokens = tokens.astype(jnp.float32)
  steps = ficlip.feature_steps(tokens, grid, conf.r_list, conf.filter_loop)      # (S, G, B, N, C)
  steps = steps.astype(jnp.dtype(conf.compute_dtype))
  filt = ficlip.mutual_filtering(steps, mask0, valid, mu=conf.mu, rule=conf.vote,
                                 topk_frac=conf.topk_frac, agg=conf.ref_agg, pair_chunk=conf.pair_chunk)
  n_ref = filt.n_ref[0]
  patch_map = fuse(conf, seg_prob, filt.step_scores, n_ref).reshape(b, *grid)
  maps = pixel_maps(patch_map, (s_h, s_w), conf.sigma)                            # (B, S, S)
  peak = maps.reshape(b, -1).max(axis=1)
  score = {"mean": (cls_score + peak) / 2, "max": peak, "cls": cls_score}[conf.image_score]
  return DetectResult(score, maps, cls_score, seg_prob, mask0, filt.step_scores, filt.masks,
                      filt.final_mask, n_ref, patch_map)


_detect_jit = jax.jit(_detect, static_argnums=(1, 2, 6))


def detect(params: dict, cfg: CLIPConfig, conf: FiSeConfig, images, valid, text) -> DetectResult:
  """Score a batch: images (B, S, S, 3) normalized NHWC, valid (B,) bool, text (2, D).

  Warns (SeCLIPOnlyWarning) when fewer than two slots are valid: feature matching needs a
  reference, so those images get SeCLIP's result alone.
  """
  valid_np = None
  if not isinstance(valid, jax.core.Tracer):
    valid_np = np.asarray(valid, bool)
    if valid_np.shape != (np.shape(images)[0],):
      raise ValueError(f"valid has shape {valid_np.shape}; expected ({np.shape(images)[0]},)")
    if valid_np.sum() < 2:
      warnings.warn(f"{int(valid_np.sum())} valid image(s) in the batch: no reference for feature "
                    "matching, scoring with SeCLIP alone", SeCLIPOnlyWarning, stacklevel=2)
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f"images have shape {np.shape(images)}; expected (B, S, S, 3) NHWC")
  return _detect_jit(params, cfg, conf, jnp.asarray(images, jnp.float32), jnp.asarray(valid, bool),
                     jnp.asarray(text, jnp.float32), resolve_attention(conf))

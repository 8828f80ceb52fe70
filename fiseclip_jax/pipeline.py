"""detect(): one jitted call from a batch of images to image scores and anomaly maps.

A batch is always B slots with roles (DESIGN.md §5): which slots are queries, which may serve as
references, and optionally external references (a known-good bank, a stream's ring buffer).
Whether an image has a reference is data, so the SeCLIP-only fallback is a `jnp.where` inside the
jit. One compile per (B, S, K, CLIPConfig, FiSeConfig); text, roles and the bank are arguments.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax import ficlip, references, seclip
from fiseclip_jax.clip.model import _encode_image, logit_scale
from fiseclip_jax.config import CLIPConfig, FiSeConfig
from fiseclip_jax.ficlip import External
from fiseclip_jax.maps import pixel_maps
from fiseclip_jax.references import Roles
from fiseclip_jax.rules import IMAGE_SCORE_RULES

Array = jax.Array


class SeCLIPOnlyWarning(UserWarning):
  """A query had no reference: its result is SeCLIP alone."""


class DetectResult(NamedTuple):
  image_scores: Array    # (B,) image anomaly score
  anomaly_maps: Array    # (B, S, S) pixel anomaly map
  cls_score: Array       # (B,) SeCLIP image probability of "abnormal" (Eq. 6)
  seg_prob: Array        # (B, N, 2) SeCLIP patch probabilities [P_n, P_a] (Eq. 7)
  mask0: Array           # (B, N) initial anomalous-patch mask (Eq. 9)
  step_scores: Array     # (n_steps, B, N) FiCLIP score of each filtering step (0 without reference)
  masks: Array           # (n_steps, B, N) exclusion mask each step used
  final_mask: Array      # (B, N) exclusion mask after the last vote
  n_ref: Array           # (B,) references of each image in the first step
  step_n_ref: Array      # (n_steps, B) references of each image at each step
  n_candidates: Array    # (B,) candidate references before any mask (0: none at all)
  seclip_only: Array     # (B,) bool: references at no step, the map is SeCLIP's P_a alone
  patch_map: Array       # (B, h, w) fused patch-level map


def resolve_attention(conf: FiSeConfig) -> str:
  """cuDNN fused attention on GPU in bfloat16, XLA's attention elsewhere (CPU, TPU, float32)."""
  if conf.attention_impl is not None:
    return conf.attention_impl
  if jax.default_backend() == "gpu" and conf.compute_dtype == "bfloat16":
    return "cudnn"
  return "xla"


def matmul_precision(conf: FiSeConfig):
  """float32 means float32 everywhere (DESIGN.md §8): HIGHEST where a backend would use TF32/bf16."""
  if conf.compute_dtype == "float32":
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def fuse(conf: FiSeConfig, seg_prob: Array, step_scores: Array, step_n_ref: Array) -> Array:
  """Patch map (B, N): w * P_a + (1 - w) * mean of the steps that had references (DESIGN.md §7);
  P_a alone where no step had one."""
  p_a = seg_prob[..., 1]
  w = conf.fusion_weight
  has = (step_n_ref > 0).astype(jnp.float32)                                # (S, B)
  count = has.sum(axis=0)                                                   # (B,)
  steps_mean = (step_scores * has[..., None]).sum(axis=0) / jnp.maximum(count, 1.0)[:, None]
  return jnp.where((count > 0)[:, None], w * p_a + (1.0 - w) * steps_mean, p_a)


def feature_steps(cfg: CLIPConfig, conf: FiSeConfig, layer_tokens: Array, grid) -> Array:
  """LNAMD maps of every (layer, r) as filtering steps (S, G, B, N, C), in the compute dtype."""
  steps = ficlip.feature_steps(layer_tokens.astype(jnp.float32), grid, conf.r_list, conf.filter_loop)
  return steps.astype(jnp.dtype(conf.compute_dtype))


def _score(params, cfg: CLIPConfig, conf: FiSeConfig, images, roles: Roles, text,
           external: Optional[External], attention_impl) -> Tuple[DetectResult, Array]:
  """The scorer and the batch's feature maps as steps (a stream's ring keeps them)."""
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
  steps = feature_steps(cfg, conf, feats.layer_tokens, grid)                       # (S, G, B, N, C)
  batch_refs, ext_refs = references.candidates(conf.references, roles, external)
  filt = ficlip.mutual_filtering(steps, mask0, batch_refs, mu=conf.mu, rule=conf.vote,
                                 topk_frac=conf.topk_frac, agg=conf.ref_agg,
                                 pair_chunk=conf.pair_chunk, external=external, ext_refs=ext_refs,
                                 batch_pairs=references.uses_batch_pairs(conf.references))
  n_candidates = batch_refs.sum(axis=1) + (0 if ext_refs is None else ext_refs.sum(axis=1))
  seclip_only = ~jnp.any(filt.n_ref > 0, axis=0)                                   # (B,)
  patch_map = fuse(conf, seg_prob, filt.step_scores, filt.n_ref).reshape(b, *grid)
  maps = pixel_maps(patch_map, (s_h, s_w), conf.sigma)                            # (B, S, S)
  peak = maps.reshape(b, -1).max(axis=1)
  score = IMAGE_SCORE_RULES[conf.image_score](cls_score, peak)
  res = DetectResult(score, maps, cls_score, seg_prob, mask0, filt.step_scores, filt.masks,
                     filt.final_mask, filt.n_ref[0], filt.n_ref, n_candidates.astype(jnp.int32),
                     seclip_only, patch_map)
  return res, steps


def _detect(params, cfg: CLIPConfig, conf: FiSeConfig, images, roles, text, external,
            attention_impl) -> DetectResult:
  with matmul_precision(conf):
    return _score(params, cfg, conf, images, roles, text, external, attention_impl)[0]


def _stream_step(params, cfg: CLIPConfig, conf: FiSeConfig, images, roles, text, ring,
                 attention_impl) -> Tuple[DetectResult, External]:
  with matmul_precision(conf):
    res, steps = _score(params, cfg, conf, images, roles, text, ring, attention_impl)
    return res, references.push_ring(ring, steps, res.masks, roles)


_detect_jit = jax.jit(_detect, static_argnums=(1, 2, 7))
_stream_step_jit = jax.jit(_stream_step, static_argnums=(1, 2, 7), donate_argnums=(6,))
_features_jit = jax.jit(
    lambda params, cfg, conf, images, impl: _bank_features(params, cfg, conf, images, impl),
    static_argnums=(1, 2, 4))


def _bank_features(params, cfg: CLIPConfig, conf: FiSeConfig, images, attention_impl) -> Array:
  with matmul_precision(conf):
    grid = (images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size)
    feats = _encode_image(params, cfg, images, conf.feature_layers, conf.proxy_layer,
                          conf.proxy_heads, conf.proxy_attention, conf.compute_dtype, attention_impl)
    return feature_steps(cfg, conf, feats.layer_tokens, grid)


def _check_images(images) -> None:
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f"images have shape {np.shape(images)}; expected (B, S, S, 3) NHWC")


def build_bank(params: dict, cfg: CLIPConfig, conf: FiSeConfig, images, valid=None,
               chunk: int = 8) -> External:
  """A known-good bank (DESIGN.md §5): K normal images (K, S, S, 3) encoded once, their feature
  maps kept on device as a value to pass to `detect` with references "bank" or "both".

  Encoded `chunk` images at a time (the last chunk padded), so K is not limited by memory for
  activations, and one compile serves every K.
  """
  _check_images(images)
  images = np.asarray(images, np.float32)
  k = images.shape[0]
  if k < 1:
    raise ValueError("a bank needs at least one image")
  impl = resolve_attention(conf)
  parts = []
  for start in range(0, k, chunk):
    part = images[start:start + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
    parts.append(_features_jit(params, cfg, conf, jnp.asarray(part), impl))
  steps = jnp.concatenate(parts, axis=2)[:, :, :k]                          # (S, G, K, N, C)
  return references.bank(steps, valid)


def empty_stream(cfg: CLIPConfig, conf: FiSeConfig, bank_size: int) -> External:
  """The ring buffer of a stream scored in rolling mode with a window of `bank_size` images."""
  g = conf.image_size // cfg.patch_size
  n_maps = len(conf.feature_layers) * len(conf.r_list) // conf.n_steps
  return references.empty_ring(conf.n_steps, n_maps, bank_size, g * g, cfg.vision_width,
                                conf.compute_dtype)


def _check_mode(conf: FiSeConfig, external: Optional[External]) -> None:
  if conf.references in ("bank", "both", "rolling") and external is None:
    what = "a ring (fj.empty_stream)" if conf.references == "rolling" else "a bank (fj.build_bank)"
    raise ValueError(f"references={conf.references!r} needs {what}")
  if conf.references == "batch" and external is not None:
    raise ValueError("a bank was passed with references='batch'; use 'bank' or 'both'")


def _warn_lonely(roles: Roles, conf: FiSeConfig, external: Optional[External]) -> None:
  """Warn from host data alone when a query cannot have any candidate reference."""
  if isinstance(roles.query, jax.core.Tracer) or conf.references != "batch":
    return
  query, reference = np.asarray(roles.query, bool), np.asarray(roles.reference, bool)
  lonely = query & (reference.sum() - reference < 1)
  if lonely.any():
    warnings.warn(f"{int(lonely.sum())} query image(s) with no other reference slot in the batch: "
                  "no reference for feature matching, scored with SeCLIP alone",
                  SeCLIPOnlyWarning, stacklevel=3)


def detect(params: dict, cfg: CLIPConfig, conf: FiSeConfig, images, valid, text,
           bank: Optional[External] = None) -> DetectResult:
  """Score a batch: images (B, S, S, 3) normalized NHWC, text (2, D).

  valid: (B,) bool (each valid slot is a query and a reference, the paper's setting) or a
  `Roles`. bank: the external references of conf.references "bank" / "both" (`build_bank`).
  `res.seclip_only` flags the queries that had no reference at any step (their map is P_a); a
  query that cannot have one from the roles alone also raises a SeCLIPOnlyWarning.
  """
  _check_images(images)
  roles = references.as_roles(valid)
  b = np.shape(images)[0]
  if roles.query.shape != (b,) or roles.reference.shape != (b,):
    raise ValueError(f"valid/roles have shape {roles.query.shape}; expected ({b},)")
  if conf.references == "rolling":
    raise ValueError("references='rolling' scores a stream: use fj.score_stream")
  _check_mode(conf, bank)
  _warn_lonely(roles, conf, bank)
  return _detect_jit(params, cfg, conf, jnp.asarray(images, jnp.float32), roles,
                     jnp.asarray(text, jnp.float32), bank, resolve_attention(conf))


def score_stream(params: dict, cfg: CLIPConfig, conf: FiSeConfig, images, roles: Roles, text,
                 ring: External) -> Tuple[DetectResult, External]:
  """One batch of a stream in rolling mode (DESIGN.md §5): (results, the ring after it).

  roles.position holds each slot's stream position; the stream images fill the first slots in
  order (padding after, reference flag off). Each image is compared with the ring's K images
  before it, so results do not depend on how the stream is cut into batches. The ring passed in
  is consumed (its buffers are donated); keep the returned one.
  """
  _check_images(images)
  if conf.references != "rolling":
    raise ValueError(f"score_stream needs references='rolling', got {conf.references!r}")
  roles = references.as_roles(roles)
  if not isinstance(roles.reference, jax.core.Tracer):
    references.check_stream_order(np.asarray(roles.reference))
  return _stream_step_jit(params, cfg, conf, jnp.asarray(images, jnp.float32), roles,
                          jnp.asarray(text, jnp.float32), ring, resolve_attention(conf))

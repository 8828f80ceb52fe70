"""The scorer as a chain of public stages, composed here once (DESIGN.md §1, §9).

  encode -> SeCLIP branch -> FiCLIP branch (LNAMD, mutual filtering) -> fusion -> maps -> score

Each stage is an un-jitted function over arrays and one hashable `Spec` (the towers and the
method's knobs). The entry points (`api.py`), the sharded round (`run/sharding.py`) and every stage
row of the benchmark jit these same functions. A batch is B slots with roles (DESIGN.md §5);
whether an image has a reference is data, so the SeCLIP-only fallback is a `jnp.where` inside the
jit. Images enter as RGB in [0, 1]; each tower normalizes its own input.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from fiseclip_jax.core.rules import IMAGE_SCORE_RULES
from fiseclip_jax.method import ficlip, maps, references, seclip
from fiseclip_jax.method.ficlip import FilterResult
from fiseclip_jax.method.references import External, Roles
from fiseclip_jax.method.spec import Params, Spec, matmul_precision
from fiseclip_jax.models.tower import Encoded

Array = jax.Array


class DetectResult(NamedTuple):
  image_scores: Array    # (B,) image anomaly score
  anomaly_maps: Array    # (B, S, S) pixel anomaly map
  cls_score: Array       # (B,) SeCLIP image probability of "abnormal" (Eq. 6; 0 without text)
  seg_prob: Array        # (B, N, 2) SeCLIP patch probabilities [P_n, P_a] (Eq. 7; 0 without text)
  mask0: Array           # (B, N) initial anomalous-patch mask (Eq. 9)
  step_scores: Array     # (n_steps, B, N) FiCLIP score of each filtering step (0 without reference)
  masks: Array           # (n_steps, B, N) exclusion mask each step used
  final_mask: Array      # (B, N) exclusion mask after the last vote
  n_ref: Array           # (B,) references of each image in the first step
  step_n_ref: Array      # (n_steps, B) references of each image at each step
  n_candidates: Array    # (B,) candidate references before any mask (0: none at all)
  seclip_only: Array     # (B,) bool: references at no step, the map is SeCLIP's P_a alone
  patch_map: Array       # (B, h, w) fused patch-level map
  image_embed: Array     # (B, D) image-level embedding: CLIP's CLS embedding, else the FiCLIP
  #                        tower's CLS token at its last feature layer (RsCIN, DESIGN.md §18)


class Features(NamedTuple):
  """What the encode stage gives the branches."""
  text: Optional[Encoded]     # the text-aligned tower's pass (None without one)
  layer_tokens: Array         # (n_layers, B, 1 + h*w, W) FiCLIP's feature layers, CLS first


# ------------------------------------------------------------------------------------------------
# Stages.


def encode(spec: Spec, params: Params, images: Array) -> Features:
  """Encode stage: one pass per tower. images (B, S, S, 3) RGB in [0, 1]."""
  conf = spec.conf
  images = images.astype(jnp.float32)
  text_pass = None
  if spec.has_text:
    layers = set(seclip.streams_needed(spec.text.depth, conf))
    if spec.fi is None:
      layers |= set(conf.feature_layers)
    text_pass = spec.text.encode(params.text, images, tuple(sorted(layers)), conf.compute_dtype,
                                 spec.attention_impl)
  if spec.fi is None:
    tokens = jnp.stack([text_pass.streams[i] for i in conf.feature_layers])
  else:
    fi_pass = spec.fi.encode(params.fi, images, tuple(sorted(set(conf.feature_layers))),
                             conf.compute_dtype, spec.attention_impl)
    tokens = jnp.stack([fi_pass.streams[i] for i in conf.feature_layers])
  return Features(text_pass, tokens)


def seclip_stage(spec: Spec, params: Params, feats: Features, text: Array,
                 n_patches: int) -> seclip.SeCLIPOut:
  """SeCLIP branch: probabilities and M0; without a text tower, zeros and an empty mask."""
  if not spec.has_text:
    b = feats.layer_tokens.shape[1]
    return seclip.SeCLIPOut(jnp.zeros((b,), jnp.float32), jnp.zeros((b, n_patches, 2), jnp.float32),
                            jnp.zeros((b, n_patches), bool))
  return seclip.branch(spec.text, params.text, spec.conf, feats.text, text, spec.attention_impl)


def lnamd_stage(spec: Spec, layer_tokens: Array, grid) -> Array:
  """FiCLIP features: LNAMD maps of every (layer, r) as filtering steps (S, G, B, N, C)."""
  conf = spec.conf
  steps = ficlip.feature_steps(layer_tokens.astype(jnp.float32), grid, conf.r_list, conf.filter_loop)
  return steps.astype(jnp.dtype(conf.compute_dtype))


def filter_stage(spec: Spec, steps: Array, mask0: Array, roles: Roles,
                 external: Optional[External], grid=None,
                 padding: Optional[Array] = None, block: Optional[int] = None,
                 gather=None, others: Optional[Array] = None,
                 offset=0) -> Tuple[FilterResult, Array]:
  """FiCLIP matching with mutual filtering: (FilterResult, n_candidates (B,)). grid: the (h, w)
  patch grid of N, which a match window needs; padding (B, N): letterbox patches, never a
  reference. Whole-category references: block, the pairs' block size; over devices, gather (an
  all-gather of this device's slots), others (R,) every slot's reference flag and offset, this
  device's first slot among them (`ficlip.mutual_filtering`, `references.candidates`)."""
  conf = spec.conf
  batch_refs, ext_refs = references.candidates(conf, roles, external, others, offset)
  filt = ficlip.mutual_filtering(steps, mask0, batch_refs, mu=conf.mu, rule=conf.vote,
                                 topk_frac=conf.topk_frac, agg=conf.ref_agg,
                                 pair_chunk=conf.pair_chunk, external=external, ext_refs=ext_refs,
                                 batch_pairs=references.uses_batch_pairs(conf), grid=grid,
                                 match_window=conf.match_window, padding=padding,
                                 block=block, gather=gather)
  n_candidates = batch_refs.sum(axis=1) + (0 if ext_refs is None else ext_refs.sum(axis=1))
  return filt, n_candidates.astype(jnp.int32)


def fusion_weight(spec: Spec) -> float:
  """SeCLIP's share of the map: the config's, or 0 without a text tower."""
  return spec.conf.fusion_weight if spec.has_text else 0.0


def fusion_stage(spec: Spec, seg_prob: Array, step_scores: Array, step_n_ref: Array) -> Array:
  """Patch map (B, N): w * P_a + (1 - w) * mean of the steps that had references (DESIGN.md §7);
  P_a alone where no step had one."""
  p_a = seg_prob[..., 1]
  w = fusion_weight(spec)
  has = (step_n_ref > 0).astype(jnp.float32)                                # (S, B)
  count = has.sum(axis=0)                                                   # (B,)
  steps_mean = (step_scores * has[..., None]).sum(axis=0) / jnp.maximum(count, 1.0)[:, None]
  return jnp.where((count > 0)[:, None], w * p_a + (1.0 - w) * steps_mean, p_a)


def maps_stage(spec: Spec, patch_map: Array, out_hw) -> Array:
  """(B, h, w) -> (B, H, W): bilinear upsampling and Gaussian smoothing."""
  return maps.pixel_maps(patch_map, out_hw, spec.conf.sigma)


def score_stage(spec: Spec, cls_score: Array, pixel_maps: Array,
                content: Optional[Array] = None) -> Array:
  """Image score (B,) by the config's rule from the pixel map's maximum (over the image's own
  pixels where content (B, S, S) says which); the maximum alone without a text tower."""
  if content is not None:
    pixel_maps = jnp.where(content, pixel_maps, -jnp.inf)
  peak = pixel_maps.reshape(pixel_maps.shape[0], -1).max(axis=1)
  rule = spec.conf.image_score if spec.has_text else "max"
  return IMAGE_SCORE_RULES[rule](cls_score, peak)


class Part(NamedTuple):
  """What FiCLIP's filter needs of a batch, and SeCLIP's half of its results (whole-category
  references keep one per batch until the category's filter has run)."""
  se: seclip.SeCLIPOut        # cls_score (B,), seg_prob (B, N, 2), mask0 (B, N)
  steps: Array                # (S, G, B, N, C) FiCLIP's feature steps
  padding: Optional[Array]    # (B, N) letterbox padding patches (None: squashed images)
  embed: Array                # (B, D) image-level embedding (`DetectResult.image_embed`)


def encode_part(spec: Spec, params: Params, images: Array, roles: Roles, text: Array) -> Part:
  """Encode, SeCLIP branch and LNAMD of a batch: images (B, S, S, 3)."""
  grid = spec.grid(images.shape[1:3])
  feats = encode(spec, params, images)
  se = seclip_stage(spec, params, feats, text, grid[0] * grid[1])
  steps = lnamd_stage(spec, feats.layer_tokens, grid)
  padding = None if roles.content is None else references.padding_patches(roles.content, grid)
  embed = feats.text.cls_embed if spec.has_text else feats.layer_tokens[-1][:, 0]
  return Part(se, steps, padding, embed.astype(jnp.float32))


def finish(spec: Spec, part: Part, filt: FilterResult, n_candidates: Array,
           out_hw: Tuple[int, int], content: Optional[Array] = None) -> DetectResult:
  """Fusion, maps and image score of a batch from its part and its filter's result."""
  se = part.se
  b = se.cls_score.shape[0]
  grid = spec.grid(out_hw)
  patch_map = fusion_stage(spec, se.seg_prob, filt.step_scores, filt.n_ref).reshape(b, *grid)
  pixel_maps = maps_stage(spec, patch_map, out_hw)
  return DetectResult(score_stage(spec, se.cls_score, pixel_maps, content), pixel_maps,
                      se.cls_score, se.seg_prob, se.mask0, filt.step_scores, filt.masks,
                      filt.final_mask, filt.n_ref[0], filt.n_ref, n_candidates,
                      ~jnp.any(filt.n_ref > 0, axis=0), patch_map, part.embed)


def score(spec: Spec, params: Params, images: Array, roles: Roles, text: Array,
          external: Optional[External]) -> Tuple[DetectResult, Array]:
  """The stages in order: (results, the batch's FiCLIP feature steps, which a stream's ring keeps)."""
  with matmul_precision(spec.conf):
    part = encode_part(spec, params, images, roles, text)
    grid = spec.grid(images.shape[1:3])
    filt, n_candidates = filter_stage(spec, part.steps, part.se.mask0, roles, external, grid,
                                      part.padding)
    return finish(spec, part, filt, n_candidates, images.shape[1:3], roles.content), part.steps


def detect_batch(spec: Spec, params: Params, images, roles: Roles, text, external) -> DetectResult:
  """One batch's results (what `detect` and the sharded round compile)."""
  return score(spec, params, images, roles, text, external)[0]


def stream_step(spec: Spec, params: Params, images, roles: Roles, text,
                ring: External) -> Tuple[DetectResult, External]:
  """One batch of a stream: its results and the ring after it."""
  res, steps = score(spec, params, images, roles, text, ring)
  return res, references.push_ring(ring, steps, res.masks, roles)


def features_steps(spec: Spec, params: Params, images) -> Array:
  """A bank's stages: encode and LNAMD only (S, G, K, N, C)."""
  with matmul_precision(spec.conf):
    feats = encode(spec, params, images)
    return lnamd_stage(spec, feats.layer_tokens, spec.grid(images.shape[1:3]))


def stage_flops(spec: Spec, size: int, b: int, n_external: int = 0) -> dict:
  """Analytic FLOPs per batch of every stage (multiply-add = 2), from the formulas beside the code
  they count; small stages count element-wise work only roughly."""
  conf = spec.conf
  fi = spec.fi_tower
  g = size // fi.patch_size
  n, c = g * g, fi.width
  encoder = se = 0.0
  if spec.has_text:   # the proxy block runs in the seclip stage, from the tower's hooks
    d = spec.text.embed_dim
    encoder += b * spec.text.flops(size)
    se = b * (seclip.flops(spec.text.width, d, g, conf) + (n + 1) * (2.0 * 2 * d + 3.0 * d))
  if spec.fi is not None:
    encoder += b * fi.flops(size)
  out = {"encoder": encoder, "seclip": se,
         "lnamd": ficlip.lnamd_flops(b, n, c, conf.r_list, len(conf.feature_layers)),
         "mutual_filtering": ficlip.matching_flops(
             b, n, c, len(conf.feature_layers) * len(conf.r_list), n_external,
             references.uses_batch_pairs(conf), (g, g), conf.match_window),
         "maps": maps.flops(b, g, size)}
  out["end_to_end"] = sum(out.values())
  return out

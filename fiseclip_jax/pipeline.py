"""The scorer as a chain of public stages, composed here once (DESIGN.md §1, §9).

  encode -> SeCLIP branch -> FiCLIP branch (LNAMD, mutual filtering) -> fusion -> maps -> score

Each stage is an un-jitted function over arrays and one hashable `Spec` (the backbones'
architectures and the method's knobs). `detect`, `score_stream`, the sharded round
(`sharding.py`) and every stage row of `eval.bench` jit these same functions. A batch is B slots
with roles (DESIGN.md §5); whether an image has a reference is data, so the SeCLIP-only fallback is
a `jnp.where` inside the jit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax import ficlip, references, registry, seclip
from fiseclip_jax.backbone import Encoded
from fiseclip_jax.config import FiSeConfig
from fiseclip_jax.data.preprocess import OPENAI_MEAN, OPENAI_STD
from fiseclip_jax.ficlip import External, FilterResult
from fiseclip_jax.maps import pixel_maps
from fiseclip_jax.references import Roles
from fiseclip_jax.rules import IMAGE_SCORE_RULES

Array = jax.Array


class SeCLIPOnlyWarning(UserWarning):
  """A query had no reference: its result is SeCLIP alone."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static half of a scorer: one compile per Spec and input shapes.

  text_model: the text-aligned tower's config (CLIP: SeCLIP and the prompts), None for FiCLIP alone.
  fi_model: FiCLIP's tower's config when it is another model (DINOv2), None to use text_model's.
  """
  conf: FiSeConfig
  text_model: Optional[Any]
  fi_model: Optional[Any] = None
  attention_impl: str = "xla"

  def __post_init__(self):
    if self.text_model is None and self.fi_model is None:
      raise ValueError("a Spec needs a text-aligned tower, a FiCLIP tower, or both")
    if self.text_model is not None and not registry.text_aligned(self.text_model):
      raise ValueError(f"{type(self.text_model).__name__} has no text tower: pass it as fi_model")

  @property
  def fi_config(self):
    """The config of the tower FiCLIP matches features of."""
    return self.fi_model if self.fi_model is not None else self.text_model

  @property
  def has_text(self) -> bool:
    return self.text_model is not None

  def grid(self, image_hw) -> Tuple[int, int]:
    p = registry.for_config(self.fi_config).patch_size(self.fi_config)
    return image_hw[0] // p, image_hw[1] // p


def make_spec(cfg, conf: FiSeConfig, fi_cfg=None) -> Spec:
  """A Spec from a backbone config (CLIP, or DINOv2 alone) and an optional FiCLIP tower."""
  text_aligned = registry.text_aligned(cfg)
  if not text_aligned and fi_cfg is not None:
    raise ValueError("two FiCLIP towers: the first config must be a text-aligned one (CLIP)")
  if text_aligned:
    spec = Spec(conf, cfg, fi_cfg, resolve_attention(conf))
  else:
    spec = Spec(conf, None, cfg, resolve_attention(conf))
  check_grids(spec, conf.image_size)
  return spec


def check_grids(spec: Spec, image_size: int) -> None:
  """SeCLIP's mask must lie on FiCLIP's patch grid: both towers need the same grid at this size."""
  if spec.text_model is not None and spec.fi_model is not None:
    pt = registry.for_config(spec.text_model).patch_size(spec.text_model)
    pf = registry.for_config(spec.fi_model).patch_size(spec.fi_model)
    if image_size // pt != image_size // pf:
      raise ValueError(f"the text tower's patch grid ({image_size // pt}) differs from the FiCLIP "
                       f"tower's ({image_size // pf}) at {image_size} px; they must match")


class Params(NamedTuple):
  text: Optional[dict]        # the text-aligned tower's params (None without one)
  fi: Optional[dict]          # FiCLIP's tower's params (None: text's tower)


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


class Features(NamedTuple):
  """What the encode stage gives the branches."""
  text: Optional[Encoded]     # the text-aligned tower's pass (None without one)
  layer_tokens: Array         # (n_layers, B, 1 + h*w, W) FiCLIP's feature layers, CLS first


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


def renormalize(images: Array, mean, std) -> Array:
  """OpenAI-normalized inputs (what the loader makes) -> normalized with another mean and std."""
  if tuple(mean) == tuple(OPENAI_MEAN) and tuple(std) == tuple(OPENAI_STD):
    return images
  pixels = images * jnp.asarray(OPENAI_STD, jnp.float32) + jnp.asarray(OPENAI_MEAN, jnp.float32)
  return (pixels - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Stages.


def encode(spec: Spec, params: Params, images: Array) -> Features:
  """Encode stage: one pass per tower. images (B, S, S, 3) OpenAI-normalized."""
  conf = spec.conf
  images = images.astype(jnp.float32)
  text_pass = None
  if spec.has_text:
    b = registry.for_config(spec.text_model)
    layers = set(seclip.streams_needed(b.depth(spec.text_model), conf))
    if spec.fi_model is None:
      layers |= set(conf.feature_layers)
    text_pass = b.encode(params.text, spec.text_model, renormalize(images, b.mean, b.std),
                         tuple(sorted(layers)), conf.compute_dtype, spec.attention_impl)
  if spec.fi_model is None:
    tokens = jnp.stack([text_pass.streams[i] for i in conf.feature_layers])
  else:
    b = registry.for_config(spec.fi_model)
    fi_pass = b.encode(params.fi, spec.fi_model, renormalize(images, b.mean, b.std),
                       tuple(sorted(set(conf.feature_layers))), conf.compute_dtype, spec.attention_impl)
    tokens = jnp.stack([fi_pass.streams[i] for i in conf.feature_layers])
  return Features(text_pass, tokens)


def seclip_stage(spec: Spec, params: Params, feats: Features, text: Array,
                 n_patches: int) -> seclip.SeCLIPOut:
  """SeCLIP branch: probabilities and M0; without a text tower, zeros and an empty mask."""
  if not spec.has_text:
    b = feats.layer_tokens.shape[1]
    return seclip.SeCLIPOut(jnp.zeros((b,), jnp.float32), jnp.zeros((b, n_patches, 2), jnp.float32),
                            jnp.zeros((b, n_patches), bool))
  return seclip.branch(registry.for_config(spec.text_model), params.text, spec.text_model, spec.conf,
                       feats.text, text)


def lnamd_stage(spec: Spec, layer_tokens: Array, grid) -> Array:
  """FiCLIP features: LNAMD maps of every (layer, r) as filtering steps (S, G, B, N, C)."""
  conf = spec.conf
  steps = ficlip.feature_steps(layer_tokens.astype(jnp.float32), grid, conf.r_list, conf.filter_loop)
  return steps.astype(jnp.dtype(conf.compute_dtype))


def filter_stage(spec: Spec, steps: Array, mask0: Array, roles: Roles,
                 external: Optional[External]) -> Tuple[FilterResult, Array]:
  """FiCLIP matching with mutual filtering: (FilterResult, n_candidates (B,))."""
  conf = spec.conf
  batch_refs, ext_refs = references.candidates(conf.references, roles, external)
  filt = ficlip.mutual_filtering(steps, mask0, batch_refs, mu=conf.mu, rule=conf.vote,
                                 topk_frac=conf.topk_frac, agg=conf.ref_agg,
                                 pair_chunk=conf.pair_chunk, external=external, ext_refs=ext_refs,
                                 batch_pairs=references.uses_batch_pairs(conf.references))
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
  return pixel_maps(patch_map, out_hw, spec.conf.sigma)


def score_stage(spec: Spec, cls_score: Array, maps: Array) -> Array:
  """Image score (B,) by the config's rule; the map's maximum without a text tower."""
  peak = maps.reshape(maps.shape[0], -1).max(axis=1)
  rule = spec.conf.image_score if spec.has_text else "max"
  return IMAGE_SCORE_RULES[rule](cls_score, peak)


def score(spec: Spec, params: Params, images: Array, roles: Roles, text: Array,
          external: Optional[External]) -> Tuple[DetectResult, Array]:
  """The stages in order: (results, the batch's FiCLIP feature steps, which a stream's ring keeps)."""
  with matmul_precision(spec.conf):
    b, s_h, s_w, _ = images.shape
    grid = spec.grid((s_h, s_w))
    feats = encode(spec, params, images)
    se = seclip_stage(spec, params, feats, text, grid[0] * grid[1])
    steps = lnamd_stage(spec, feats.layer_tokens, grid)
    filt, n_candidates = filter_stage(spec, steps, se.mask0, roles, external)
    patch_map = fusion_stage(spec, se.seg_prob, filt.step_scores, filt.n_ref).reshape(b, *grid)
    maps = maps_stage(spec, patch_map, (s_h, s_w))
    res = DetectResult(score_stage(spec, se.cls_score, maps), maps, se.cls_score, se.seg_prob,
                       se.mask0, filt.step_scores, filt.masks, filt.final_mask, filt.n_ref[0],
                       filt.n_ref, n_candidates, ~jnp.any(filt.n_ref > 0, axis=0), patch_map)
    return res, steps


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


_detect_jit = jax.jit(detect_batch, static_argnums=0)
_stream_step_jit = jax.jit(stream_step, static_argnums=0, donate_argnums=5)
_features_jit = jax.jit(features_steps, static_argnums=0)


STAGES = ("encoder", "seclip", "lnamd", "mutual_filtering", "maps", "end_to_end")


def stage_flops(spec: Spec, size: int, b: int, n_external: int = 0) -> dict:
  """Analytic FLOPs per batch of every stage (multiply-add = 2), from the formulas beside the code
  they count; small stages count element-wise work only roughly."""
  from fiseclip_jax import maps as maps_lib
  conf = spec.conf
  fi = registry.for_config(spec.fi_config)
  g = size // fi.patch_size(spec.fi_config)
  n, c = g * g, fi.width(spec.fi_config)
  encoder = se = 0.0
  if spec.has_text:   # the proxy block runs in the seclip stage, from the tower's hooks
    tb = registry.for_config(spec.text_model)
    d = spec.text_model.embed_dim
    encoder += b * tb.flops(spec.text_model, size)
    se = b * (seclip.flops(tb.width(spec.text_model), d, g, conf) + (n + 1) * (2.0 * 2 * d + 3.0 * d))
  if spec.fi_model is not None:
    encoder += b * fi.flops(spec.fi_config, size)
  out = {"encoder": encoder, "seclip": se,
         "lnamd": ficlip.lnamd_flops(b, n, c, conf.r_list, len(conf.feature_layers)),
         "mutual_filtering": ficlip.matching_flops(
             b, n, c, len(conf.feature_layers) * len(conf.r_list), n_external,
             references.uses_batch_pairs(conf.references)),
         "maps": maps_lib.flops(b, g, size)}
  out["end_to_end"] = sum(out.values())
  return out


# ------------------------------------------------------------------------------------------------
# The library's entry points.


def _check_images(images) -> None:
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f"images have shape {np.shape(images)}; expected (B, S, S, 3) NHWC")


def split_params(spec: Spec, params, fi_params) -> Params:
  """The user's (params, fi_params) as the stages' Params: the first tower is the text-aligned one
  when the spec has one, else FiCLIP's."""
  if spec.has_text:
    return Params(params, fi_params if spec.fi_model is not None else None)
  return Params(None, params)


def text_input(spec: Spec, text) -> Array:
  """The text features a scorer is called with: (2, D) float32, or a placeholder for FiCLIP alone."""
  if spec.has_text:
    if text is None:
      raise ValueError("text features are needed with a text-aligned tower (fj.text_features)")
    return jnp.asarray(text, jnp.float32)
  return jnp.zeros((2, 1), jnp.float32)        # FiCLIP alone: no text alignment


def build_bank(params: dict, cfg, conf: FiSeConfig, images, valid=None, chunk: int = 8, *,
               fi_params=None, fi_cfg=None) -> External:
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
  spec = make_spec(cfg, conf, fi_cfg)
  p = split_params(spec, params, fi_params)
  parts = []
  for start in range(0, k, chunk):
    part = images[start:start + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
    parts.append(_features_jit(spec, p, jnp.asarray(part)))
  steps = jnp.concatenate(parts, axis=2)[:, :, :k]                          # (S, G, K, N, C)
  return references.bank(steps, valid)


def empty_stream(cfg, conf: FiSeConfig, bank_size: int, *, fi_cfg=None) -> External:
  """The ring buffer of a stream scored in rolling mode with a window of `bank_size` images."""
  fi = fi_cfg if fi_cfg is not None else cfg
  b = registry.for_config(fi)
  g = conf.image_size // b.patch_size(fi)
  width = b.width(fi)
  n_maps = len(conf.feature_layers) * len(conf.r_list) // conf.n_steps
  return references.empty_ring(conf.n_steps, n_maps, bank_size, g * g, width, conf.compute_dtype)


def _check_mode(conf: FiSeConfig, external: Optional[External]) -> None:
  if conf.references in ("bank", "both", "rolling") and external is None:
    what = "a ring (fj.empty_stream)" if conf.references == "rolling" else "a bank (fj.build_bank)"
    raise ValueError(f"references={conf.references!r} needs {what}")
  if conf.references == "batch" and external is not None:
    raise ValueError("a bank was passed with references='batch'; use 'bank' or 'both'")


def _warn_lonely(roles: Roles, conf: FiSeConfig) -> None:
  """Warn from host data alone when a query cannot have any candidate reference."""
  if isinstance(roles.query, jax.core.Tracer) or conf.references != "batch":
    return
  query, reference = np.asarray(roles.query, bool), np.asarray(roles.reference, bool)
  lonely = query & (reference.sum() - reference < 1)
  if lonely.any():
    warnings.warn(f"{int(lonely.sum())} query image(s) with no other reference slot in the batch: "
                  "no reference for feature matching, scored with SeCLIP alone",
                  SeCLIPOnlyWarning, stacklevel=3)


def detect(params: dict, cfg, conf: FiSeConfig, images, valid, text,
           bank: Optional[External] = None, *, fi_params=None, fi_cfg=None) -> DetectResult:
  """Score a batch: images (B, S, S, 3) OpenAI-normalized NHWC, text (2, D).

  valid: (B,) bool (each valid slot is a query and a reference, the paper's setting) or a
  `Roles`. bank: the external references of conf.references "bank" / "both" (`build_bank`).
  fi_params / fi_cfg: another tower for FiCLIP (DINOv2) while cfg's CLIP keeps SeCLIP; cfg may
  also be a DINOv2 config alone (FiCLIP only: text is ignored, the map is FiCLIP's).
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
  _warn_lonely(roles, conf)
  spec = make_spec(cfg, conf, fi_cfg)
  return _detect_jit(spec, split_params(spec, params, fi_params), jnp.asarray(images, jnp.float32),
                     roles, text_input(spec, text), bank)


def score_stream(params: dict, cfg, conf: FiSeConfig, images, roles: Roles, text,
                 ring: External, *, fi_params=None, fi_cfg=None) -> Tuple[DetectResult, External]:
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
  spec = make_spec(cfg, conf, fi_cfg)
  return _stream_step_jit(spec, split_params(spec, params, fi_params), jnp.asarray(images, jnp.float32),
                          roles, text_input(spec, text), ring)


class ImageFeatures(NamedTuple):
  cls_embed: Optional[Array]          # (B, D) CLS embedding of the unmodified model (CLIP)
  layer_tokens: Array                 # (n_layers, B, 1 + HW, W) stream after each feature layer
  proxy_patch_embed: Optional[Array]  # (B, HW, D) SeCLIP patch embeddings, not normalized (CLIP)


def _encode_image(params, cfg, conf: FiSeConfig, images) -> ImageFeatures:
  spec = make_spec(cfg, conf)
  with matmul_precision(conf):
    feats = encode(spec, split_params(spec, params, None), images)
    if not spec.has_text:
      return ImageFeatures(None, feats.layer_tokens, None)
    b = registry.for_config(cfg)
    proxy = seclip.proxy_patch_embed(b, params, cfg, conf, feats.text)
    return ImageFeatures(feats.text.cls_embed, feats.layer_tokens, proxy)


_encode_image_jit = jax.jit(_encode_image, static_argnums=(1, 2))


def encode_image(params: dict, cfg, images, feature_layers=(6, 12, 18, 24), proxy_layer: int = 12,
                 proxy_heads: str = "mean", proxy_attention: str = "layer",
                 compute_dtype: str = "float32", attention_impl: Optional[str] = None) -> ImageFeatures:
  """One pass of a tower with what both branches read (jit-compiled per shape and settings).

  images: (B, S, S, 3) NHWC, OpenAI-normalized. For CLIP: CLS embedding, feature layers and
  SeCLIP's patch embeddings; for DINOv2: the feature layers (the rest None).
  """
  conf = FiSeConfig(image_size=int(np.shape(images)[1]), feature_layers=tuple(feature_layers),
                    proxy_layer=int(proxy_layer), proxy_heads=proxy_heads,
                    proxy_attention=proxy_attention, compute_dtype=compute_dtype,
                    attention_impl=attention_impl)
  return _encode_image_jit(params, cfg, conf, jnp.asarray(images, jnp.float32))

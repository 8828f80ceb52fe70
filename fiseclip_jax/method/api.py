"""The library's entry points: detect a batch, build a bank, score a stream, encode images.

Each one checks its arguments on the host (shapes, the references its config needs, a bank bound
to other settings), builds the `Spec` once and calls one jitted composition of the pipeline's
stages. Images are RGB in [0, 1], NHWC (B, S, S, 3); each tower normalizes its own input.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.method import pipeline, references, seclip
from fiseclip_jax.method.pipeline import DetectResult
from fiseclip_jax.method.references import External, Roles
from fiseclip_jax.method.spec import Params, Spec, matmul_precision, resolve_attention
from fiseclip_jax.models import registry
from fiseclip_jax.models.tower import Tower

Array = jax.Array


class SeCLIPOnlyWarning(UserWarning):
  """A query had no reference: its result is SeCLIP alone."""


_detect_jit = jax.jit(pipeline.detect_batch, static_argnums=0)
_stream_step_jit = jax.jit(pipeline.stream_step, static_argnums=0, donate_argnums=5)
_features_jit = jax.jit(pipeline.features_steps, static_argnums=0)


def check_images(images) -> None:
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f"images have shape {np.shape(images)}; expected (B, S, S, 3) NHWC")


def text_input(spec: Spec, text) -> Array:
  """The text features a scorer is called with: (2, D) float32, or a placeholder for FiCLIP alone."""
  if spec.has_text:
    if text is None:
      raise ValueError("text features are needed with a text-aligned tower (fj.text_features)")
    return jnp.asarray(text, jnp.float32)
  return jnp.zeros((2, 1), jnp.float32)        # FiCLIP alone: no text alignment


def check_external(spec: Spec, external: Optional[External], what: str) -> None:
  """A bank or a ring pairs only with a scorer of the settings it was built under (DESIGN.md §5)."""
  if external is None or external.built_under is None:
    return
  diff = external.built_under.differences(spec.built_under())
  if diff:
    raise ValueError(f"the {what} was built under other settings ({'; '.join(diff)}): rebuild it "
                     "with this config and towers")


def check_references(spec: Spec, bank: Optional[External]) -> None:
  """The references a config needs, given or refused, and bound to its settings."""
  conf = spec.conf
  if conf.streaming:
    raise ValueError(f"stream_window={conf.stream_window} scores a stream: use fj.score_stream")
  if conf.references in ("bank", "both") and bank is None:
    raise ValueError(f"references={conf.references!r} needs a bank (fj.build_bank)")
  if conf.references == "batch" and bank is not None:
    raise ValueError("a bank was passed with references='batch'; use 'bank' or 'both'")
  check_external(spec, bank, "bank")


def warn_lonely(roles: Roles, conf: FiSeConfig) -> None:
  """Warn from host data alone when a query cannot have any candidate reference."""
  if isinstance(roles.query, jax.core.Tracer) or conf.references != "batch":
    return
  query, reference = np.asarray(roles.query, bool), np.asarray(roles.reference, bool)
  lonely = query & (reference.sum() - reference < 1)
  if lonely.any():
    warnings.warn(f"{int(lonely.sum())} query image(s) with no other reference slot in the batch: "
                  "no reference for feature matching, scored with SeCLIP alone",
                  SeCLIPOnlyWarning, stacklevel=3)


class Model(NamedTuple):
  """The towers a run scores with and their params: the one value that travels from the loader to
  the scorers. `text` is the text-aligned tower (SeCLIP; None: FiCLIP alone), `fi` FiCLIP's own
  tower when it is another one (None: the text tower's features)."""
  text: Optional[Tower]
  fi: Optional[Tower]
  params: Params

  @classmethod
  def of(cls, params, cfg, fi_params=None, fi_cfg=None) -> "Model":
    """From the entry points' arguments: the first tower (a config or a tower) with its params,
    and optionally FiCLIP's own tower with its params."""
    tower = registry.tower_for(cfg)
    fi = None if fi_cfg is None else registry.tower_for(fi_cfg)
    if not tower.text_aligned:
      if fi is not None:
        raise ValueError("two FiCLIP towers: the first must be a text-aligned one (CLIP)")
      return cls(None, tower, Params(None, params))
    return cls(tower, fi, Params(params, fi_params if fi is not None else None))

  @property
  def has_text(self) -> bool:
    return self.text is not None

  def spec(self, conf: FiSeConfig) -> Spec:
    """The static half of a scorer of this model under conf."""
    conf.check_grids(self.text and self.text.patch_size, self.fi and self.fi.patch_size)
    return Spec(conf, self.text, self.fi, resolve_attention(conf))

  def detect(self, conf: FiSeConfig, images, valid, text,
             bank: Optional[External] = None) -> DetectResult:
    """`detect` of this model (see the function)."""
    check_images(images)
    roles = references.as_roles(valid)
    b = np.shape(images)[0]
    if roles.query.shape != (b,) or roles.reference.shape != (b,):
      raise ValueError(f"valid/roles have shape {roles.query.shape}; expected ({b},)")
    spec = self.spec(conf)
    check_references(spec, bank)
    warn_lonely(roles, conf)
    return _detect_jit(spec, self.params, jnp.asarray(images, jnp.float32), roles,
                       text_input(spec, text), bank)

  def build_bank(self, conf: FiSeConfig, images, valid=None, chunk: int = 8,
                 content=None) -> External:
    """`build_bank` of this model (see the function)."""
    check_images(images)
    images = np.asarray(images, np.float32)
    k = images.shape[0]
    if k < 1:
      raise ValueError("a bank needs at least one image")
    spec = self.spec(conf)
    parts = []
    for start in range(0, k, chunk):
      part = images[start:start + chunk]
      if len(part) < chunk:
        part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
      parts.append(_features_jit(spec, self.params, jnp.asarray(part)))
    steps = jnp.concatenate(parts, axis=2)[:, :, :k]                        # (S, G, K, N, C)
    padding = None
    if content is not None:
      padding = references.padding_patches(jnp.asarray(content, bool), spec.grid(images.shape[1:3]))
    return references.bank(steps, valid, spec.built_under(), padding)

  def empty_stream(self, conf: FiSeConfig) -> External:
    """`empty_stream` of this model (see the function)."""
    if not conf.streaming:
      raise ValueError("a stream needs a config with stream_window > 0 (the window of images "
                       "before each one)")
    spec = self.spec(conf)
    fi = spec.fi_tower
    g = conf.image_size // fi.patch_size
    n_maps = len(conf.feature_layers) * len(conf.r_list) // conf.n_steps
    return references.empty_ring(conf.n_steps, n_maps, conf.stream_window, g * g, fi.width,
                                 conf.compute_dtype, spec.built_under())

  def score_stream(self, conf: FiSeConfig, images, roles: Roles, text,
                   ring: External) -> Tuple[DetectResult, External]:
    """`score_stream` of this model (see the function)."""
    check_images(images)
    if not conf.streaming:
      raise ValueError("score_stream needs a config with stream_window > 0 (got 0: not a stream)")
    roles = references.as_roles(roles)
    if not isinstance(roles.reference, jax.core.Tracer):
      references.check_stream_order(np.asarray(roles.reference))
    spec = self.spec(conf)
    if ring.capacity != conf.stream_window:
      raise ValueError(f"the ring holds {ring.capacity} images, the config's stream_window is "
                       f"{conf.stream_window}: make it with fj.empty_stream(cfg, conf)")
    check_external(spec, ring, "ring")
    return _stream_step_jit(spec, self.params, jnp.asarray(images, jnp.float32), roles,
                            text_input(spec, text), ring)


def make_spec(cfg, conf: FiSeConfig, fi_cfg=None) -> Spec:
  """A Spec from a tower or its config (CLIP; or a tower without text alone: FiCLIP only) and an
  optional second tower for FiCLIP (a config or a tower)."""
  return Model.of(None, cfg, None, fi_cfg).spec(conf)


def detect(params: dict, cfg, conf: FiSeConfig, images, valid, text,
           bank: Optional[External] = None, *, fi_params=None, fi_cfg=None) -> DetectResult:
  """Score a batch: images (B, S, S, 3) RGB in [0, 1], text (2, D).

  cfg: a tower or its config. valid: (B,) bool (each valid slot is a query and a reference, the
  paper's setting) or a `Roles`. bank: the external references of conf.references "bank" / "both"
  (`build_bank`, under the same settings). fi_params / fi_cfg: another tower for FiCLIP (DINOv2)
  while cfg's CLIP keeps SeCLIP; cfg may also be a tower without text alone (FiCLIP only: text is
  ignored, the map is FiCLIP's). `res.seclip_only` flags the queries that had no reference at any
  step (their map is P_a); a query that cannot have one from the roles alone also raises a
  SeCLIPOnlyWarning.
  """
  return Model.of(params, cfg, fi_params, fi_cfg).detect(conf, images, valid, text, bank)


def build_bank(params: dict, cfg, conf: FiSeConfig, images, valid=None, chunk: int = 8, *,
               fi_params=None, fi_cfg=None, content=None) -> External:
  """A known-good bank (DESIGN.md §5): K normal images (K, S, S, 3), RGB in [0, 1], encoded once,
  their feature maps kept on device as a value to pass to `detect` with references "bank" or
  "both". The bank records the settings it was built under; `detect` refuses other ones.

  Encoded `chunk` images at a time (the last chunk padded), so K is not limited by memory for
  activations, and one compile serves every K. content (K, S, S) bool: letterboxed images' own
  pixels (their padding never serves as a reference).
  """
  return Model.of(params, cfg, fi_params, fi_cfg).build_bank(conf, images, valid, chunk, content)


def empty_stream(cfg, conf: FiSeConfig, *, fi_cfg=None) -> External:
  """The ring buffer of a stream scored with a window of conf.stream_window images."""
  return Model.of(None, cfg, None, fi_cfg).empty_stream(conf)


def score_stream(params: dict, cfg, conf: FiSeConfig, images, roles: Roles, text,
                 ring: External, *, fi_params=None, fi_cfg=None) -> Tuple[DetectResult, External]:
  """One batch of a stream (DESIGN.md §5): (results, the ring after it).

  roles.position holds each slot's stream position; the stream images fill the first slots in
  order (padding after, reference flag off). Each image is compared with the conf.stream_window
  images before it, so results do not depend on how the stream is cut into batches. The ring
  passed in is consumed (its buffers are donated); keep the returned one.
  """
  return Model.of(params, cfg, fi_params, fi_cfg).score_stream(conf, images, roles, text, ring)


class ImageFeatures(NamedTuple):
  cls_embed: Optional[Array]          # (B, D) CLS embedding of the unmodified model (CLIP)
  layer_tokens: Array                 # (n_layers, B, 1 + HW, W) stream after each feature layer
  proxy_patch_embed: Optional[Array]  # (B, HW, D) SeCLIP patch embeddings, not normalized (CLIP)


def _encode_image(params, spec: Spec, images) -> ImageFeatures:
  with matmul_precision(spec.conf):
    feats = pipeline.encode(spec, Params(params, None) if spec.has_text else Params(None, params),
                            images)
    if not spec.has_text:
      return ImageFeatures(None, feats.layer_tokens, None)
    proxy = seclip.proxy_patch_embed(spec.text, params, spec.conf, feats.text, spec.attention_impl)
    return ImageFeatures(feats.text.cls_embed, feats.layer_tokens, proxy)


_encode_image_jit = jax.jit(_encode_image, static_argnums=1)


def encode_image(params: dict, cfg, images, feature_layers=(6, 12, 18, 24), proxy_layer: int = 12,
                 proxy_heads: str = "mean", proxy_attention: str = "layer",
                 compute_dtype: str = "float32", attention_impl: Optional[str] = None) -> ImageFeatures:
  """One pass of a tower with what both branches read (jit-compiled per shape and settings).

  images: (B, S, S, 3) NHWC, RGB in [0, 1]. For a text-aligned tower (CLIP): CLS embedding,
  feature layers and SeCLIP's patch embeddings; for another (DINOv2): the feature layers (the rest
  None).
  """
  conf = FiSeConfig(image_size=int(np.shape(images)[1]), feature_layers=tuple(feature_layers),
                    proxy_layer=int(proxy_layer), proxy_heads=proxy_heads,
                    proxy_attention=proxy_attention, compute_dtype=compute_dtype,
                    attention_impl=attention_impl)
  return _encode_image_jit(params, make_spec(cfg, conf), jnp.asarray(images, jnp.float32))

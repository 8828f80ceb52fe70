"""`Predictor`: a bundle in memory, scoring images of any size at one compiled batch (DESIGN.md §15).

The predictor does what the folder scorer does for one call's images, without files: each image
(a path, a PIL image or a uint8 array, any size and aspect) is read and resized as the loader
does, scored in batches of the bundle's size (a short batch padded: no call length recompiles;
references "batch" / "both" top it up with the call's earlier images, as the folder scorer does),
and its map comes back at the image's own size with the part's decision. In a stream (references
"rolling") each line id keeps its own ring of the parts before it, on the device, across calls.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from PIL import Image

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data import preprocess, tiles
from fiseclip_jax.deploy import bundle as bundle_lib
from fiseclip_jax.deploy.compile_cache import enable_compilation_cache
from fiseclip_jax.method import references
from fiseclip_jax.method.api import Model
from fiseclip_jax.models import catalog
from fiseclip_jax.outputs import decisions, overlays
from fiseclip_jax.run import sharding, towers
from fiseclip_jax.run.scoring import squashed_maps

DEFAULT_LINE = "default"


class Prediction(NamedTuple):
  """One image's result, at the image's own size (H, W)."""
  score: float
  label: Optional[int]              # 1 NG, 0 OK; None without an image threshold
  n_ref: int                        # references in the first filtering step
  seclip_only: bool                 # no reference at any step: SeCLIP alone
  map: np.ndarray                   # (H, W) float32 anomaly map
  mask: Optional[np.ndarray]        # (H, W) bool defect mask; None without a pixel threshold
  threshold: Optional[float]        # the image threshold the label used


def read_input(x, what: str = "image") -> Image.Image:
  """A path, a PIL image or a uint8 array (H, W) / (H, W, 3|4) as an 8-bit RGB PIL image."""
  if isinstance(x, (str, os.PathLike)):
    return preprocess.read_rgb(x)
  if isinstance(x, Image.Image):
    try:
      x.load()
      return preprocess.to_rgb(x)
    except (OSError, ValueError) as e:
      raise BadInputError(f"{what}: a PIL image that cannot be decoded as RGB ({e})") from None
  if isinstance(x, np.ndarray):
    if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)) \
        or min(x.shape[:2]) < 1:
      raise BadInputError(f"{what}: an array of shape {x.shape} and dtype {x.dtype}; expected uint8 "
                          "(H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
    return preprocess.to_rgb(Image.fromarray(x))
  raise BadInputError(f"{what}: a {type(x).__name__}; expected a file path, a PIL image or a uint8 "
                      "array")


class Predictor:
  """A detector in memory: `Predictor.load(bundle).predict(images)`."""

  def __init__(self, b: bundle_lib.Bundle, device=None):
    self.bundle = b
    self.conf: FiSeConfig = b.conf
    self.batch_size = b.batch_size
    self.class_name = b.class_name
    text_t, fi_t = b.towers["text"], b.towers.get("fi")
    model = Model.of(text_t.params, text_t.cfg, fi_t and fi_t.params, fi_t and fi_t.cfg)
    self.mesh = sharding.make_mesh([device or jax.local_devices()[0]])
    self.model = towers.on_mesh(model, self.mesh)
    self.spec = self.model.spec(self.conf)
    self.text = None if b.text is None else sharding.replicate(np.asarray(b.text), self.mesh)
    self.tiling, self.frame = tiling_of(b)
    self.bank, self.banks = None, None
    if b.bank is not None:
      steps = jax.numpy.asarray(b.bank, self.conf.compute_dtype)
      on = lambda x: sharding.replicate(references.bank(x, None, self.spec.built_under()),
                                        self.mesh)
      if self.tiling is None:
        self.bank = sharding.replicate(references.bank(
            steps, None, self.spec.built_under(), b.bank_padding), self.mesh)
      else:                                        # (T, S, G, K, N, C): one per tile position
        self.banks = [on(steps[t]) for t in range(steps.shape[0])]
    self.rings: Dict[str, references.External] = {}
    self.positions: Dict[str, int] = {}

  # ----------------------------------------------------------------------------------------------
  # Building, saving, loading.

  @classmethod
  def load(cls, path: str, weights: Optional[Dict[str, str]] = None,
           cache_dir: Optional[str] = None) -> "Predictor":
    """A predictor from a bundle file. weights: role ("text", "fi") -> checkpoint for towers the
    bundle references by sha256. cache_dir: JAX's persistent compilation cache (default
    `compile_cache.default_cache_dir()`; "" disables it), set before anything compiles."""
    enable_compilation_cache(cache_dir)
    return cls(bundle_lib.read_bundle(path, weights))

  @classmethod
  def build(cls, *, class_name: str, conf: FiSeConfig, cfg, weights: Optional[str] = None,
            fi_cfg=None, fi_weights: Optional[str] = None, model_name: str = "",
            normal_images: Sequence = (), batch_size: int = 8,
            threshold: Optional[float] = None, pixel_threshold: Optional[float] = None,
            threshold_from: Sequence = (), max_fpr: float = 0.01, max_pixel_fpr: float = 0.001,
            cache_dir: Optional[str] = None, tiling: Optional[tiles.Tiling] = None) -> "Predictor":
    """A predictor from checkpoints (weights None: random params of cfg, seeded 0), a class
    name, known-good images for the bank (conf.references "bank" / "both"), and thresholds:
    given, or set on known-good images `threshold_from` scored with the same references
    (the (1 - max_fpr) quantile of their scores and the (1 - max_pixel_fpr) one of their map
    values, DESIGN.md §13). tiling: score tiles of each image at its own size (DESIGN.md §17;
    with a bank, every image must have the bank images' size)."""
    if tiling is not None and conf.streaming:
      raise BadInputError("tiles are scored against the same tile of a batch or a bank; a "
                          "rolling bundle does not take them")
    if tiling is not None and conf.letterbox:
      raise BadInputError("tiles are cut at the image's own size and squashed; letterboxing is "
                          "for whole images: choose one")
    enable_compilation_cache(cache_dir)
    model = towers.load_model(cfg, weights, fi_cfg, fi_weights)
    tower_entries = {"text": bundle_lib.TowerEntry(
        (model.text or model.fi).cfg, model.params.text if model.has_text else model.params.fi,
        bundle_lib.tower_source(weights, model_name))}
    if model.has_text and model.fi is not None:
      tower_entries["fi"] = bundle_lib.TowerEntry(model.fi.cfg, model.params.fi,
                                                  bundle_lib.tower_source(fi_weights))
    text = None
    if model.has_text:
      text = np.asarray(towers.text_features(model, class_name, conf), np.float32)
    bank, names, frame, padding = None, (), None, None
    if conf.references in ("bank", "both") and not conf.streaming:
      if not normal_images:
        raise BadInputError(f"references {conf.references!r} needs known-good images "
                            "(normal_images)")
      read = [read_input(x, _name(x, f"normal image {i}")) for i, x in enumerate(normal_images)]
      if tiling is None:
        images, boxes = _model_inputs(read, conf)
        content = None if boxes is None else _content(boxes, conf.image_size)
        built = model.build_bank(conf, images, content=content)
        bank = np.asarray(built.feats, np.float32)
        if content is not None:                    # the padding: every step's mask alike
          padding = np.asarray(built.masks[0])
      else:
        frame = _one_size(read, normal_images, None, "the known-good images")
        bank = np.stack([np.asarray(model.build_bank(conf, _cut(read, box, conf.image_size)).feats,
                                    np.float32) for box in tiles.boxes(frame, tiling)])
      names = tuple(os.path.basename(os.fspath(x)) if isinstance(x, (str, os.PathLike))
                    else f"array {i}" for i, x in enumerate(normal_images))
    decision = {"image_threshold": threshold, "pixel_threshold": pixel_threshold,
                "how": "given" if threshold is not None or pixel_threshold is not None
                else "none: scores only"}
    meta = {}
    if tiling is not None:
      meta["tiles"] = {"tile": tiling.tile, "overlap": tiling.overlap,
                       "frame": list(frame) if bank is not None else None}
    b = bundle_lib.Bundle(conf, tower_entries, class_name, text, bank, names, decision,
                          int(batch_size), meta, padding)
    predictor = cls(b)
    if threshold_from:
      predictor.set_thresholds_from(threshold_from, max_fpr, max_pixel_fpr)
    return predictor

  def set_thresholds_from(self, good: Sequence, max_fpr: float, max_pixel_fpr: float) -> dict:
    """Thresholds from known-good images scored as this predictor scores (their own stream in
    rolling mode, left out of every line's ring)."""
    results = self._score_all(good, line=None, keep_model_maps=True)
    scores = np.array([r[0] for r in results], np.float32)
    maps = np.stack([r[4] for r in results])
    d = decisions.known_good(scores, maps, max_fpr, max_pixel_fpr,
                             f"{len(good)} known-good images scored with references "
                             f"{self.bundle.references}", "bundle")
    d["known_good"]["names"] = [os.path.basename(os.fspath(x)) if isinstance(x, (str, os.PathLike))
                                else f"array {i}" for i, x in enumerate(good)]
    d["known_good"]["scores_values"] = [float(s) for s in scores]
    self.bundle = self.bundle._replace(decision=d)
    return d

  def save(self, path: str, embed_weights: bool = True) -> int:
    """Write this predictor as a bundle (bytes written)."""
    return bundle_lib.write_bundle(path, self.bundle, embed_weights)

  # ----------------------------------------------------------------------------------------------
  # Scoring.

  @property
  def image_threshold(self) -> Optional[float]:
    return self.bundle.decision.get("image_threshold")

  @property
  def pixel_threshold(self) -> Optional[float]:
    return self.bundle.decision.get("pixel_threshold")

  def describe(self) -> dict:
    """What a service or a log says about this predictor."""
    return {"class_name": self.class_name, "references": self.bundle.references,
            "batch_size": self.batch_size, "image_size": self.conf.image_size,
            "bank_size": len(self.bundle.bank_names), "decision": self.bundle.decision,
            "tiles": self.bundle.meta.get("tiles"),
            "towers": {r: catalog.name_of(t.cfg) for r, t in self.bundle.towers.items()}}

  def predict(self, images: Sequence, line: Optional[str] = None) -> List[Prediction]:
    """Score images (paths, PIL images or uint8 arrays; any size) in order. line: the stream a
    rolling bundle scores them in (default "default"); ignored otherwise."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4):
      images = [images]
    out = []
    for score, n_ref, only, hw, m in self._score_all(images, line or DEFAULT_LINE):
      full = overlays.resize_map(m, hw)                                      # (H, W)
      t, t_px = self.image_threshold, self.pixel_threshold
      label = None if t is None else int(score >= t)
      mask = None
      if t_px is not None:
        part_t = decisions.part_pixel_threshold(score, t, t_px)
        mask = np.zeros(hw, bool) if part_t is None else full >= part_t
      out.append(Prediction(score, label, n_ref, only, full, mask, t))
    return out

  def score_resized(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Scores (n,) and maps at the model's size (n, S, S) of inputs already resized, (n, S, S, 3)
    float32 RGB in [0, 1], batched as `predict` batches them (not a stream): what an exported
    program is checked against."""
    if self.conf.streaming:
      raise BadInputError("score_resized scores batches; a rolling bundle scores a stream "
                          "(predict with a line)")
    if self.tiling is not None or self.conf.letterbox:
      raise BadInputError("score_resized scores whole images squashed to the model's size; this "
                          "bundle " + ("scores tiles of each image at its own size" if self.tiling
                                       else "letterboxes each image") + " (predict)")
    s = self.conf.image_size
    x = np.asarray(x, np.float32).reshape((-1, s, s, 3))
    raw = self._batches(x)
    maps = np.stack([m for *_, m in raw]) if raw else np.zeros((0, s, s), np.float32)
    return np.array([r[0] for r in raw], np.float32), maps.astype(np.float32)

  def reset(self, line: Optional[str] = None) -> None:
    """Forget a line's ring (all lines when None): its next part has no part before it."""
    for k in [line] if line is not None else list(self.rings):
      self.rings.pop(k, None)
      self.positions.pop(k, None)

  def _score_all(self, images: Sequence, line: Optional[str], keep_model_maps: bool = False):
    """(score, n_ref, seclip_only, (H, W), map) per image, in order: the map (S, S), or (H, W)
    when the bundle tiles."""
    read = [read_input(x, _name(x, f"image {i}")) for i, x in enumerate(images)]
    hws = [(img.size[1], img.size[0]) for img in read]
    if self.tiling is not None:
      return self._tiled(read, images)
    x, boxes = _model_inputs(read, self.conf)
    if self.conf.streaming:
      raw = self._stream(x, line, boxes)
    else:
      raw = self._batches(x, boxes=boxes)
    return [(float(s), int(n), bool(o), hw, m) for (s, n, o, m), hw in zip(raw, hws)]

  def _tiled(self, read: List[Image.Image], images: Sequence):
    """Each tile position of the call's images scored as a call of its own (the same tile of
    the other images, and of the bank, its references); per image the maximum score over its
    tiles, the fewest references, SeCLIP alone if any tile was, the maps blended (§17)."""
    if not read:
      return []
    hw = _one_size(read, images, self.frame, "a tiled bundle's images")
    parts = [self._batches(_cut(read, box, self.conf.image_size),
                           None if self.banks is None else self.banks[t])
             for t, box in enumerate(tiles.boxes(hw, self.tiling))]
    out = []
    for i in range(len(read)):
      mine = [p[i] for p in parts]
      out.append((max(float(r[0]) for r in mine), min(int(r[1]) for r in mine),
                  any(bool(r[2]) for r in mine), hw,
                  tiles.stitch([r[3] for r in mine], hw, self.tiling, overlays.resize_map)))
    return out

  def _batches(self, x: np.ndarray, bank=None, boxes: Optional[np.ndarray] = None):
    """Batches of B with the folder scorer's top-up (references batch / both) from the call's
    first images; padding slots have no role. bank: a tile position's (default: the bank);
    boxes (n, 4): letterboxed images' content boxes (None: squashed)."""
    bank = self.bank if bank is None else bank
    b, n = self.batch_size, len(x)
    top_up = references.uses_batch_pairs(self.conf)
    out = []
    for start in range(0, n, b):
      imgs = np.zeros((b,) + x.shape[1:], np.float32)
      k = min(b, n - start)
      imgs[:k] = x[start:start + k]
      query = np.arange(b) < k
      reference = query.copy()
      take = list(range(start, start + k))
      if top_up and k < b:
        others = [i for i in range(n) if not start <= i < start + k][:b - k]
        for slot, i in zip(range(k, b), others):
          imgs[slot], reference[slot] = x[i], True
        take += others
      slot_boxes = _slot_boxes(boxes, take, b, x.shape[1])
      content = None if slot_boxes is None else _content(slot_boxes, x.shape[1])[None]
      roles = references.Roles(query[None], reference[None], np.arange(b, dtype=np.int32)[None],
                               content)
      res = sharding.detect_round(self.mesh, self.model, self.conf, imgs[None], roles, self.text,
                                  bank)
      got = [np.asarray(getattr(res, f))[0] for f in ("image_scores", "n_ref", "seclip_only",
                                                         "anomaly_maps")]
      got[3] = squashed_maps(got[3], slot_boxes)
      out.extend(zip(*(g[:k] for g in got)))
    return out

  def _stream(self, x: np.ndarray, line: Optional[str], boxes: Optional[np.ndarray] = None):
    """A line's stream: batches of B through its ring (line None: a throwaway stream)."""
    ring = self.rings.get(line) if line is not None else None
    ring = self.model.empty_stream(self.conf) if ring is None else ring
    pos = self.positions.get(line, 0) if line is not None else 0
    b, n, out = self.batch_size, len(x), []
    for start in range(0, n, b):
      k = min(b, n - start)
      imgs = np.zeros((b,) + x.shape[1:], np.float32)
      imgs[:k] = x[start:start + k]
      valid = np.arange(b) < k
      slot_boxes = _slot_boxes(boxes, list(range(start, start + k)), b, x.shape[1])
      content = None if slot_boxes is None else _content(slot_boxes, x.shape[1])
      roles = references.Roles(valid, valid.copy(), (pos + np.arange(b)).astype(np.int32),
                               content)
      res, ring = self.model.score_stream(self.conf, imgs, roles, self.text, ring)
      pos += k
      got = [np.asarray(getattr(res, f)) for f in ("image_scores", "n_ref", "seclip_only",
                                                      "anomaly_maps")]
      got[3] = squashed_maps(got[3], slot_boxes)
      out.extend(zip(*(g[:k] for g in got)))
    if line is not None:
      self.rings[line], self.positions[line] = ring, pos
    return out


def tiling_of(b: bundle_lib.Bundle) -> Tuple[Optional[tiles.Tiling], Optional[Tuple[int, int]]]:
  """A bundle's tiles (None: whole images) and the (H, W) its bank's frames fix (None: any)."""
  t = b.meta.get("tiles")
  if not t:
    return None, None
  return tiles.Tiling(int(t["tile"]), int(t["overlap"])), (tuple(t["frame"]) if t.get("frame")
                                                           else None)


def _name(x, default: str) -> str:
  return os.fspath(x) if isinstance(x, (str, os.PathLike)) else default


def _one_size(read: List[Image.Image], images: Sequence, frame, what: str) -> Tuple[int, int]:
  """The one (H, W) of the images (frame: the one they must have), else one error naming one."""
  want = tuple(frame) if frame is not None else (read[0].size[1], read[0].size[0])
  for i, img in enumerate(read):
    if (img.size[1], img.size[0]) != want:
      raise BadInputError(f"{_name(images[i], f'image {i}')} is {img.size[0]}x{img.size[1]} (WxH); "
                          f"{what} are tiled in the same places, so each must be "
                          f"{want[1]}x{want[0]}")
  return want


def _cut(read: List[Image.Image], box, size: int) -> np.ndarray:
  """(n, S, S, 3) inputs of one tile of each image."""
  return np.stack([preprocess.preprocess_image(preprocess.crop(img, box), size) for img in read])


def _model_inputs(read: List[Image.Image], conf: FiSeConfig):
  """(n, S, S, 3) inputs of decoded images, squashed or letterboxed as conf says, and the
  letterboxed content boxes (n, 4) (None when squashed)."""
  size = conf.image_size
  if not read:
    return np.zeros((0, size, size, 3), np.float32), None
  if not conf.letterbox:
    return np.stack([preprocess.preprocess_image(img, size) for img in read]), None
  boxed = [preprocess.letterbox_rgb(img, size) for img in read]
  return (np.stack([preprocess.to_unit(np.asarray(img)) for img, _ in boxed]),
          np.array([box for _, box in boxed], np.int64))


def _slot_boxes(boxes: Optional[np.ndarray], take: List[int], b: int,
                size: int) -> Optional[np.ndarray]:
  """(B, 4) content boxes of a batch's slots (images `take` first; the rest whole squares)."""
  if boxes is None:
    return None
  out = np.tile(np.array([0, 0, size, size], np.int64), (b, 1))
  out[:len(take)] = boxes[take]
  return out


def _content(boxes: np.ndarray, size: int) -> np.ndarray:
  return np.stack([preprocess.content_mask(tuple(bx), size) for bx in boxes])

"""The scoring loop the evaluation programs and the folder scorer share (DESIGN.md §5, §11).

Samples become fixed-shape batches that carry each sample's index; a short last batch is topped
up with reference-only images of the same category (so every query has B - 1 candidates); rounds
of one batch per device go through the sharded scorer; a stream goes batch by batch through the
ring buffer on one device. Per-image results come back as arrays, in the order scored.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from fiseclip_jax import data
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data import Batch, Sample
from fiseclip_jax.method import references
from fiseclip_jax.method.api import Model
from fiseclip_jax.run import sharding


class BatchResult(NamedTuple):
  """Host copies of one batch's results; rows of slots that are not queries are meaningless."""
  batch: Batch
  query: np.ndarray          # (B,) bool: the slots whose results count
  reference: np.ndarray      # (B,) bool: the slots that served as references (top-up included)
  scores: np.ndarray         # (B,)
  maps: np.ndarray           # (B, S, S)
  n_ref: np.ndarray          # (B,)
  seclip_only: np.ndarray    # (B,) bool
  n_candidates: np.ndarray   # (B,) candidate references before any mask
  embeds: np.ndarray         # (B, D) image-level embeddings (RsCIN's neighbourhoods)

  @property
  def no_candidates(self) -> np.ndarray:
    """(B,) bool: no candidate reference at all (DESIGN.md §5, no reference)."""
    return self.n_candidates == 0


@dataclasses.dataclass
class Scored:
  """Per-image results of a set of samples (this process's share until `gather`ed)."""
  index: np.ndarray                 # (n,) position of each image in the sample list
  labels: np.ndarray                # (n,)
  scores: np.ndarray                # (n,)
  n_ref: np.ndarray                 # (n,) references in the first filtering step
  seclip_only: np.ndarray           # (n,) bool: no reference at any step
  no_candidates: np.ndarray         # (n,) bool: no candidate reference at all
  maps: Optional[np.ndarray] = None    # (n, S, S) float32 when kept
  masks: Optional[np.ndarray] = None   # (n, S, S) bool when kept
  embeds: Optional[np.ndarray] = None  # (n, D) image-level embeddings (RsCIN, DESIGN.md §18)
  skipped: List[str] = dataclasses.field(default_factory=list)   # unreadable images (paths)

  def gather(self) -> "Scored":
    """Multi-host: every process's images on every process (one process: unchanged)."""
    g = lambda x: None if x is None else sharding.gather_rows(x)
    return dataclasses.replace(
        self, index=g(self.index), labels=g(self.labels), scores=g(self.scores),
        n_ref=g(self.n_ref), seclip_only=g(self.seclip_only), no_candidates=g(self.no_candidates),
        maps=g(self.maps), masks=g(self.masks), embeds=g(self.embeds))

  def sorted(self) -> "Scored":
    """Rows in sample-list order."""
    order = np.argsort(self.index, kind="stable")
    take = lambda x: None if x is None else x[order]
    return dataclasses.replace(self, **{f.name: take(getattr(self, f.name))
                                        for f in dataclasses.fields(self) if f.name != "skipped"})

  def seclip_only_counts(self) -> dict:
    """SeCLIP-only images by reason (DESIGN.md §5)."""
    no_cand = int((self.seclip_only & self.no_candidates).sum())
    return {"total": int(self.seclip_only.sum()), "no_candidates": no_cand,
            "all_masked": int(self.seclip_only.sum()) - no_cand}


class Collector:
  """Accumulates the query rows of batch results."""

  def __init__(self, keep_maps: bool, keep_masks: bool):
    self.keep_maps, self.keep_masks = keep_maps, keep_masks
    self.rows = {k: [] for k in ("index", "labels", "scores", "n_ref", "seclip_only",
                                 "no_candidates", "maps", "masks", "embeds")}

  def add(self, r: BatchResult) -> None:
    q = r.query
    self.rows["index"].append(r.batch.index[q])
    self.rows["labels"].append(r.batch.labels[q])
    self.rows["scores"].append(r.scores[q])
    self.rows["n_ref"].append(r.n_ref[q])
    self.rows["seclip_only"].append(r.seclip_only[q])
    self.rows["no_candidates"].append(r.no_candidates[q])
    self.rows["embeds"].append(r.embeds[q])
    if self.keep_maps:
      self.rows["maps"].append(r.maps[q])
    if self.keep_masks and r.batch.masks is not None:
      self.rows["masks"].append(r.batch.masks[q])

  def result(self, hw, skipped: List[str]) -> Scored:
    """The rows so far; hw: a map's (H, W), the shape of empty maps and masks."""
    def cat(key, shape, dtype):
      xs = self.rows[key]
      return np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)
    return Scored(
        index=cat("index", (0,), np.int64), labels=cat("labels", (0,), np.int32),
        scores=cat("scores", (0,), np.float32), n_ref=cat("n_ref", (0,), np.int32),
        seclip_only=cat("seclip_only", (0,), bool), no_candidates=cat("no_candidates", (0,), bool),
        maps=cat("maps", (0, *hw), np.float32) if self.keep_maps else None,
        masks=cat("masks", (0, *hw), bool) if self.keep_masks else None,
        embeds=np.concatenate(self.rows["embeds"]).astype(np.float32) if self.rows["embeds"]
        else None, skipped=skipped)


def skip_recorder(skipped: List[str], also: Optional[Callable]) -> Callable:
  """on_skip that also appends the skipped image's path to `skipped`."""
  def record(path, err):
    skipped.append(path)
    if also is not None:
      also(path, err)
  return record


def top_up(batch: Batch, pool: Sequence[Sample], image_size: int, skip_bad_images: bool,
           on_skip: Optional[Callable] = None, letterbox: bool = False) -> np.ndarray:
  """Fill a short batch's empty slots with reference-only images (DESIGN.md §5, top-up).

  The images are the first of `pool` (the category's sample list, in scoring order) that are not
  in the batch: already scored in an earlier batch, and the same whatever the number of devices or
  processes. Returns the reference flags (B,); the batch's images are filled in place and each
  filled slot's `index` is its image's position in `pool`.
  """
  reference = batch.valid.copy()
  free = np.flatnonzero(~batch.valid)
  taken = set(int(i) for i in batch.index[batch.valid])
  candidates = (i for i in range(len(pool)) if i not in taken)
  for slot in free:
    for i in candidates:
      try:
        if letterbox:
          batch.images[slot], batch.boxes[slot] = data.load_sample(pool[i], image_size, True)
        else:
          batch.images[slot] = data.load_sample(pool[i], image_size)
      except BadInputError as err:
        if not skip_bad_images:
          raise
        if on_skip is not None:
          on_skip(pool[i].path, err)
        continue
      reference[slot] = True
      batch.index[slot] = i
      break
  return reference


def batch_roles(batch: Batch, reference: np.ndarray, position: Optional[np.ndarray] = None):
  """A batch's roles: its valid slots are queries, `reference` its reference flags."""
  position = np.arange(len(batch.valid), dtype=np.int32) if position is None else position
  return references.Roles(batch.valid.copy(), reference, position.astype(np.int32),
                          batch.content())


def stack_roles(roles: Sequence[references.Roles]) -> references.Roles:
  """A round's roles (n, B, ...) from each batch's (content stays None when squashed)."""
  return references.Roles(*(None if x[0] is None else np.stack(x) for x in zip(*roles)))


def squashed_maps(maps: np.ndarray, boxes: Optional[np.ndarray]) -> np.ndarray:
  """A batch's maps (B, S, S) in the squashed geometry: letterboxed ones (boxes given) cut to
  their content and resized (DESIGN.md §2), so every consumer reads them alike."""
  if boxes is None:
    return maps
  return np.stack([data.unletterbox(m, tuple(b)) for m, b in zip(maps, boxes)])


def host_results(out, round_batches, round_roles, stacked: bool = True) -> List[BatchResult]:
  """Split a round's device outputs (n, B, ...) (one batch's (B, ...) if not stacked) into
  per-batch host results."""
  fields = ("image_scores", "anomaly_maps", "n_ref", "seclip_only", "n_candidates", "image_embed")
  host = {f: np.asarray(getattr(out, f)) for f in fields}
  if not stacked:
    host = {f: v[None] for f, v in host.items()}
  return [BatchResult(b, np.asarray(r.query), np.asarray(r.reference), host["image_scores"][j],
                      squashed_maps(host["anomaly_maps"][j], b.boxes), host["n_ref"][j],
                      host["seclip_only"][j], host["n_candidates"][j], host["image_embed"][j])
          for j, (b, r) in enumerate(zip(round_batches, round_roles))]


def rounds_of(batches: Iterable[Batch], n_dev: int) -> Iterator[List[Batch]]:
  """The batches in rounds of n_dev (one per device), the last round possibly short."""
  pending: List[Batch] = []
  for batch in batches:
    pending.append(batch)
    if len(pending) == n_dev:
      yield pending
      pending = []
  if pending:
    yield pending


def score_samples(samples: Sequence[Sample], *, model: Model, conf, text, mesh, batch_size: int,
                  indices: Optional[Sequence[int]] = None, bank=None,
                  top_up_pool: Optional[Sequence[Sample]] = None, with_masks: bool = False,
                  keep_maps: bool = False, skip_bad_images: bool = False,
                  on_batch: Optional[Callable[[BatchResult], None]] = None,
                  on_progress: Optional[Callable[[int], None]] = None,
                  on_skip: Optional[Callable[[str, Exception], None]] = None) -> Scored:
  """Score samples in batches of `batch_size`, one batch per device per round.

  indices: each sample's position in its category list (default 0..n-1); top_up_pool: the
  category's list, to top short batches up from (None: padding only); bank: replicated external
  references (conf.references "bank" / "both"); on_batch: called with each batch's results as soon
  as they are on the host; on_progress: called with the number of images done; on_skip: called
  with each unreadable image skipped (skip_bad_images).
  """
  n_dev = mesh.devices.size
  size = conf.image_size
  skipped: List[str] = []
  on_skip = skip_recorder(skipped, on_skip)
  collect = Collector(keep_maps, with_masks and keep_maps)
  batches = data.iter_batches(samples, batch_size, size, with_masks=with_masks,
                              skip_bad_images=skip_bad_images, on_skip=on_skip, indices=indices,
                              letterbox=conf.letterbox)
  use_top_up = top_up_pool is not None and references.uses_batch_pairs(conf)
  done = 0

  def flush(round_batches: List[Batch]) -> int:
    roles = []
    for b in round_batches:
      reference = b.valid.copy()
      if use_top_up and not b.valid.all():
        reference = top_up(b, top_up_pool, size, skip_bad_images, on_skip, conf.letterbox)
      roles.append(batch_roles(b, reference))
    stacked = stack_roles(roles)
    images, stacked = sharding.pad_round(np.stack([b.images for b in round_batches]), stacked, n_dev)
    out = sharding.detect_round(mesh, model, conf, images, stacked, text, bank)
    results = host_results(out, round_batches, roles)
    for r in results:
      collect.add(r)
      if on_batch is not None:
        on_batch(r)
    return sum(int(r.query.sum()) for r in results)

  for round_batches in rounds_of(batches, n_dev):
    done += flush(round_batches)
    if on_progress is not None:
      on_progress(done)
  return collect.result((size, size), skipped)


def score_stream_samples(samples: Sequence[Sample], *, model: Model, conf, text, batch_size: int,
                         indices: Optional[Sequence[int]] = None,
                         skip_bad_images: bool = False,
                         on_batch: Optional[Callable[[BatchResult], None]] = None,
                         on_progress: Optional[Callable[[int], None]] = None,
                         on_skip: Optional[Callable[[str, Exception], None]] = None,
                         keep_maps: bool = False) -> Scored:
  """A stream (DESIGN.md §5): samples in stream order, each scored against the conf.stream_window
  images before it, `batch_size` images per accelerator call on one device. Results do not depend
  on `batch_size`."""
  skipped: List[str] = []
  on_skip = skip_recorder(skipped, on_skip)
  collect = Collector(keep_maps, False)
  ring = model.empty_stream(conf)
  position = 0          # stream position: readable images in order (skipped ones take none)
  done = 0
  for b in data.iter_batches(samples, batch_size, conf.image_size, with_masks=False,
                             skip_bad_images=skip_bad_images, on_skip=on_skip, indices=indices,
                             letterbox=conf.letterbox):
    n = int(b.valid.sum())
    roles = batch_roles(b, b.valid.copy(), position + np.arange(len(b.valid)))
    out, ring = model.score_stream(conf, b.images, roles, text, ring)
    position += n
    r = host_results(out, [b], [roles], stacked=False)[0]
    collect.add(r)
    if on_batch is not None:
      on_batch(r)
    done += n
    if on_progress is not None:
      on_progress(done)
  return collect.result((conf.image_size,) * 2, skipped)


def score(samples: Sequence[Sample], *, model: Model, conf, text, mesh, batch_size: int,
          bank=None, top_up_pool: Optional[Sequence[Sample]] = None, **common) -> Scored:
  """The scorer the config asks for, chosen once: a stream (conf.stream_window > 0) through its
  ring on the mesh's first device, else rounds of batches over the mesh with the bank and top-up.
  common: the keyword arguments both take (indices, skip_bad_images, on_batch, on_progress,
  on_skip, keep_maps)."""
  if conf.streaming:
    return score_stream_samples(samples, model=model, conf=conf, text=text, batch_size=batch_size,
                                **common)
  return score_samples(samples, model=model, conf=conf, text=text, mesh=mesh,
                       batch_size=batch_size, bank=bank, top_up_pool=top_up_pool, **common)

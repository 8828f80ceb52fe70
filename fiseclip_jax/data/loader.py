"""Fixed-shape batches from a list of samples, decoded by a few threads ahead of the caller.

Every batch has exactly `batch_size` slots (DESIGN.md §8): the last one is padded with
zeros and `valid=False`, so the jitted model compiles once. PIL releases the GIL while it decodes
and resizes, so a small thread pool keeps the next batches ready while the accelerator works on
the current one. The order of the output does not depend on thread timing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fiseclip_jax.data.datasets import Sample
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.preprocess import (content_mask, crop, letterbox_rgb, load_mask,
                                          preprocess_image, read_rgb, to_rgb, to_unit)

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
  """One fixed-shape batch.

  images (B, S, S, 3) float32 RGB in [0, 1] (zeros in padded slots); valid (B,) bool; labels (B,)
  int32 (1 defect, 0 good, -1 unknown or padded); masks (B, S, S) bool (all False for good,
  unlabeled and padded slots), or None when masks were not asked for; samples: the Sample of each
  slot, None for padded slots; index (B,) int64: each slot's position in the caller's sample list
  (`indices` of `iter_batches`), -1 for padded slots (a slot the scorer tops up takes its image's).
  boxes (B, 4) int64: letterboxed images' content boxes (top, left, height, width; padded slots
  the whole square), None when images are squashed.
  """
  images: np.ndarray
  valid: np.ndarray
  labels: np.ndarray
  masks: Optional[np.ndarray]
  samples: List[Optional[Sample]]
  index: np.ndarray
  boxes: Optional[np.ndarray] = None

  def content(self) -> Optional[np.ndarray]:
    """(B, S, S) bool: each slot's own pixels (letterboxed), None when squashed."""
    if self.boxes is None:
      return None
    size = self.images.shape[1]
    return np.stack([content_mask(tuple(b), size) for b in self.boxes])


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """A decoded sample, or the error that made its image unreadable."""
  sample: Sample
  index: int
  image: Optional[np.ndarray] = None
  mask: Optional[np.ndarray] = None
  error: Optional[BadInputError] = None
  box: Optional[Tuple[int, int, int, int]] = None     # letterboxed: the content box


def sample_mask(sample: Sample, size: Optional[int], image_hw: Tuple[int, int]) -> np.ndarray:
  """The bool ground truth of a sample (its box of it), (size, size), or the box's (or image's)
  own (height, width) when size is None: all False unless it is defective."""
  if sample.label != 1:
    shape = (size, size) if size is not None else (
        tuple(image_hw) if sample.box is None else tuple(sample.box[2:]))
    return np.zeros(shape, bool)
  if sample.mask_path is None:
    raise BadInputError(f"defective image {sample.path} has no mask path; pass with_masks=False "
                        "to score it without ground truth")
  return load_mask(sample.mask_path, size, sample.path, image_hw, sample.box)


def sample_input(sample: Sample, rgb, image_size: int, letterbox: bool = False):
  """The towers' input (image_size, image_size, 3) of a sample from its decoded image: its box
  (a tile) or all of it, squashed; letterbox: (input, content box) of it letterboxed."""
  rgb = crop(rgb, sample.box)
  if not letterbox:
    return preprocess_image(rgb, image_size)
  img, box = letterbox_rgb(to_rgb(rgb), image_size)
  return to_unit(np.asarray(img)), box


def load_sample(sample: Sample, image_size: int, letterbox: bool = False):
  """Reads a sample's image and returns its towers' input (`sample_input`)."""
  return sample_input(sample, read_rgb(sample.path), image_size, letterbox)


def _decode(item: Tuple[int, Sample], image_size: int, with_masks: bool,
            letterbox: bool = False) -> _Decoded:
  """Decodes one (index, sample). An unreadable image is returned as data (it may be skipped); a
  bad mask raises (the ground truth is wrong, skipping would bias the metrics)."""
  index, sample = item
  try:
    rgb = read_rgb(sample.path)
  except BadInputError as err:
    return _Decoded(sample, index, error=err)
  image, box = sample_input(sample, rgb, image_size, letterbox) if letterbox else (
      sample_input(sample, rgb, image_size), None)
  mask = sample_mask(sample, image_size, (rgb.height, rgb.width)) if with_masks else None
  return _Decoded(sample, index, image, mask, box=box)


def _decoded_in_order(samples: Sequence, decode: Callable[..., _Decoded],
                      num_workers: int, window: int) -> Iterator[_Decoded]:
  """Yields decode(s) for each sample in order, with up to `window` decodes in flight."""
  if num_workers <= 0:
    yield from map(decode, samples)
    return
  todo = iter(samples)
  with concurrent.futures.ThreadPoolExecutor(num_workers, "fiseclip-data") as pool:
    pending = collections.deque(pool.submit(decode, s) for s in itertools.islice(todo, window))
    try:
      while pending:
        done = pending.popleft().result()
        for s in itertools.islice(todo, 1):
          pending.append(pool.submit(decode, s))
        yield done
    finally:
      for future in pending:
        future.cancel()


def _assemble(slots: List[_Decoded], batch_size: int, image_size: int,
              with_masks: bool, letterbox: bool = False) -> Batch:
  """Stacks decoded samples into a batch of `batch_size` slots, padding the rest."""
  shape = (batch_size, image_size, image_size)
  images = np.zeros(shape + (3,), np.float32)
  valid = np.zeros(batch_size, bool)
  labels = np.full(batch_size, -1, np.int32)
  masks = np.zeros(shape, bool) if with_masks else None
  samples: List[Optional[Sample]] = [None] * batch_size
  index = np.full(batch_size, -1, np.int64)
  boxes = np.tile(np.array([0, 0, image_size, image_size], np.int64), (batch_size, 1)) \
      if letterbox else None
  for i, d in enumerate(slots):
    images[i], valid[i], labels[i], samples[i] = d.image, True, d.sample.label, d.sample
    index[i] = d.index
    if masks is not None:
      masks[i] = d.mask
    if boxes is not None:
      boxes[i] = d.box
  return Batch(images, valid, labels, masks, samples, index, boxes)


def iter_batches(samples: Iterable[Sample], batch_size: int, image_size: int,
                 with_masks: bool = True, num_workers: int = 4, skip_bad_images: bool = False,
                 on_skip: Optional[Callable[[str, BadInputError], None]] = None,
                 prefetch_batches: int = 2,
                 indices: Optional[Sequence[int]] = None,
                 letterbox: bool = False) -> Iterator[Batch]:
  """Yields batches of exactly `batch_size` slots, in the order of `samples`.

  Args:
    samples: what to load (e.g. from `mvtec_samples`).
    batch_size: slots per batch; the last batch is padded (valid=False, zeros, label -1).
    image_size: S, the side every image (and mask) is resized to.
    with_masks: also load ground-truth masks (defective samples must have one).
    num_workers: decoding threads; 0 decodes in the calling thread, without prefetch.
    skip_bad_images: an unreadable image is reported to `on_skip` (logged when there is none) and
      replaced by the next readable one (batches stay full); otherwise it raises BadInputError
      naming the file.
    on_skip: called as on_skip(path, error) for each skipped image.
    prefetch_batches: batches decoded ahead of the one the caller holds (at least 1 with threads).
    indices: each sample's position in the caller's own list (default 0, 1, ...), carried by the
      batches so results map back to samples without identity tricks.
    letterbox: letterbox images instead of squashing them (masks are still squashed: the maps of
      a letterboxed run come back in the squashed geometry); the batches carry the content boxes.

  Raises:
    BadInputError: an unreadable image (unless skipped), a missing, unreadable or mis-sized mask.
  """
  if batch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
  decode = functools.partial(_decode, image_size=image_size, with_masks=with_masks,
                             letterbox=letterbox)
  window = batch_size * max(1, prefetch_batches)  # in flight once the current batch is full
  slots: List[_Decoded] = []
  samples = list(samples)
  indices = range(len(samples)) if indices is None else list(indices)
  if len(indices) != len(samples):
    raise ValueError(f"{len(indices)} indices for {len(samples)} samples")
  items = list(zip(indices, samples))
  with contextlib.closing(_decoded_in_order(items, decode, num_workers, window)) as stream:
    for d in stream:
      if d.error is not None:
        if not skip_bad_images:
          raise d.error
        if on_skip is None:
          _LOG.warning("skipping unreadable image %s: %s", d.sample.path, d.error)
        else:                                   # the caller reports it (once)
          on_skip(d.sample.path, d.error)
        continue
      slots.append(d)
      if len(slots) == batch_size:
        yield _assemble(slots, batch_size, image_size, with_masks, letterbox)
        slots = []
  if slots:
    yield _assemble(slots, batch_size, image_size, with_masks, letterbox)

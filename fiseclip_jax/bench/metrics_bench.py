"""The metrics' own timing: pixel and image metrics on random maps with blob masks."""
from __future__ import annotations

import time

import numpy as np

from fiseclip_jax.outputs import metrics


def blob_masks(rng, n: int, size: int):
  """(n, size, size) bool: about half the images hold 1-3 discs, the rest are normal."""
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((n, size, size), bool)
  for i in range(n):
    if i % 2 == 0:
      continue
    for _ in range(rng.randint(1, 4)):
      cy, cx = rng.randint(0, size, 2)
      r = rng.uniform(0.02, 0.12) * size
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  return masks


def metrics_bench(n: int = 150, size: int = 518, seed: int = 0) -> dict:
  """Seconds of pixel_metrics on n random size x size float32 maps with blob masks, and of
  image_metrics on the n per-image labels and max scores (data generation not timed)."""
  rng = np.random.RandomState(seed)
  masks = blob_masks(rng, n, size)
  maps = (rng.random_sample(masks.shape) + 0.5 * masks).astype(np.float32)
  t = time.perf_counter()
  pix = metrics.pixel_metrics(masks, maps)
  pixel_s = time.perf_counter() - t
  labels, scores = masks.reshape(n, -1).any(1), maps.reshape(n, -1).max(1)
  t = time.perf_counter()
  img = metrics.image_metrics(labels, scores)
  image_s = time.perf_counter() - t
  return {"n_maps": n, "size": size, "pixels": int(masks.size), "pixel_metrics_s": pixel_s,
          "image_metrics_s": image_s, "pixel_metrics": pix, "image_metrics": img}

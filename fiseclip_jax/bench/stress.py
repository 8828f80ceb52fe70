"""The repeated-defect stress benchmark (DESIGN.md §16): how many copies of one defect a batch
survives before its images reference each other's defect and it fades from the maps.

One real defect (the pixels of a ground-truth region, at the model's size) is pasted into k of B
known-good images, at its own place in each or at a random place in each; the batch is scored
with each reference mode and aggregation; the pasted pixels' AUROC (all B maps pooled) and the
image AUROC of the k pasted images against the B - k clean ones are reported.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import numpy as np

from fiseclip_jax.bench.stress_config import StressConfig
from fiseclip_jax.outputs import metrics


class Defect(NamedTuple):
  pixels: np.ndarray          # (S, S, 3) float32: the defective image at the model's size
  mask: np.ndarray            # (S, S) bool: its ground-truth region


def shifts(mask: np.ndarray, k: int, placement: str, rng: np.random.RandomState) -> List[Tuple[int, int]]:
  """(dy, dx) of each of k copies: (0, 0) for "same"; for "random" a shift that keeps the
  region's bounding box inside the image, drawn uniformly."""
  if placement == "same":
    return [(0, 0)] * k
  ys, xs = np.nonzero(mask)
  s_h, s_w = mask.shape
  return [(int(rng.randint(-ys.min(), s_h - ys.max())), int(rng.randint(-xs.min(), s_w - xs.max())))
          for _ in range(k)]


def paste(base: np.ndarray, defect: Defect, shift: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """base (S, S, 3) with the defect's region copied in at its place moved by shift: (image, mask)."""
  dy, dx = shift
  ys, xs = np.nonzero(defect.mask)
  out, gt = base.copy(), np.zeros(defect.mask.shape, bool)
  out[ys + dy, xs + dx] = defect.pixels[ys, xs]
  gt[ys + dy, xs + dx] = True
  return out, gt


def stressed_batch(goods: np.ndarray, defect: Defect, k: int, placement: str, seed: int):
  """(images (B, S, S, 3), masks (B, S, S), carriers (B,) bool): k of the B images, chosen at
  random, carry a copy."""
  rng = np.random.RandomState(seed)
  b = goods.shape[0]
  carriers = np.zeros(b, bool)
  carriers[rng.choice(b, k, replace=False)] = True
  images, masks = goods.copy(), np.zeros(goods.shape[:3], bool)
  for slot, shift in zip(np.nonzero(carriers)[0], shifts(defect.mask, k, placement, rng)):
    images[slot], masks[slot] = paste(goods[slot], defect, shift)
  return images, masks, carriers


def run(model, conf, text, goods: np.ndarray, bank_images: np.ndarray, defect: Defect,
        sc: StressConfig, log=print) -> List[dict]:
  """Every (references, aggregation, placement, k) cell: its metrics and per-image scores."""
  rows = []
  # A bank is bound to the towers and the features (`Spec.built_under`), not to the reference
  # mode or the aggregation: one serves every cell.
  bank = None
  if {"bank", "both"} & set(sc.references):
    bank = model.build_bank(conf.replace(references="both"), bank_images)
  for refs in sc.references:
    for agg in sc.ref_aggs:
      c = conf.replace(references=refs, ref_agg=agg)
      for placement in sc.placements:
        for k in sc.repeats:
          images, masks, carriers = stressed_batch(goods, defect, k, placement, sc.seed + k)
          res = model.detect(c, images, np.ones(len(images), bool), text,
                             bank if refs in ("bank", "both") else None)
          maps = np.asarray(res.anomaly_maps, np.float32)
          scores = np.asarray(res.image_scores, np.float64)
          row = {"references": refs, "ref_agg": agg, "placement": placement, "k": k,
                 "batch_size": len(images),
                 "pixel_auroc": metrics.pixel_metrics(masks, maps)["auroc"],
                 "image_auroc": metrics.image_metrics(carriers.astype(int), scores)["auroc"],
                 "scores": [float(s) for s in scores], "carriers": carriers.tolist()}
          rows.append(row)
          log(f"{refs:<6} {agg:<8} {placement:<6} k={k:<2} pixel AUROC {row['pixel_auroc']:.3f}  "
              f"image AUROC {row['image_auroc']:.3f}")
  return rows


def markdown(rows: List[dict]) -> str:
  """The table: one row per (references, aggregation, placement), one column pair per k."""
  ks = sorted({r["k"] for r in rows})
  head = "| references | aggregation | placement | " + " | ".join(f"k={k}" for k in ks) + " |"
  lines = [head, "|" + "---|" * (3 + len(ks))]
  keys = []
  for r in rows:
    key = (r["references"], r["ref_agg"], r["placement"])
    if key not in keys:
      keys.append(key)
  for key in keys:
    cells = {r["k"]: r for r in rows if (r["references"], r["ref_agg"], r["placement"]) == key}
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
        f"{cells[k]['pixel_auroc']:.3f} / {cells[k]['image_auroc']:.3f}" if k in cells else "-"
        for k in ks) + " |")
  return "\n".join(lines) + "\n"

"""Image and pixel metrics (AUROC, F1-max, AP, AU-PRO): exact, NumPy/SciPy only, memory-lean.

Every curve quantity is a count of scores on one side of a threshold, so everything is computed from
the sorted scores of the positives and of the negatives (two `np.sort`s and `np.searchsorted`): no
binning, no argsort, no per-threshold pass over the pixels. A category of 300M float32 pixels takes
seconds and about 1.8 GB on top of its maps and masks. A metric that is undefined (one class
missing, degenerate AU-PRO curve) is `nan`, never 0.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

_NAN = float("nan")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as skimage.measure.label's default in 2-D


def image_metrics(labels, scores) -> Dict[str, float]:
  """Image AUROC, F1-max and AP of `scores` (N,) against 0/1 (or bool) `labels` (N,).

  Equal to sklearn's roc_auc_score, average_precision_score and the maximum of 2PR/(P+R) over
  precision_recall_curve (ties included). All three are nan when only one class is present.
  """
  return _curve_metrics(*_image_classes(labels, scores))


def _image_classes(labels, scores):
  """Checked image labels and scores -> the ascending scores of the positives and of the negatives."""
  labels, scores = np.asarray(labels), _floats(scores, "scores")
  if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"labels and scores must be 1-D of one length, got labels {labels.shape} "
                     f"and scores {scores.shape}")
  if labels.size == 0:
    raise ValueError("labels and scores are empty")
  if labels.dtype != bool:
    if not np.isin(labels, (0, 1)).all():
      raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(labels)[:5]}")
    labels = labels == 1
  if not np.isfinite(scores).all():
    raise ValueError("scores contain NaN or inf")
  return np.sort(scores[labels]), np.sort(scores[~labels])


def pixel_metrics(masks, maps, pro_thresholds: int = 200, max_fpr: float = 0.3,
                  pro_rescale: str = "minmax", details: bool = False,
                  max_points: int = 512) -> Dict[str, float]:
  """Pixel AUROC, F1-max, AP (all pixels of the category pooled) and AU-PRO.

  details: instead {"metrics": those four, "f1_threshold": flag a pixel iff map >= it to get the
  pixel F1-max, "curves": {"roc", "pr", "pro"} thinned to max_points} from the same sorts.

  Args:
    masks: (N, H, W) ground truth; any non-zero pixel is a defect.
    maps: (N, H, W) anomaly maps (NumPy or JAX arrays).
    pro_thresholds: K, the number of AU-PRO thresholds.
    max_fpr: AU-PRO integrates the points with FPR < max_fpr (strict).
    pro_rescale: "minmax" (MuSc's and cflow-ad's code: (fpr - min) / (max - min)) or "max"
      (AnomalyCLIP / AdaCLIP code: fpr / max) for the kept FPRs.

  AU-PRO, as MuSc's `cal_pro_score` (after cflow-ad): thresholds t_k = lo + k * (hi - lo) / K,
  k = 0..K-1, in float64, with lo, hi the min and max over all maps (hi itself is not a threshold,
  as np.arange(lo, hi, delta)). At t_k a pixel is predicted defective iff map > t_k (strict, as
  `binary[amaps <= th] = 0; binary[amaps > th] = 1`), compared exactly (no rounding of the maps).
  PRO_k = mean over all ground-truth regions (8-connected, labelled per image, pooled over all
  images) of |region & predicted| / |region|; FPR_k = |predicted & ~mask| / |~mask|. The points with
  FPR_k < max_fpr are kept, their FPRs rescaled as `pro_rescale` says, and the trapezoid area under
  PRO vs rescaled FPR is taken (points in threshold order, which is FPR order). nan when there is
  no defect or no normal pixel, or when fewer than two points are kept or their rescaled FPRs
  collapse to one value (0/0: e.g. constant maps, or maps with no false positive below max_fpr
  at any threshold; MuSc's code fails there).
  """
  maps = _floats(maps, "maps")
  masks = np.asarray(masks)
  if maps.ndim != 3:
    raise ValueError(f"maps must be (N, H, W), got shape {maps.shape}")
  if masks.shape != maps.shape:
    raise ValueError(f"masks shape {masks.shape} does not match maps shape {maps.shape}")
  if maps.size == 0:
    raise ValueError("maps are empty")
  if int(pro_thresholds) != pro_thresholds or pro_thresholds < 1:
    raise ValueError(f"pro_thresholds must be a positive integer, got {pro_thresholds!r}")
  if pro_rescale not in ("minmax", "max"):
    raise ValueError(f"pro_rescale must be 'minmax' or 'max', got {pro_rescale!r}")
  gt = masks if masks.dtype == bool else masks != 0
  pos, neg = maps[gt], maps[~gt]
  neg.sort()
  ends = [pos.min(), pos.max()] if pos.size else []
  ends += [neg[0], neg[-1]] if neg.size else []
  if not np.isfinite(ends).all():  # NaN sorts last, so the ends see every NaN / inf
    raise ValueError("maps contain NaN or inf")
  lo, hi = float(min(ends)), float(max(ends))
  t = _floor_to(lo + (hi - lo) / pro_thresholds * np.arange(pro_thresholds), maps.dtype)
  aupro, pro_curve = _NAN, None
  if pos.size and neg.size:
    weights, n_regions = region_weights(gt)
    # Pixel p is predicted at t_k iff k < b_p = #{k: t_k < x_p}; so PRO_k sums the weights of b > k.
    hist = np.bincount(np.searchsorted(t, pos, "left"), weights=weights,
                       minlength=pro_thresholds + 1)
    pro = np.cumsum(hist[::-1])[::-1][1:] / n_regions
    fpr = (neg.size - np.searchsorted(neg, t, "right")) / neg.size
    pro_curve = _pro_curve(fpr, pro, max_fpr, pro_rescale)
    aupro = _area(pro_curve)
  pos.sort()
  out = {**_curve_metrics(pos, neg, with_threshold=details, curve_points=max_points if details else None),
         "aupro": aupro}
  if details:
    out = {"metrics": {k: out[k] for k in ("auroc", "f1_max", "ap", "aupro")},
           "f1_threshold": out["f1_threshold"], "curves": {**out["curves"], "pro": pro_curve}}
  return out


def _floats(x, name):
  x = np.asarray(x)
  if x.dtype.kind not in "fiub":
    raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
  return x if x.dtype.kind == "f" else x.astype(np.float64)


def _floor_to(t, dtype):
  """The largest values of `dtype` <= t (float64): for x of that dtype, x > t iff x > result."""
  out = t.astype(dtype)
  over = out.astype(np.float64) > t
  out[over] = np.nextafter(out[over], dtype.type(-np.inf))
  return out


def region_weights(gt):
  """1 / |region| for each defect pixel (in `maps[gt]` order) and the number of regions.

  Regions are 8-connected components of each image's mask, labelled image by image.
  """
  weights = np.empty(int(np.count_nonzero(gt)))
  start, n_regions = 0, 0
  for i in np.flatnonzero(gt.reshape(len(gt), -1).any(axis=1)):
    lab, n = ndimage.label(gt[i], structure=_EIGHT)
    lab = lab[gt[i]]
    weights[start:start + lab.size] = 1.0 / np.bincount(lab)[lab]
    start, n_regions = start + lab.size, n_regions + n
  return weights, n_regions


def _area(curve):
  """Trapezoid area under a `_pro_curve` (nan where there is none)."""
  if curve is None:
    return _NAN
  f, p = np.asarray(curve["fpr"]), np.asarray(curve["pro"])
  return float(np.sum(np.diff(f) * (p[1:] + p[:-1])) / 2)


def _pro_curve(fpr, pro, max_fpr, rescale):
  """The AU-PRO curve as integrated: PRO against the rescaled FPR of the points with FPR < max_fpr
  (None when fewer than two are kept or their FPRs collapse to one value)."""
  keep = fpr < max_fpr
  f, p = fpr[keep][::-1], pro[keep][::-1]  # increasing thresholds -> increasing FPR
  if f.size < 2:
    return None
  span = f[-1] - f[0] if rescale == "minmax" else f[-1]
  if span <= 0:
    return None
  f = (f - f[0]) / span if rescale == "minmax" else f / span
  return {"fpr": [float(v) for v in f], "pro": [float(v) for v in p]}


def _curve_metrics(pos, neg, with_threshold: bool = False, curve_points: Optional[int] = None):
  """AUROC, F1-max and AP from the ascending scores of the positives and of the negatives.

  AUROC = P(pos > neg) + P(pos == neg) / 2 (the ROC trapezoid, ties included). AP and F1 need only
  the thresholds at the distinct positive scores v (predicted: score >= v): recall changes only
  there, and between two of them F1 only falls as false positives are added.
  with_threshold: also "f1_threshold", where F1 is at its maximum (`operating_threshold`).
  curve_points: also "curves": ROC (fpr, tpr) and PR (recall, precision) at those same thresholds,
  thinned to that many points.
  """
  p, n = pos.size, neg.size
  if p == 0 or n == 0:
    out = {"auroc": _NAN, "f1_max": _NAN, "ap": _NAN}
    if with_threshold:
      out["f1_threshold"] = _NAN
    if curve_points is not None:
      out["curves"] = {"roc": None, "pr": None}
    return out
  first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])  # first index of each distinct value
  v, count = pos[first], np.diff(np.r_[first, p])  # distinct positive scores, their multiplicity
  below = np.searchsorted(neg, v, "left")  # negatives < v
  not_above = np.searchsorted(neg, v, "right")  # negatives <= v
  auroc = int(np.dot(count, below + not_above)) / (2 * p * n)
  tp = (p - first).astype(np.float64)  # positives >= v
  fp = (n - below).astype(np.float64)  # negatives >= v
  ap = float(np.sum(count * (tp / (tp + fp))) / p)  # recall steps by count / p at v
  f1 = 2 * tp / (tp + fp + p)
  out = {"auroc": float(auroc), "f1_max": float(np.max(f1)), "ap": ap}
  if with_threshold:
    best = int(np.argmax(f1))
    passed = [pos[first[best] - 1]] if first[best] > 0 else []
    passed += [neg[below[best] - 1]] if below[best] else []
    out["f1_threshold"] = operating_threshold(float(v[best]), max(passed) if passed else None)
  if curve_points is not None:
    fpr, tpr = np.r_[0.0, fp[::-1] / n, 1.0], np.r_[0.0, tp[::-1] / p, 1.0]
    out["curves"] = {"roc": dict(zip(("fpr", "tpr"), _thin(fpr, tpr, curve_points))),
                     "pr": dict(zip(("recall", "precision"),
                                    _thin(tp / p, tp / (tp + fp), curve_points)))}
  return out


def operating_threshold(lowest_flagged: float, highest_passed) -> float:
  """A threshold (flag iff score >= it) between the lowest score to flag and the highest to pass:
  midway, so scores rounded in a CSV still fall on the same side."""
  if highest_passed is None:
    return float(np.nextafter(lowest_flagged, -np.inf))
  return float((lowest_flagged + float(highest_passed)) / 2)


def threshold_at_fpr(normal_scores, fpr: float) -> Dict[str, float]:
  """The operating point that flags at most a share `fpr` of known-normal scores.

  threshold: flag iff score >= threshold, placed midway between the highest passed and the lowest
  flagged normal score; fpr: the share of the given normal scores flagged (<= the asked one; the
  (1 - fpr) quantile of the normal scores, rounded towards passing).
  """
  x = np.sort(_floats(np.ravel(normal_scores), "scores"))
  if x.size == 0 or not np.isfinite(x).all():
    raise ValueError("threshold_at_fpr needs finite normal scores")
  if not 0.0 <= fpr < 1.0:
    raise ValueError(f"fpr {fpr}: expected 0 <= fpr < 1")
  k = int(np.floor(fpr * x.size + 1e-9))          # normal scores that may be flagged
  flagged_from = x.size - k                       # index of the lowest flagged one
  while 0 < flagged_from < x.size and x[flagged_from] == x[flagged_from - 1]:
    flagged_from += 1                             # ties go to the passing side
  if flagged_from >= x.size:
    t = float(np.nextafter(x[-1], np.inf))
  else:
    t = operating_threshold(float(x[flagged_from]), float(x[flagged_from - 1]) if flagged_from else None)
  return {"threshold": t, "fpr": float((x >= t).mean()), "asked_fpr": float(fpr), "n_normal": int(x.size)}


def _thin(x: np.ndarray, y: np.ndarray, max_points: int):
  """At most max_points of a curve, ends kept, as lists (for JSON and plots)."""
  if x.size > max_points:
    idx = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    x, y = x[idx], y[idx]
  return [float(v) for v in x], [float(v) for v in y]


def image_report(labels, scores, fpr: float = 0.05, max_points: int = 512) -> dict:
  """Image metrics with their operating points and curves, for results and report pages.

  {"metrics": image_metrics, "f1_threshold": flag iff score >= it to get F1-max,
   "at_fpr": threshold_at_fpr of the normal images' scores, "curves": {"roc", "pr"}}.
  """
  pos, neg = _image_classes(labels, scores)
  out = _curve_metrics(pos, neg, with_threshold=True, curve_points=max_points)
  return {"metrics": {k: out[k] for k in ("auroc", "f1_max", "ap")},
          "f1_threshold": out["f1_threshold"],
          "at_fpr": threshold_at_fpr(neg, fpr) if neg.size else None, "curves": out["curves"]}


def confusion(labels, scores, threshold: float) -> Dict[str, int]:
  """Counts of the decision 'defective iff score >= threshold' against the labels (1 defect)."""
  y = np.asarray(labels).astype(int) == 1
  flag = np.asarray(scores, np.float64) >= threshold
  return {"tp": int((y & flag).sum()), "fp": int((~y & flag).sum()),
          "fn": int((y & ~flag).sum()), "tn": int((~y & ~flag).sum())}


def by_defect(defects: Sequence[str], labels, scores, threshold: Optional[float]) -> Dict[str, dict]:
  """Per defect type (normal images as 'good'): images, how many the threshold flags, mean, min
  and max score, and the AUROC of that type against the normal images (None without both)."""
  defects = np.asarray([d or "?" for d in defects], object)
  scores = np.asarray(scores, np.float64)
  good = scores[np.asarray(labels).astype(int) == 0]
  out = {}
  for d in sorted(set(defects), key=lambda d: (d != "good", d)):
    s = scores[defects == d]
    row = {"n": int(s.size), "mean": float(s.mean()), "min": float(s.min()), "max": float(s.max()),
           "flagged": None if threshold is None else int((s >= threshold).sum())}
    if d != "good":
      row["auroc"] = (image_metrics(np.r_[np.ones(s.size), np.zeros(good.size)],
                                    np.r_[s, good])["auroc"] if good.size else None)
    out[d] = row
  return out

"""Metrics against scikit-learn and a slow AU-PRO written straight from its definition."""
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from fiseclip_jax.outputs import metrics


def _sk_f1_max(y, s):
  p, r, _ = precision_recall_curve(y, s)
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
  return f1.max()


def _sk(y, s):
  return {"auroc": roc_auc_score(y, s), "f1_max": _sk_f1_max(y, s),
          "ap": average_precision_score(y, s)}


def _aupro_reference(masks, maps, num_th=200, max_fpr=0.3, rescale="minmax", structure=None):
  """Per threshold, per image, per region, as MuSc's cal_pro_score (skimage-free)."""
  masks = np.asarray(masks) != 0
  maps = np.asarray(maps).astype(np.float64)
  lo, hi = maps.min(), maps.max()
  ths = lo + (hi - lo) / num_th * np.arange(num_th)
  structure = np.ones((3, 3)) if structure is None else structure
  labelled = [ndimage.label(m, structure=structure) for m in masks]
  fprs, pros = [], []
  for th in ths:
    binary = maps > th
    pro = []
    for b, (lab, n) in zip(binary, labelled):
      for r in range(1, n + 1):
        region = lab == r
        pro.append(b[region].sum() / region.sum())
    fprs.append(np.logical_and(binary, ~masks).sum() / (~masks).sum())
    pros.append(np.mean(pro))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs < max_fpr
  f = fprs[keep]
  f = (f - f.min()) / (f.max() - f.min()) if rescale == "minmax" else f / f.max()
  return auc(f, pros[keep])


def _blobs(rng, n, h, w, frac=0.15):
  """Random blob masks: thresholded smoothed noise, several regions per image, some empty."""
  noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 2, 2))
  masks = noise > np.quantile(noise, 1 - frac)
  masks[0] = False  # a normal image
  return masks


def _maps(rng, masks, ties=None, dtype=np.float32):
  maps = rng.random(masks.shape) + 0.6 * masks
  maps = ndimage.gaussian_filter(maps, sigma=(0, 1, 1))
  if ties:
    maps = np.round(maps * ties) / ties
  return maps.astype(dtype)


# --- image metrics --------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [None, 3, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  y = rng.random(200) < 0.3
  s = rng.standard_normal(200) + y
  if ties:
    s = np.round(s * ties) / ties
  got = metrics.image_metrics(y, s)
  for k, v in _sk(y, s).items():
    assert got[k] == pytest.approx(v, abs=1e-6), k
  assert metrics.image_metrics(y.astype(int), s) == got
  assert metrics.image_metrics(y.astype(np.int8), s.astype(np.float32))["auroc"] == pytest.approx(
      got["auroc"], abs=1e-6)


def test_image_metrics_hand_computed():
  y = [0, 0, 1, 1]
  good = metrics.image_metrics(y, [0.1, 0.2, 0.8, 0.9])
  assert good == {"auroc": 1.0, "f1_max": 1.0, "ap": 1.0}
  bad = metrics.image_metrics(y, [0.8, 0.9, 0.1, 0.2])
  # Thresholds 0.2: P=1/3, R=1/2; 0.1: P=1/2, R=1.
  assert bad["auroc"] == 0.0
  assert bad["ap"] == pytest.approx(0.5 / 3 + 0.5 * 0.5)
  assert bad["f1_max"] == pytest.approx(2 / 3)
  tied = metrics.image_metrics([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
  assert tied["auroc"] == pytest.approx(3.5 / 4)
  const = metrics.image_metrics([True, False, False, True], np.zeros(4))
  assert const == {"auroc": 0.5, "f1_max": pytest.approx(2 / 3), "ap": 0.5}


@pytest.mark.parametrize("value", [0, 1])
def test_image_metrics_one_class_is_nan(value):
  got = metrics.image_metrics(np.full(5, value), np.arange(5.0))
  assert set(got) == {"auroc", "f1_max", "ap"}
  assert all(math.isnan(v) for v in got.values())


def test_image_metrics_bad_input():
  with pytest.raises(ValueError, match="labels"):
    metrics.image_metrics([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="0/1"):
    metrics.image_metrics([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    metrics.image_metrics([0, 1], [0.1, np.nan])


# --- pixel metrics --------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [None, 5, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn_and_reference(seed, ties):
  rng = np.random.default_rng(seed)
  masks = _blobs(rng, 4, 24, 28)
  maps = _maps(rng, masks, ties)
  got = metrics.pixel_metrics(masks, maps)
  for k, v in _sk(masks.ravel(), maps.ravel()).items():
    assert got[k] == pytest.approx(v, abs=1e-6), k
  assert got["aupro"] == pytest.approx(_aupro_reference(masks, maps), abs=1e-6)
  got_max = metrics.pixel_metrics(masks.astype(np.uint8) * 255, maps, pro_rescale="max")
  assert got_max["aupro"] == pytest.approx(_aupro_reference(masks, maps, rescale="max"), abs=1e-6)
  assert {k: got_max[k] for k in ("auroc", "f1_max", "ap")} == {
      k: got[k] for k in ("auroc", "f1_max", "ap")}


def test_aupro_other_settings_and_float64():
  rng = np.random.default_rng(7)
  masks = _blobs(rng, 3, 20, 20, frac=0.25)
  maps = _maps(rng, masks, dtype=np.float64)
  got = metrics.pixel_metrics(masks, maps, pro_thresholds=37, max_fpr=0.5)
  assert got["aupro"] == pytest.approx(_aupro_reference(masks, maps, 37, 0.5), abs=1e-6)


def test_aupro_uses_8_connectivity():
  # Two squares touching only at a corner: one region under 8-connectivity, two under 4.
  mask = np.zeros((1, 12, 12), bool)
  mask[0, 2:8, 2:8] = True  # 36 pixels, found
  mask[0, 8:10, 8:10] = True  # 4 pixels, missed
  rng = np.random.default_rng(3)
  maps = rng.random(mask.shape) * 0.5
  maps[0, 2:8, 2:8] += 0.6
  maps[0, 8:10, 8:10] = 0.1
  _, n_regions = metrics.region_weights(mask)
  assert n_regions == ndimage.label(mask[0], structure=np.ones((3, 3)))[1] == 1
  assert ndimage.label(mask[0])[1] == 2  # scipy's default structure is 4-connectivity
  got = metrics.pixel_metrics(mask, maps)["aupro"]
  four = _aupro_reference(mask, maps, structure=ndimage.generate_binary_structure(2, 1))
  assert got == pytest.approx(_aupro_reference(mask, maps), abs=1e-6)
  assert abs(got - four) > 0.05


def test_aupro_hand_computed():
  # One image, one row: 8 normal pixels, a 2-pixel defect region with scores 1.0 and 0.412.
  maps = np.array([[[0, 0, 0, 0, 0, 0, 0.61, 0.2, 1.0, 0.412]]])
  mask = np.zeros(maps.shape, bool)
  mask[..., 8:] = True
  # (FPR, PRO): (0, 1/2) for t >= .61; (1/8, 1/2), (1/8, 1) for .2 <= t < .61; (2/8, 1) below.
  # Rescaled FPR 0, 1/2, 1: area 1/2 * 1/2 + 1/2 * 1.
  assert metrics.pixel_metrics(mask, maps)["aupro"] == pytest.approx(0.75)
  # 0.2 -> 1.0: a normal pixel at the max is a false positive at every threshold: FPR 2/8 or 1/8
  # (PRO 1/2 at 1/8; 1/2 then 1 at 2/8): area 1/2 (minmax), 1/2 * 1/2 (max: FPRs 1/2 .. 1).
  maps[0, 0, 7] = 1.0
  assert metrics.pixel_metrics(mask, maps)["aupro"] == pytest.approx(0.5)
  assert metrics.pixel_metrics(mask, maps, pro_rescale="max")["aupro"] == pytest.approx(0.25)


def test_pixel_metrics_perfect_and_inverted():
  mask = np.zeros((2, 6, 6), bool)
  mask[1, 1:3, 1:4] = True
  perfect = metrics.pixel_metrics(mask, mask.astype(np.float32))
  assert {k: perfect[k] for k in ("auroc", "f1_max", "ap")} == {"auroc": 1.0, "f1_max": 1.0,
                                                                 "ap": 1.0}
  assert math.isnan(perfect["aupro"])  # no false positive at any threshold: FPR range is empty
  assert metrics.pixel_metrics(mask, 1 - mask.astype(np.float32))["auroc"] == 0.0


def test_pixel_metrics_constant_maps():
  rng = np.random.default_rng(5)
  masks = _blobs(rng, 3, 16, 16)
  got = metrics.pixel_metrics(masks, np.full(masks.shape, 0.7, np.float32))
  assert got["auroc"] == 0.5
  for k in ("f1_max", "ap"):
    assert got[k] == pytest.approx(_sk(masks.ravel(), np.zeros(masks.size))[k], abs=1e-12)
  assert math.isnan(got["aupro"])


def test_no_defect_is_nan():
  rng = np.random.default_rng(9)
  maps = rng.random((3, 8, 8))
  for masks in (np.zeros(maps.shape, bool), np.ones(maps.shape, int)):
    got = metrics.pixel_metrics(masks, maps)
    assert set(got) == {"auroc", "f1_max", "ap", "aupro"}
    assert all(math.isnan(v) for v in got.values())
  assert all(math.isnan(v) for v in metrics.image_metrics([0, 0, 0], maps.max((1, 2))).values())


def test_pixel_metrics_bad_input():
  with pytest.raises(ValueError, match=r"masks shape \(2, 4, 4\) does not match maps shape"):
    metrics.pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    metrics.pixel_metrics(np.zeros((4, 4)), np.zeros((4, 4)))
  maps = np.zeros((1, 4, 4))
  maps[0, 1, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.pixel_metrics(np.eye(4)[None], maps)


def test_jax_arrays():
  jnp = pytest.importorskip("jax.numpy")
  rng = np.random.default_rng(4)
  masks = _blobs(rng, 3, 12, 12)
  maps = _maps(rng, masks)
  assert metrics.pixel_metrics(jnp.asarray(masks), jnp.asarray(maps)) == pytest.approx(
      metrics.pixel_metrics(masks, maps), nan_ok=True)
  y, s = masks.any((1, 2)), maps.max((1, 2))
  assert metrics.image_metrics(jnp.asarray(y), jnp.asarray(s)) == metrics.image_metrics(y, s)

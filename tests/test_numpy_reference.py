"""Self-tests of the NumPy reference (tests/numpy_reference.py) against direct torch code."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, os.path.dirname(__file__))
import numpy_reference as ref  # noqa: E402
from fiseclip_jax.config import FiSeConfig  # noqa: E402


def _unit(rng, *shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _torch_lnamd(tokens, r, h, w):
  x = torch.tensor(tokens, dtype=torch.float64)[:, 1:, :]
  b, _, c = x.shape
  x = F.layer_norm(x.reshape(b, h, w, c), (h, w, c), eps=1e-5)
  x = F.avg_pool2d(x.permute(0, 3, 1, 2), r, stride=1, padding=(r - 1) // 2,
                   count_include_pad=True)
  x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
  return F.normalize(x, dim=-1).numpy()


@pytest.mark.parametrize("r", [1, 3, 5])
@pytest.mark.parametrize("hw", [(7, 7), (5, 6)])
def test_lnamd_matches_torch(r, hw):
  h, w = hw
  rng = np.random.default_rng(r + 10 * h)
  tokens = 3.0 * rng.standard_normal((2, 1 + h * w, 8)) + 0.5  # (B, 1+N, C)
  got = ref.lnamd(tokens, r, grid=None if h == w else (h, w))
  np.testing.assert_allclose(got, _torch_lnamd(tokens, r, h, w), atol=1e-6, rtol=0)


def _torch_interval(feats, topk_frac=0.3):
  f = torch.tensor(feats, dtype=torch.float64)
  b = f.shape[0]
  out = []
  for u in range(b):
    d = torch.stack([torch.cdist(f[u], f[v]).min(dim=1).values for v in range(b) if v != u])
    k = max(1, int(topk_frac * (b - 1)))
    out.append(torch.topk(d, k, dim=0, largest=False).values.mean(dim=0))
  return torch.stack(out).numpy()


@pytest.mark.parametrize("b", [2, 5, 8, 11])
def test_mutual_scores_unmasked_matches_cdist(b):
  rng = np.random.default_rng(b)
  feats = _unit(rng, b, 16, 8)  # (B, N, C)
  none = np.zeros((b, 16), bool)
  valid = np.ones(b, bool)
  scores, n_ref = ref.mutual_scores(feats, none, valid)
  np.testing.assert_allclose(scores, _torch_interval(feats), atol=1e-9)
  np.testing.assert_array_equal(n_ref, b - 1)
  mins, _ = ref.mutual_scores(feats, none, valid, agg="min")
  f = torch.tensor(feats)
  want = [torch.stack([torch.cdist(f[u], f[v]).min(1).values for v in range(b) if v != u])
          .min(0).values.numpy() for u in range(b)]
  np.testing.assert_allclose(mins, np.stack(want), atol=1e-9)


def test_mutual_scores_masked_hand_case():
  e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
  feats = np.stack([[e0, e1], [e0, e1], [e0, e0], [e1, e1]])  # (4, 2, 2)
  exclude = np.array([[False, False], [True, False], [True, True], [False, False]])
  valid = np.array([True, True, True, False])  # slot 3 padded; slot 2 fully excluded
  r2 = math.sqrt(2.0)
  for agg in ("min", "interval"):
    scores, n_ref = ref.mutual_scores(feats, exclude, valid, agg=agg)
    np.testing.assert_array_equal(n_ref, [1, 1, 2, 2])
    # u=0: only ref 1, whose e0 patch is excluded.
    np.testing.assert_allclose(scores[0], [r2, 0.0])
    np.testing.assert_allclose(scores[1], [0.0, 0.0])
    # u=2: refs 0 and 1 (k = 1): ref 0 matches e0 exactly.
    np.testing.assert_allclose(scores[2], [0.0, 0.0])
  # Interval over 2 refs with k = 1 is the min; with topk_frac=1 it is the mean.
  scores, _ = ref.mutual_scores(feats, exclude, valid, topk_frac=1.0)
  np.testing.assert_allclose(scores[2], [r2 / 2, r2 / 2])
  # The query's own mask does not matter for its score; it does for the others'.
  exclude[0] = [True, False]
  scores, _ = ref.mutual_scores(feats, exclude, valid, agg="min")
  np.testing.assert_allclose(scores[0], [r2, 0.0])
  np.testing.assert_allclose(scores[1], [r2, 0.0])
  # No reference at all: score 0.
  scores, n_ref = ref.mutual_scores(feats[:2], exclude[:2], np.array([True, False]))
  np.testing.assert_array_equal(n_ref, [0, 1])
  np.testing.assert_array_equal(scores[0], 0.0)


def _inputs(rng, b=4, n_layers=2, h=4, c=8, d=6):
  return dict(
      cls_embed=rng.standard_normal((b, d)),
      layer_tokens=rng.standard_normal((n_layers, b, 1 + h * h, c)),
      proxy_patch_embed=rng.standard_normal((b, h * h, d)),
      text=rng.standard_normal((2, d)),
      valid=np.ones(b, bool))


def test_off_steps_equal_plain_mutual_scores():
  rng = np.random.default_rng(0)
  x = _inputs(rng)
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), vote="off", sigma=1.0)
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=5.0, image_size=12)
  none = np.zeros((4, 16), bool)
  for s, r in enumerate(conf.r_list):
    want = np.mean([ref.mutual_scores(ref.lnamd(x["layer_tokens"][i], r), none, x["valid"])[0]
                    for i in range(2)], axis=0)
    np.testing.assert_allclose(out["step_scores"][s], want, atol=1e-12)
  assert not out["masks"].any() and not out["final_mask"].any()
  np.testing.assert_array_equal(out["n_ref"], 3)
  p_a = out["seg_prob"][..., 1]
  fused = (p_a + out["step_scores"].sum(0)) / 3
  np.testing.assert_allclose(out["patch_map"].reshape(4, -1), fused, atol=1e-12)
  # Maps: torch bilinear (half-pixel) then scipy gaussian.
  up = F.interpolate(torch.tensor(out["patch_map"])[:, None], size=(12, 12), mode="bilinear",
                     align_corners=False)[:, 0].numpy()
  want = np.stack([ndimage.gaussian_filter(m, 1.0, truncate=4.0, mode="reflect") for m in up])
  np.testing.assert_allclose(out["anomaly_maps"], want, atol=1e-12)
  np.testing.assert_allclose(out["image_scores"],
                             (out["cls_score"] + want.reshape(4, -1).max(1)) / 2, atol=1e-12)


@pytest.mark.parametrize("n_in,n_out", [(4, 12), (37, 518), (5, 7), (6, 4)])
def test_bilinear_matrix_matches_torch(n_in, n_out):
  x = np.random.default_rng(n_in).standard_normal((3, n_in))
  got = x @ ref.bilinear_matrix(n_in, n_out).T
  want = F.interpolate(torch.tensor(x)[None], size=n_out, mode="linear",
                       align_corners=False)[0].numpy()
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("vote", ["majority", "and", "or", "text"])
@pytest.mark.parametrize("loop", ["r", "layer", "flat"])
def test_vote_recurrence_and_fallback(vote, loop):
  rng = np.random.default_rng(1)
  x = _inputs(rng)
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3, 5), vote=vote, filter_loop=loop,
                    mu=0.9, lam=1.0, sigma=1.0)
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=8)
  n_steps = {"r": 3, "layer": 2, "flat": 6}[loop]
  assert out["step_scores"].shape == (n_steps, 4, 16)
  np.testing.assert_array_equal(out["masks"][0], out["mask0"])
  votes, n = out["mask0"].astype(int), 1
  for s in range(n_steps):
    votes = votes + (out["step_scores"][s] > conf.mu)
    n += 1
    want = {"majority": votes > n / 2, "and": votes == n, "or": votes > 0,
            "text": out["mask0"]}[vote]
    got = out["masks"][s + 1] if s + 1 < n_steps else out["final_mask"]
    np.testing.assert_array_equal(got, want)
  # Fused map = (P_a + sum over r of a_r) / 4 for the default weight with the "r" loop.
  if loop == "r":
    p_a = out["seg_prob"][..., 1]
    ok = out["n_ref"] > 0
    fused = (p_a + out["step_scores"].sum(0)) / 4
    np.testing.assert_allclose(out["patch_map"].reshape(4, -1)[ok], fused[ok], atol=1e-12)
  # A lone image (B = 1, or every other slot padded): SeCLIP alone.
  x["valid"] = np.array([True, False, False, False])
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=8)
  assert out["n_ref"][0] == 0
  np.testing.assert_array_equal(out["step_scores"][:, 0], 0.0)
  np.testing.assert_allclose(out["patch_map"][0].ravel(), out["seg_prob"][0, :, 1])

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
from fiseclip_jax.core.config import FiSeConfig  # noqa: E402


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
    k = ref.topk_count(topk_frac, b - 1)
    out.append(torch.topk(d, k, dim=0, largest=False).values.mean(dim=0))
  return torch.stack(out).numpy()


@pytest.mark.parametrize("b", [2, 4, 5, 8, 10, 11])
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
  assert out["step_n_ref"].shape == (n_steps, 4)
  np.testing.assert_array_equal(out["masks"][0], out["mask0"])
  # Votes and voters per image: a step adds a vote and a voter only where the image had references.
  votes, n = out["mask0"].astype(int), np.ones(4, int)
  for s in range(n_steps):
    had = out["step_n_ref"][s] > 0  # (B,)
    votes = votes + ((out["step_scores"][s] > conf.mu) & had[:, None])
    n = n + had
    want = {"majority": votes * 2 > n[:, None], "and": votes == n[:, None], "or": votes > 0,
            "text": out["mask0"]}[vote]
    got = out["masks"][s + 1] if s + 1 < n_steps else out["final_mask"]
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(out["voters"], n)
  np.testing.assert_array_equal(out["n_candidates"], 3)
  np.testing.assert_array_equal(out["n_ref"], out["step_n_ref"][0])
  # Fused map: w P_a + (1 - w) mean of a_s over the steps with references (w = 1/4 here), which is
  # (P_a + sum_r a_r) / 4 for the "r" loop with references at every step.
  p_a = out["seg_prob"][..., 1]
  for u in range(4):
    had = out["step_n_ref"][:, u] > 0
    want = (p_a[u] / 4 + 0.75 * out["step_scores"][had, u].mean(0)) if had.any() else p_a[u]
    np.testing.assert_allclose(out["patch_map"][u].ravel(), want, atol=1e-12)
    if loop == "r" and had.all():
      np.testing.assert_allclose(out["patch_map"][u].ravel(),
                                 (p_a[u] + out["step_scores"][:, u].sum(0)) / 4, atol=1e-12)
  # A lone image (B = 1, or every other slot padded): SeCLIP alone, for lack of candidates.
  x["valid"] = np.array([True, False, False, False])
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=8)
  assert out["n_ref"][0] == 0 and out["n_candidates"][0] == 0 and out["voters"][0] == 1
  assert out["seclip_only"][0] and out["reason"][0] == "no_candidates"
  np.testing.assert_array_equal(out["step_scores"][:, 0], 0.0)
  np.testing.assert_allclose(out["patch_map"][0].ravel(), out["seg_prob"][0, :, 1])


# ---- Hand-checkable cases of DESIGN.md sections 4-7 (roles, references, votes, fusion). ----

def test_topk_count_integer_rule():
  assert ref.topk_count(0.7, 90) == 63          # floor(0.7 * 90) = 62 in floating point
  assert math.floor(0.7 * 90) == 62
  assert ref.topk_count(0.3, 9) == 2
  assert ref.topk_count(0.3, 3) == 1
  assert ref.topk_count(0.3, 1) == 1            # at least one
  assert ref.topk_count(0.3, 10) == 3
  assert ref.topk_count(1.0, 7) == 7
  assert ref.topk_count(np.float64(0.7), 90) == 63


def test_interval_uses_integer_k_with_90_references():
  rng = np.random.default_rng(5)
  feats = _unit(rng, 91, 3, 4)  # (B, N, C): query 0 has 90 references
  scores, n_ref = ref.mutual_scores(feats, np.zeros((91, 3), bool), np.ones(91, bool),
                                    topk_frac=0.7)
  assert n_ref[0] == 90
  f = torch.tensor(feats)
  d = torch.stack([torch.cdist(f[0], f[v]).min(1).values for v in range(1, 91)])  # (90, N)
  want63 = torch.topk(d, 63, dim=0, largest=False).values.mean(0).numpy()
  want62 = torch.topk(d, 62, dim=0, largest=False).values.mean(0).numpy()
  np.testing.assert_allclose(scores[0], want63, atol=1e-12)
  assert np.abs(scores[0] - want62).max() > 1e-6


TEXT = np.eye(2)  # rows normal, abnormal in D = 2
SCALE = 10.0


def _designed(mask0, rng, n_layers=2, c=4):
  """Inputs whose M0 is exactly mask0 (B, N) under lam = 1: a patch's proxy embedding is the
  abnormal text row where mask0 is True, the normal one elsewhere."""
  mask0 = np.asarray(mask0, bool)
  b, n = mask0.shape
  return dict(cls_embed=rng.standard_normal((b, 2)),
              layer_tokens=rng.standard_normal((n_layers, b, 1 + n, c)),
              proxy_patch_embed=np.where(mask0[..., None], TEXT[1], TEXT[0]),
              text=TEXT, valid=np.ones(b, bool))


def _direct_step_score(query_tokens, ref_tokens, r, h, w):
  """a_s of one query against ONE fully kept reference, one step = mean over the layers: torch."""
  per_layer = []
  for i in range(query_tokens.shape[0]):
    fq = torch.tensor(_torch_lnamd(query_tokens[i][None], r, h, w)[0])
    fr = torch.tensor(_torch_lnamd(ref_tokens[i][None], r, h, w)[0])
    per_layer.append(torch.cdist(fq, fr).min(1).values.numpy())
  return np.mean(per_layer, axis=0)


@pytest.mark.parametrize("vote", ["and", "majority"])
def test_voters_are_per_image(vote):
  rng = np.random.default_rng(2)
  mask0 = np.array([[True, False, True, False],    # slot 0: its only candidate keeps nothing
                    [True, True, True, True]])     # slot 1: excludes every patch (mu = 0: every distance votes)
  x = _designed(mask0, rng)
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3, 5), vote=vote, lam=1.0, mu=0.0,
                    sigma=1.0)
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=SCALE, image_size=6)
  np.testing.assert_array_equal(out["mask0"], mask0)
  np.testing.assert_array_equal(out["step_n_ref"], [[0, 1]] * 3)
  np.testing.assert_array_equal(out["voters"], [1, 4])
  # Slot 0 had no reference: no vote, no voter, so its mask stays M0 (a shared voter counter would
  # make it votes == 1 < voters == 4 and clear it).
  for s in range(3):
    np.testing.assert_array_equal(out["masks"][s, 0], mask0[0])
  np.testing.assert_array_equal(out["final_mask"][0], mask0[0])
  np.testing.assert_array_equal(out["final_mask"][1], True)
  assert list(out["seclip_only"]) == [True, False]
  assert list(out["reason"]) == ["all_masked", ""]
  np.testing.assert_array_equal(out["n_candidates"], [1, 1])
  np.testing.assert_allclose(out["patch_map"][0].ravel(), out["seg_prob"][0, :, 1])
  np.testing.assert_array_equal(out["step_scores"][:, 0], 0.0)


@pytest.mark.parametrize("se_weight", [None, 0.4])
def test_fusion_uses_only_steps_with_references(se_weight):
  rng = np.random.default_rng(3)
  h = w = 3
  x = _designed(rng.random((1, h * w)) < 0.5, rng)
  bank = rng.standard_normal((2, 1, 1 + h * w, 4))  # (n_layers, K, 1+N, C)
  bank_masks = np.zeros((3, 1, h * w), bool)
  bank_masks[2] = True  # references at steps [yes, yes, no]
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3, 5), lam=1.0, sigma=1.0,
                    se_weight=se_weight)
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=SCALE, image_size=6, mode="bank",
                              bank_tokens=bank, bank_masks=bank_masks)
  np.testing.assert_array_equal(out["step_n_ref"][:, 0], [1, 1, 0])
  a1 = _direct_step_score(x["layer_tokens"][:, 0], bank[:, 0], 1, h, w)
  a2 = _direct_step_score(x["layer_tokens"][:, 0], bank[:, 0], 3, h, w)
  np.testing.assert_allclose(out["step_scores"][0, 0], a1, atol=1e-12)
  np.testing.assert_allclose(out["step_scores"][1, 0], a2, atol=1e-12)
  np.testing.assert_array_equal(out["step_scores"][2, 0], 0.0)
  wt = 0.25 if se_weight is None else se_weight
  p_a = out["seg_prob"][0, :, 1]
  np.testing.assert_allclose(out["patch_map"][0].ravel(), wt * p_a + (1 - wt) * (a1 + a2) / 2,
                             atol=1e-12)
  assert not out["seclip_only"][0] and out["reason"][0] == ""


def test_bank_mode_ignores_batch_mates():
  rng = np.random.default_rng(4)
  x = _inputs(rng, b=3, h=3)
  bank = rng.standard_normal((2, 2, 10, 8))
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), mu=0.8, lam=1.0, sigma=1.0)
  kw = dict(conf=conf, logit_scale=3.0, image_size=6, bank_tokens=bank)
  y = dict(x)
  y["layer_tokens"] = x["layer_tokens"].copy()
  y["layer_tokens"][:, 1:] = rng.standard_normal(y["layer_tokens"][:, 1:].shape)
  y["proxy_patch_embed"] = x["proxy_patch_embed"].copy()
  y["proxy_patch_embed"][1:] = rng.standard_normal(y["proxy_patch_embed"][1:].shape)
  a = ref.detect_from_tower(**x, mode="bank", **kw)
  b = ref.detect_from_tower(**y, mode="bank", **kw)
  alone = ref.detect_from_tower(**{k: v[:1] if k != "text" else v for k, v in x.items()}
                                | {"layer_tokens": x["layer_tokens"][:, :1]}, mode="bank", **kw)
  np.testing.assert_array_equal(a["n_candidates"], 2)
  for key in a:
    sl = (slice(None), 0) if key in ref.STEP_AXIS_KEYS else 0
    np.testing.assert_array_equal(a[key][sl], b[key][sl], err_msg=key)
    if a[key].dtype.kind in "biuU":
      np.testing.assert_array_equal(a[key][sl], alone[key][sl], err_msg=key)
    else:
      np.testing.assert_allclose(a[key][sl], alone[key][sl], atol=1e-12, err_msg=key)
  # In "batch" (and "both") mode the batch-mates do matter: the check above can fail.
  for mode in ("batch", "both"):
    a = ref.detect_from_tower(**x, mode=mode, **kw)
    b = ref.detect_from_tower(**y, mode=mode, **kw)
    assert np.abs(a["step_scores"][:, 0] - b["step_scores"][:, 0]).max() > 1e-6
    # "batch" leaves the bank out; "both" adds it to the batch-mates.
    np.testing.assert_array_equal(a["n_candidates"], {"batch": 2, "both": 4}[mode])


def test_bank_entries_with_empty_masks_are_always_references():
  rng = np.random.default_rng(6)
  x = _inputs(rng, b=4, h=3)
  bank = rng.standard_normal((2, 3, 10, 8))
  # mu = -1 with "or": every batch slot excludes every patch from step 1 on.
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3, 5), vote="or", mu=0.0, lam=1.0,
                    sigma=1.0)
  kw = dict(conf=conf, logit_scale=3.0, image_size=6, bank_tokens=bank,
            bank_valid=np.array([True, True, False]))
  both = ref.detect_from_tower(**x, mode="both", **kw)
  assert both["final_mask"].all() and both["masks"][1:].all()
  np.testing.assert_array_equal(both["n_candidates"], 3 + 2)
  np.testing.assert_array_equal(both["step_n_ref"][0], 3 + 2)  # batch-mates while they keep any
  np.testing.assert_array_equal(both["step_n_ref"][1:], 2)     # the valid bank entries, always
  bank_only = ref.detect_from_tower(**x, mode="bank", **kw)
  np.testing.assert_array_equal(bank_only["step_n_ref"], 2)
  np.testing.assert_array_equal(bank_only["n_candidates"], 2)
  # With references at every step the votes of every slot count: voters = 1 + n_steps.
  np.testing.assert_array_equal(both["voters"], 4)
  # The batch has no candidates in "bank" mode with an empty bank.
  empty = ref.detect_from_tower(**x, mode="bank", conf=conf, logit_scale=3.0, image_size=6)
  assert empty["seclip_only"].all() and (empty["reason"] == "no_candidates").all()


def test_all_masked_candidate():
  rng = np.random.default_rng(7)
  x = _inputs(rng, b=1, h=3)
  bank = rng.standard_normal((2, 1, 10, 8))
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), lam=1.0, sigma=1.0)
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=6, mode="bank",
                              bank_tokens=bank, bank_masks=np.ones((2, 1, 9), bool))
  assert out["n_candidates"][0] == 1
  np.testing.assert_array_equal(out["step_n_ref"], 0)
  assert out["seclip_only"][0] and out["reason"][0] == "all_masked"
  np.testing.assert_allclose(out["patch_map"][0].ravel(), out["seg_prob"][0, :, 1])
  # The same entry with a single kept patch at the second step is a reference there.
  masks = np.ones((2, 1, 9), bool)
  masks[1, 0, 4] = False
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=6, mode="bank",
                              bank_tokens=bank, bank_masks=masks)
  np.testing.assert_array_equal(out["step_n_ref"][:, 0], [0, 1])
  assert not out["seclip_only"][0] and out["reason"][0] == ""


def test_rolling_candidates_by_position():
  rng = np.random.default_rng(8)
  x = _inputs(rng, b=5, h=3)
  ring = rng.standard_normal((2, 2, 10, 8))  # stream positions 8, 9
  conf = FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), lam=1.0, sigma=1.0, vote="off")
  reference = np.array([True, True, False, True, True])  # slot 2 is query-only
  out = ref.detect_from_tower(**x, conf=conf, logit_scale=3.0, image_size=6, mode="rolling",
                              reference=reference, positions=np.arange(10, 15), window=2,
                              bank_tokens=ring, bank_positions=np.array([8, 9]))
  # 10: ring 8, 9; 11: ring 9, slot 0; 12: slots 0, 1; 13: slot 1 (slot 2 is no reference);
  # 14: slot 3.
  np.testing.assert_array_equal(out["n_candidates"], [2, 2, 2, 1, 1])
  np.testing.assert_array_equal(out["step_n_ref"], [[2, 2, 2, 1, 1]] * 2)
  # Slot 4's only reference is slot 3: each step score is the one against slot 3 alone (vote "off").
  for step, r in enumerate(conf.r_list):
    want = _direct_step_score(x["layer_tokens"][:, 4], x["layer_tokens"][:, 3], r, 3, 3)
    np.testing.assert_allclose(out["step_scores"][step, 4], want, atol=1e-12)


def _stream(rng, t=7, h=3):
  return dict(cls_embed=rng.standard_normal((t, 6)),
              layer_tokens=rng.standard_normal((2, t, 1 + h * h, 8)),
              proxy_patch_embed=rng.standard_normal((t, h * h, 6)),
              text=rng.standard_normal((2, 6)))


def _data_conf(s, base):
  """lam and mu from the data so that masks mix True and False (votes matter)."""
  vote_off = ref.detect_from_tower(**s, valid=np.ones(len(s["cls_embed"]), bool),
                                   conf=base.replace(vote="off"), logit_scale=3.0, image_size=6)
  ratio = vote_off["seg_prob"][..., 1] / vote_off["seg_prob"][..., 0]
  return base.replace(lam=float(np.quantile(ratio, 0.6)),
                      mu=float(np.quantile(vote_off["step_scores"], 0.6)))


def test_rolling_stream_candidates_and_first_image():
  rng = np.random.default_rng(9)
  s = _stream(rng, t=6)
  conf = _data_conf(s, FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), sigma=1.0))
  out = ref.rolling_stream(**s, conf=conf, logit_scale=3.0, image_size=6, window=3)
  np.testing.assert_array_equal(out["n_candidates"], [0, 1, 2, 3, 3, 3])
  assert out["seclip_only"][0] and out["reason"][0] == "no_candidates"
  np.testing.assert_allclose(out["patch_map"][0].ravel(), out["seg_prob"][0, :, 1])
  assert out["step_scores"].shape == (2, 6, 9) and out["masks"].shape == (2, 6, 9)
  assert out["step_n_ref"].shape == (2, 6) and out["image_scores"].shape == (6,)
  # Image 1 against image 0 alone, with image 0's step-0 mask.
  kept = ~out["masks"][0, 0]
  if kept.any():
    assert out["step_n_ref"][0, 1] == 1


@pytest.mark.parametrize("vote", ["majority", "and", "or"])
@pytest.mark.parametrize("group", [1, 2, 3, 7])
def test_rolling_does_not_depend_on_grouping(vote, group):
  """rolling_stream (one image at a time, "bank" mode with stored masks) equals detect_from_tower's
  "rolling" mode over batches of `group` stream images with a ring buffer of the last K images."""
  rng = np.random.default_rng(10)
  t_len, k = 7, 3
  s = _stream(rng, t=t_len)
  conf = _data_conf(s, FiSeConfig(feature_layers=(1, 2), r_list=(1, 3), sigma=1.0, vote=vote))
  want = ref.rolling_stream(**s, conf=conf, logit_scale=3.0, image_size=6, window=k)
  assert want["masks"].any() and not want["masks"].all()
  stored = np.zeros((2, t_len, 9), bool)  # masks each image used at each step
  outs = []
  for start in range(0, t_len, group):
    idx = np.arange(start, min(start + group, t_len))
    ring = np.arange(max(0, start - k), start)
    out = ref.detect_from_tower(
        s["cls_embed"][idx], s["layer_tokens"][:, idx], s["proxy_patch_embed"][idx], s["text"],
        np.ones(len(idx), bool), conf, 3.0, 6, mode="rolling", positions=idx, window=k,
        bank_tokens=s["layer_tokens"][:, ring], bank_masks=stored[:, ring], bank_positions=ring)
    stored[:, idx] = out["masks"]
    outs.append(out)
  for key in want:
    axis = 1 if key in ref.STEP_AXIS_KEYS else 0
    got = np.concatenate([o[key] for o in outs], axis=axis)
    if got.dtype.kind in "biuU":
      np.testing.assert_array_equal(got, want[key], err_msg=key)
    else:
      np.testing.assert_allclose(got, want[key], atol=1e-12, err_msg=key)

"""detect() against the independent NumPy reference of the whole method, and its invariances.

Tolerance: 1e-4 max abs on maps and scores in float32 (distances of unit vectors via 2 - 2 cos in
float32 against direct float64 norms; a few 1e-7 relative, amplified at most by the sqrt).
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.method import pipeline, seclip
from fiseclip_jax.method.spec import Params
from fiseclip_jax.outputs import metrics
import numpy_reference as ref

TOL = 1e-4
CFG = fj.CLIPConfig.tiny(vision_layers=4, width=32)
BASE = fj.FiSeConfig(image_size=84, feature_layers=(1, 2, 3, 4), proxy_layer=2)


@pytest.fixture(scope="module")
def setup():
  params = fj.init_params(CFG, seed=3)
  rng = np.random.RandomState(0)
  images = rng.randn(5, 84, 84, 3).astype(np.float32)
  images[1] = images[0] + 0.3 * rng.randn(84, 84, 3)      # two similar images: small distances
  text = fj.text_features(params, CFG, "screw", BASE)
  feats = fj.encode_image(params, CFG, images, BASE.feature_layers, BASE.proxy_layer)
  seg = np.asarray(seclip.text_probs(feats.proxy_patch_embed, text, fj.logit_scale(params)))
  # lam and mu chosen from the data so that every mask mixes True and False (votes matter).
  lam = float(np.quantile(seg[..., 1] / seg[..., 0], 0.7))
  conf = BASE.replace(lam=lam, vote="off")
  off = fj.detect(params, CFG, conf, images, np.ones(5, bool), text)
  mu = float(np.quantile(np.asarray(off.step_scores), 0.6))
  return params, images, text, feats, BASE.replace(lam=lam, mu=mu)


def reference(setup, conf, valid):
  params, images, text, feats, _ = setup
  return ref.detect_from_tower(np.asarray(feats.cls_embed), np.asarray(feats.layer_tokens),
                               np.asarray(feats.proxy_patch_embed), np.asarray(text), valid, conf,
                               float(fj.logit_scale(params)), images.shape[1])


def assert_matches(out, want, valid):
  v = np.asarray(valid, bool)
  np.testing.assert_array_equal(np.asarray(out.mask0)[v], want["mask0"][v])
  np.testing.assert_array_equal(np.asarray(out.masks)[:, v], want["masks"][:, v])
  np.testing.assert_array_equal(np.asarray(out.n_ref)[v], want["n_ref"][v])
  for key in ("image_scores", "anomaly_maps", "cls_score", "seg_prob", "patch_map"):
    err = np.abs(np.asarray(getattr(out, key), np.float64)[v] - want[key][v]).max()
    assert err < TOL, (key, err)
  err = np.abs(np.asarray(out.step_scores)[:, v] - want["step_scores"][:, v]).max()
  assert err < TOL, ("step_scores", err)


@pytest.mark.parametrize("vote", ["majority", "and", "or", "text", "off"])
@pytest.mark.parametrize("agg", ["interval", "min"])
def test_detect_matches_numpy_reference(setup, vote, agg):
  params, images, text, _, conf = setup
  conf = conf.replace(vote=vote, ref_agg=agg)
  valid = np.ones(5, bool)
  out = fj.detect(params, CFG, conf, images, valid, text)
  want = reference(setup, conf, valid)
  if vote in ("majority", "and", "or"):
    masks = np.asarray(out.masks)
    assert masks.any() and not masks.all()
  assert_matches(out, want, valid)


@pytest.mark.parametrize("loop", ["layer", "flat"])
@pytest.mark.parametrize("score", ["max", "cls"])
def test_filter_loops_and_score_rules_match_reference(setup, loop, score):
  params, images, text, _, conf = setup
  conf = conf.replace(filter_loop=loop, image_score=score, se_weight=0.3, r_list=(5, 1))
  valid = np.array([1, 1, 0, 1, 1], bool)
  out = fj.detect(params, CFG, conf, images, valid, text)
  assert out.step_scores.shape[0] == {"layer": 4, "flat": 8}[loop]
  assert_matches(out, reference(setup, conf, valid), valid)


def test_padding_invariance(setup):
  """B = 3 and B = 8 are different compiled programs (other reduction orders): equal to float32
  rounding, 1e-5 on values of order 1; the masks and reference counts are exactly equal."""
  params, images, text, _, conf = setup
  exact = fj.detect(params, CFG, conf, images[:3], np.ones(3, bool), text)
  padded_images = np.concatenate([images[:3], np.zeros((5, 84, 84, 3), np.float32)])
  padded = fj.detect(params, CFG, conf, padded_images, np.array([1, 1, 1, 0, 0, 0, 0, 0], bool), text)
  for key in ("image_scores", "anomaly_maps", "step_scores", "masks", "n_ref"):
    a, b = np.asarray(getattr(exact, key)), np.asarray(getattr(padded, key))
    if key in ("step_scores", "masks"):
      b = b[:, :3]
    else:
      b = b[:3]
    np.testing.assert_allclose(a, b, atol=0 if key in ("masks", "n_ref") else 1e-5, err_msg=key)


def test_permutation_equivariance(setup):
  params, images, text, _, conf = setup
  perm = np.array([3, 0, 4, 1, 2])
  a = fj.detect(params, CFG, conf, images, np.ones(5, bool), text)
  b = fj.detect(params, CFG, conf, images[perm], np.ones(5, bool), text)
  np.testing.assert_allclose(np.asarray(a.image_scores)[perm], np.asarray(b.image_scores), atol=1e-6)
  np.testing.assert_allclose(np.asarray(a.anomaly_maps)[perm], np.asarray(b.anomaly_maps), atol=1e-6)


def test_fully_excluded_reference_is_skipped():
  rng = np.random.RandomState(1)
  feats = np.asarray(fj.lnamd(jnp.asarray(rng.randn(4, 5, 5, 8), jnp.float32), 1))
  exclude = np.zeros((4, 25), bool)
  exclude[2] = True                                       # image 2 keeps nothing
  scores = np.asarray(fj.mutual_scores(feats, exclude, np.ones(4, bool), topk_frac=1.0))
  without = np.asarray(fj.mutual_scores(feats[[0, 1, 3]], exclude[[0, 1, 3]], np.ones(3, bool), topk_frac=1.0))
  np.testing.assert_allclose(scores[[0, 1, 3]], without, atol=1e-6)
  assert np.all(scores[2] > 0)                            # image 2 is still scored as a query


def test_single_image_falls_back_to_seclip_with_warning(setup):
  params, images, text, _, conf = setup
  with pytest.warns(fj.SeCLIPOnlyWarning):
    out = fj.detect(params, CFG, conf, images[:1], np.ones(1, bool), text)
  assert int(out.n_ref[0]) == 0
  np.testing.assert_allclose(np.asarray(out.patch_map).reshape(1, -1), np.asarray(out.seg_prob)[..., 1], atol=1e-7)
  assert np.isfinite(np.asarray(out.anomaly_maps)).all()
  # Same through padding: one valid image among four slots.
  with pytest.warns(fj.SeCLIPOnlyWarning):
    out4 = fj.detect(params, CFG, conf, np.concatenate([images[:1], images[1:4]]), np.array([1, 0, 0, 0], bool), text)
  # B = 1 and B = 4 compile to different programs: equal to float32 rounding (see padding test).
  np.testing.assert_allclose(np.asarray(out4.anomaly_maps)[0], np.asarray(out.anomaly_maps)[0], atol=1e-5)


def test_vote_off_is_plain_mutual_scoring_plus_fusion(setup):
  params, images, text, feats, conf = setup
  conf = conf.replace(vote="off")
  out = fj.detect(params, CFG, conf, images, np.ones(5, bool), text)
  grid = (6, 6)
  per_r = []
  for r in conf.r_list:
    layer_scores = [fj.mutual_scores(fj.lnamd(feats.layer_tokens[i, :, 1:].reshape(5, *grid, -1), r),
                                     np.zeros((5, 36), bool), np.ones(5, bool)) for i in range(4)]
    per_r.append(np.mean(layer_scores, axis=0))
  p_a = np.asarray(out.seg_prob)[..., 1]
  fused = (p_a + np.sum(per_r, axis=0)) / (1 + len(conf.r_list))
  np.testing.assert_allclose(np.asarray(out.patch_map).reshape(5, -1), fused, atol=1e-5)


def count_traces(monkeypatch):
  """Calls of the maps stage while tracing: one per compile of a scorer."""
  traces = []
  stage = pipeline.maps_stage
  monkeypatch.setattr(pipeline, "maps_stage", lambda *a: (traces.append(1), stage(*a))[1])
  return traces


def test_class_change_does_not_recompile(setup, monkeypatch):
  params, images, text, _, conf = setup
  traces = count_traces(monkeypatch)
  fj.detect(params, CFG, conf.replace(sigma=3.0), images, np.ones(5, bool), text)
  other = fj.text_features(params, CFG, "metal nut", conf)
  fj.detect(params, CFG, conf.replace(sigma=3.0), images, np.ones(5, bool), other)
  assert len(traces) == 1


def test_bfloat16_close_to_float32(setup):
  """bfloat16 keeps 8 bits of mantissa (~4e-3 relative) through the tower; maps are probabilities
  and distances of order 1, so 5e-2 absolute bounds the drift while catching any real error. The
  setup's lam and mu sit at quantiles of the data, so some patches lie on a threshold, where any
  rounding flips a mask (and a flipped mask can remove a reference: a discrete change of up to
  0.2 here). So: the continuous path (no masks) within 5e-2, and every M0 flip on a patch whose
  P_a / P_n lies within bf16's rounding (2 %) of lam."""
  params, images, text, _, conf = setup
  valid = np.ones(5, bool)
  plain = conf.replace(vote="off", lam=float("inf"))
  f32 = fj.detect(params, CFG, plain, images, valid, text)
  bf16 = fj.detect(params, CFG, plain.replace(compute_dtype="bfloat16"), images, valid, text)
  assert np.abs(np.asarray(bf16.anomaly_maps) - np.asarray(f32.anomaly_maps)).max() < 5e-2
  assert np.abs(np.asarray(bf16.image_scores) - np.asarray(f32.image_scores)).max() < 5e-2
  f32 = fj.detect(params, CFG, conf, images, valid, text)
  bf16 = fj.detect(params, CFG, conf.replace(compute_dtype="bfloat16"), images, valid, text)
  seg = np.asarray(f32.seg_prob)
  ratio = seg[..., 1] / seg[..., 0]
  flips = np.asarray(f32.mask0) != np.asarray(bf16.mask0)
  assert (np.abs(ratio[flips] / conf.lam - 1) < 2e-2).all(), ratio[flips] / conf.lam


def _primitive_names(jaxpr):
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names.extend(_primitive_names(sub))
  return names


def test_detect_traces_without_python_loops_over_images_pairs_or_layers(setup):
  """The jaxpr size does not grow with B: images and pairs are vmapped / scanned, not unrolled.

  (B = 12 and 24: 66 and 276 pairs, both split into whole chunks, so the programs are alike.)
  """
  params, _, text, _, conf = setup
  sizes = {}
  for b in (12, 24):
    spec = fj.make_spec(CFG, conf)
    jaxpr = jax.make_jaxpr(lambda im, v: pipeline.detect_batch(
        spec, Params(params, None), im, fj.make_roles(v), text, None))(
        jnp.zeros((b, 84, 84, 3)), jnp.ones((b,), bool))
    sizes[b] = len(_primitive_names(jaxpr.jaxpr))
  assert sizes[12] == sizes[24]


def test_fusion_skips_steps_without_references(setup):
  """B = 2, majority, mu = 0: every score is a vote, so after two steps each image excludes all of
  its patches and the third step has no reference (per-step n_ref [1, 1, 0]). The fused map
  averages the two steps that had references; it once added a 0 for the third."""
  params, images, text, _, conf = setup
  conf = conf.replace(vote="majority", mu=0.0)
  out = fj.detect(params, CFG, conf, images[:2], np.ones(2, bool), text)
  masks = np.asarray(out.masks)                                       # (3, 2, N)
  assert not masks[0].all(axis=1).any() and not masks[1].all(axis=1).any()
  assert masks[2].all()                                               # step 3: nothing kept
  steps = np.asarray(out.step_scores)
  w = conf.fusion_weight
  want = w * np.asarray(out.seg_prob)[..., 1] + (1 - w) * steps[:2].mean(axis=0)
  np.testing.assert_allclose(np.asarray(out.patch_map).reshape(2, -1), want, atol=1e-6)

"""References as data (DESIGN.md §5): the jitted scorer against the NumPy reference in every
reference mode, and the invariances that make banks and streams trustworthy.

Tolerance: 1e-4 max abs on maps and scores in float32 against float64 (as tests/test_pipeline.py);
masks, candidate and reference counts exactly. Invariances between compiled shapes (B = 1 vs 8,
stream batches of 1, 2, 4): 1e-5, float32 rounding of different reduction orders.
"""
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.method import pipeline, seclip
import numpy_reference as ref

TOL = 1e-4
CFG = fj.CLIPConfig.tiny(vision_layers=4, width=32)
BASE = fj.FiSeConfig(image_size=84, feature_layers=(1, 2, 3, 4), proxy_layer=2)
B, K = 6, 3
# Slot roles: 0-3 query + reference, 4 reference only (a top-up image), 5 query only.
QUERY = np.array([1, 1, 1, 1, 0, 1], bool)
REFERENCE = np.array([1, 1, 1, 1, 1, 0], bool)


@pytest.fixture(scope="module")
def setup():
  params = fj.init_params(CFG, seed=3)
  rng = np.random.RandomState(0)
  images = rng.randn(B + K, 84, 84, 3).astype(np.float32)
  images[1] = images[0] + 0.3 * rng.randn(84, 84, 3)          # near-duplicates: small distances
  images[B] = images[2] + 0.3 * rng.randn(84, 84, 3)          # a bank image close to a query
  text = fj.text_features(params, CFG, "screw", BASE)
  feats = fj.encode_image(params, CFG, images, BASE.feature_layers, BASE.proxy_layer)
  tower = {k: np.asarray(getattr(feats, k)) for k in ("cls_embed", "layer_tokens", "proxy_patch_embed")}
  seg = np.asarray(seclip.text_probs(feats.proxy_patch_embed, text, fj.logit_scale(params)))
  lam = float(np.quantile(seg[..., 1] / seg[..., 0], 0.7))  # masks mix True and False
  off = fj.detect(params, CFG, BASE.replace(lam=lam, vote="off"), images[:B], np.ones(B, bool), text)
  mu = float(np.quantile(np.asarray(off.step_scores), 0.6))
  return params, images, np.asarray(text), tower, BASE.replace(lam=lam, mu=mu)


def reference(setup, conf, mode, with_bank):
  params, images, text, tower, _ = setup
  kw = dict(query=QUERY, reference=REFERENCE, mode=mode)
  if with_bank:
    kw.update(bank_tokens=tower["layer_tokens"][:, B:])
  return ref.detect_from_tower(tower["cls_embed"][:B], tower["layer_tokens"][:, :B],
                               tower["proxy_patch_embed"][:B], text, None, conf,
                               float(fj.logit_scale(params)), images.shape[1], **kw)


def assert_matches(out, want, keep):
  for key in ("mask0", "final_mask", "n_ref", "n_candidates", "seclip_only"):
    np.testing.assert_array_equal(np.asarray(getattr(out, key))[keep], want[key][keep], err_msg=key)
  for key in ("masks", "step_n_ref"):
    np.testing.assert_array_equal(np.asarray(getattr(out, key))[:, keep], want[key][:, keep], err_msg=key)
  for key in ("image_scores", "anomaly_maps", "cls_score", "seg_prob", "patch_map"):
    err = np.abs(np.asarray(getattr(out, key), np.float64)[keep] - want[key][keep]).max()
    assert err < TOL, (key, err)
  steps = np.asarray(out.step_scores, np.float64)[:, keep]
  has = want["step_n_ref"][:, keep] > 0                      # a step without references has no score
  assert np.abs(steps - want["step_scores"][:, keep])[has].max(initial=0) < TOL


@pytest.mark.parametrize("mode", ["batch", "bank", "both"])
@pytest.mark.parametrize("vote", ["majority", "and", "or", "text", "off"])
@pytest.mark.parametrize("agg", ["interval", "min"])
def test_scorer_matches_numpy_reference_in_every_mode(setup, mode, vote, agg):
  params, images, text, _, conf = setup
  conf = conf.replace(vote=vote, ref_agg=agg, references=mode)
  bank = None if mode == "batch" else fj.build_bank(params, CFG, conf, images[B:], chunk=2)
  out = fj.detect(params, CFG, conf, images[:B], fj.make_roles(QUERY, REFERENCE), text, bank)
  want = reference(setup, conf, mode, bank is not None)
  assert_matches(out, want, QUERY)
  n_cand = np.asarray(out.n_candidates)[QUERY]
  expected = {"batch": REFERENCE.sum() - REFERENCE[QUERY], "bank": np.full(QUERY.sum(), K),
              "both": REFERENCE.sum() - REFERENCE[QUERY] + K}[mode]
  np.testing.assert_array_equal(n_cand, expected)


@pytest.mark.parametrize("vote", ["majority", "and", "or", "text", "off"])
@pytest.mark.parametrize("agg", ["interval", "min"])
def test_stream_matches_numpy_reference_and_ignores_batching(setup, vote, agg):
  """Rolling mode, window 3, a stream of 7 images cut into batches of 1, 2 and 4 slots."""
  params, images, text, tower, conf = setup
  t, window = 7, 3
  conf = conf.replace(vote=vote, ref_agg=agg, stream_window=window)
  want = ref.rolling_stream(tower["cls_embed"][:t], tower["layer_tokens"][:, :t],
                            tower["proxy_patch_embed"][:t], text, conf,
                            float(fj.logit_scale(params)), images.shape[1], window)
  np.testing.assert_array_equal(want["n_candidates"], [0, 1, 2, 3, 3, 3, 3])
  runs = {}
  for size in (1, 2, 4):
    ring = fj.empty_stream(CFG, conf)
    outs = []
    for start in range(0, t, size):
      n = min(size, t - start)
      batch = np.zeros((size,) + images.shape[1:], np.float32)
      batch[:n] = images[start:start + n]
      live = np.arange(size) < n
      roles = fj.make_roles(live, live, start + np.arange(size))
      res, ring = fj.score_stream(params, CFG, conf, batch, roles, text, ring)
      outs.append(jax_tree_take(res, n))
    runs[size] = {k: np.concatenate([o[k] for o in outs], axis=1 if k in ref.STEP_AXIS_KEYS else 0)
                  for k in outs[0]}
  assert_matches(Namespace(runs[1]), want, np.ones(t, bool))
  for size in (2, 4):
    for key in ("masks", "n_ref", "step_n_ref", "n_candidates", "seclip_only"):
      np.testing.assert_array_equal(runs[size][key], runs[1][key], err_msg=key)
    for key in ("image_scores", "anomaly_maps", "patch_map"):
      np.testing.assert_allclose(runs[size][key], runs[1][key], atol=1e-5, err_msg=key)


class Namespace:
  def __init__(self, d):
    self.__dict__.update(d)


def jax_tree_take(res, n):
  """Host copies of a DetectResult's fields, first n slots."""
  out = {}
  for key, value in res._asdict().items():
    value = np.asarray(value)
    out[key] = value[:, :n] if key in ref.STEP_AXIS_KEYS else value[:n]
  return out


def test_bank_mode_does_not_depend_on_batch_mates(setup):
  """A query scored against the bank alone gets the same result in a batch of 1 and of 8."""
  params, images, text, _, conf = setup
  conf = conf.replace(references="bank")
  bank = fj.build_bank(params, CFG, conf, images[B:])
  alone = fj.detect(params, CFG, conf, images[:1], np.ones(1, bool), text, bank)
  rng = np.random.RandomState(5)
  crowd = np.concatenate([images[:1], rng.randn(7, 84, 84, 3).astype(np.float32)])
  batch = fj.detect(params, CFG, conf, crowd, np.ones(8, bool), text, bank)
  for key in ("image_scores", "anomaly_maps", "step_scores", "patch_map"):
    a, b = np.asarray(getattr(alone, key)), np.asarray(getattr(batch, key))
    a, b = (a[:, 0], b[:, 0]) if key == "step_scores" else (a[0], b[0])
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)
  assert int(alone.n_ref[0]) == K and int(batch.n_ref[0]) == K


def test_bank_is_built_once_and_chunking_does_not_matter(setup):
  params, images, _, _, conf = setup
  conf = conf.replace(references="bank")
  a = fj.build_bank(params, CFG, conf, images[B:], chunk=1)
  b = fj.build_bank(params, CFG, conf, images[B:], chunk=8)
  assert a.feats.shape == (3, 4, K, 36, CFG.vision_width)       # (S, G, K, N, C)
  np.testing.assert_allclose(np.asarray(a.feats), np.asarray(b.feats), atol=1e-5)
  assert not np.asarray(a.masks).any() and np.asarray(a.valid).all()


def test_a_bank_is_bound_to_the_settings_it_was_built_under(setup):
  """DESIGN.md §5: a bank's feature maps are arranged by the settings it was built under; a scorer
  under others (equal shapes, so nothing else would notice) is refused in one line naming them."""
  params, images, text, _, conf = setup
  conf = conf.replace(references="bank", r_list=(1, 3, 5, 7))
  bank = fj.build_bank(params, CFG, conf, images[B:])
  fj.detect(params, CFG, conf, images[:B], np.ones(B, bool), text, bank)       # its own: fine
  for other in (dict(r_list=(7, 5, 3, 1)), dict(filter_loop="layer"),
                dict(feature_layers=(4, 3, 2, 1))):
    with pytest.raises(ValueError, match=f"built under other settings.*{next(iter(other))}"):
      fj.detect(params, CFG, conf.replace(**other), images[:B], np.ones(B, bool), text, bank)


def test_mode_needs_its_references(setup):
  params, images, text, _, conf = setup
  with pytest.raises(ValueError, match="needs a bank"):
    fj.detect(params, CFG, conf.replace(references="bank"), images[:2], np.ones(2, bool), text)
  bank = fj.build_bank(params, CFG, conf, images[B:])
  with pytest.raises(ValueError, match="references='batch'"):
    fj.detect(params, CFG, conf, images[:2], np.ones(2, bool), text, bank)
  with pytest.raises(ValueError, match="score_stream"):
    fj.detect(params, CFG, conf.replace(stream_window=2), images[:2], np.ones(2, bool), text)
  ring = fj.empty_stream(CFG, conf.replace(stream_window=2))
  roles = fj.make_roles(np.array([0, 1], bool), np.array([0, 1], bool))
  with pytest.raises(ValueError, match="first slots"):
    fj.score_stream(params, CFG, conf.replace(stream_window=2), images[:2], roles, text, ring)


def test_roles_of_a_pattern_do_not_recompile(setup, monkeypatch):
  params, images, text, _, conf = setup
  conf = conf.replace(sigma=3.0)                   # a config no other test compiled
  traces = []
  stage = pipeline.maps_stage
  monkeypatch.setattr(pipeline, "maps_stage", lambda *a: (traces.append(1), stage(*a))[1])
  fj.detect(params, CFG, conf, images[:B], fj.make_roles(QUERY, REFERENCE), text)
  fj.detect(params, CFG, conf, images[:B], fj.make_roles(REFERENCE, QUERY), text)
  fj.detect(params, CFG, conf, images[:B], np.ones(B, bool), text)
  assert len(traces) == 1

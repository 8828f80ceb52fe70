"""The programs' scoring loop (run/scoring.py) against the written rules the NumPy reference
follows: how a category is cut into batches with top-up, and how images scored by SeCLIP alone
are counted by reason (DESIGN.md §5)."""
import numpy as np
import pytest

import fiseclip_jax as fj
import numpy_reference as ref
from fiseclip_jax.data import demo_root, mvtec_samples
from fiseclip_jax.run import scoring, sharding

CFG = fj.CLIPConfig.tiny()
CONF = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2)
SAMPLES = mvtec_samples(demo_root(), "hazelnut")[:7]


@pytest.fixture(scope="module")
def model():
  params = fj.init_params(CFG, 0)
  return fj.Model.of(params, CFG), fj.text_features(params, CFG, "hazelnut", CONF)


def batches_of(model, conf, batch_size, top_up):
  m, text = model
  got = []
  scoring.score_samples(SAMPLES, model=m, conf=conf, text=text, mesh=sharding.make_mesh(),
                        batch_size=batch_size, top_up_pool=SAMPLES if top_up else None,
                        on_batch=got.append)
  return got


@pytest.mark.parametrize("batch_size,top_up", [(3, True), (3, False), (4, True), (7, True),
                                               (9, True)])
def test_batches_and_top_up_follow_the_written_rule(model, batch_size, top_up):
  got = batches_of(model, CONF, batch_size, top_up)
  want = ref.top_up_batches(len(SAMPLES), batch_size, top_up)
  assert len(got) == len(want)
  for r, (index, query, reference) in zip(got, want):
    np.testing.assert_array_equal(r.batch.index, index)
    np.testing.assert_array_equal(r.query, query)
    np.testing.assert_array_equal(r.reference, reference)
    # Every query has the other reference slots of its batch as candidates.
    np.testing.assert_array_equal(r.n_candidates[query], reference.sum() - 1)


def test_seclip_only_images_are_counted_by_reason(model):
  """lam = 0: M0 covers every patch (P_a > 0), so every reference is masked out: the images with
  candidates are "all_masked"; the last batch of one image (no top-up) has "no_candidates"."""
  m, text = model
  conf = CONF.replace(lam=0.0)
  got = []
  scored = scoring.score_samples(SAMPLES[:4], model=m, conf=conf, text=text,
                                 mesh=sharding.make_mesh(), batch_size=3, on_batch=got.append)
  reasons = []
  for r in got:
    images = r.batch.images
    feats = fj.encode_image(m.params.text, CFG, images, conf.feature_layers, conf.proxy_layer)
    want = ref.detect_from_tower(np.asarray(feats.cls_embed), np.asarray(feats.layer_tokens),
                                 np.asarray(feats.proxy_patch_embed), np.asarray(text), None, conf,
                                 float(fj.logit_scale(m.params.text)), conf.image_size,
                                 query=r.query, reference=r.reference)
    reasons += list(want["reason"][r.query])
  assert scored.seclip_only_counts() == ref.seclip_only_counts(reasons) == {
      "total": 4, "no_candidates": 1, "all_masked": 3}

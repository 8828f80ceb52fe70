"""Letterboxed images (DESIGN.md §2): where the image lands in the square, and the method with
its padding left out of matching, against the NumPy reference told the same written rule."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiseclip_jax as fj
from fiseclip_jax.data import Sample, demo_root, mvtec_samples, preprocess
from fiseclip_jax.method import references
from fiseclip_jax.method.references import Roles
from fiseclip_jax.run import scoring, sharding
import numpy_reference as ref
from test_pipeline import BASE, CFG, TOL, assert_matches, setup  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("hw,size,want", [((600, 800), 56, (7, 0, 42, 56)),
                                          ((800, 600), 56, (0, 7, 56, 42)),
                                          ((100, 100), 56, (0, 0, 56, 56)),
                                          ((10, 1000), 84, (41, 0, 1, 84)),
                                          ((1200, 1600), 518, (65, 0, 388, 518))])
def test_the_image_lands_centred_with_its_longer_side_the_square(hw, size, want):
  assert preprocess.letterbox_box(hw, size) == want
  img, box = preprocess.letterbox_rgb(Image.new("RGB", hw[::-1], (250, 10, 10)), size)
  a = np.asarray(img)
  content = preprocess.content_mask(box, size)
  assert a.shape == (size, size, 3) and box == want
  assert (a[content] == (250, 10, 10)).all() and (a[~content] == preprocess.PAD_GREY).all()


def test_a_map_comes_back_in_the_squashed_geometry():
  m = np.zeros((56, 56), np.float32)
  m[7:49] = np.linspace(0, 1, 56, dtype=np.float32)[None]   # content rows 7..48, a ramp in x
  back = preprocess.unletterbox(m, (7, 0, 42, 56))
  assert back.shape == (56, 56)
  np.testing.assert_allclose(back, np.broadcast_to(m[7], (56, 56)), atol=1e-6)


def padded(setup, conf, content, bank_k=0):
  params, images, text, feats, _ = setup
  b = len(images) - bank_k
  roles = Roles(np.ones(b, bool), np.ones(b, bool), np.arange(b, dtype=np.int32),
                content[:b])
  bank = None
  if bank_k:
    bank = fj.build_bank(params, CFG, conf, images[b:], content=content[b:])
  out = fj.detect(params, CFG, conf, images[:b], roles, text, bank)
  tokens = np.asarray(feats.layer_tokens)
  kw = {}
  if bank_k:
    pad = np.asarray(references.padding_patches(content[b:], (6, 6)))
    kw = dict(mode="both", bank_tokens=tokens[:, b:],
              bank_masks=np.broadcast_to(pad, (ref.n_steps(conf),) + pad.shape))
  want = ref.detect_from_tower(np.asarray(feats.cls_embed)[:b], tokens[:, :b],
                               np.asarray(feats.proxy_patch_embed)[:b], np.asarray(text),
                               np.ones(b, bool), conf, float(fj.logit_scale(params)), 84,
                               content=content[:b], **kw)
  return out, want


def contents(n):
  """Letterbox content of n 84 px images: wide ones (two patch rows of padding top and bottom,
  one with a row half covered), a tall one, a square one."""
  boxes = [(28, 0, 28, 84), (21, 0, 42, 84), (0, 14, 84, 56), (0, 0, 84, 84), (14, 0, 56, 84)]
  return np.stack([preprocess.content_mask(boxes[i % len(boxes)], 84) for i in range(n)])


@pytest.mark.parametrize("vote", ["majority", "off"])
def test_padding_is_never_a_reference_and_the_score_reads_the_image_alone(setup, vote):
  conf = setup[-1].replace(vote=vote, resize="letterbox")
  content = contents(5)
  out, want = padded(setup, conf, content)
  assert_matches(out, want, np.ones(5, bool))
  pad = np.asarray(references.padding_patches(content, (6, 6)))
  masks = np.asarray(out.masks)
  assert pad.any() and masks[:, pad].all()
  # The padding changed the results (the test would see a scorer that ignores it).
  plain = fj.detect(setup[0], CFG, conf, setup[1], np.ones(5, bool), setup[2])
  assert np.abs(np.asarray(plain.image_scores) - np.asarray(out.image_scores)).max() > 1e-3


def test_a_letterboxed_bank_keeps_its_padding_out(setup):
  conf = setup[-1].replace(references="both", resize="letterbox")
  out, want = padded(setup, conf, contents(5), bank_k=2)
  assert_matches(out, want, np.ones(3, bool))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
  d = tmp_path_factory.mktemp("wide")
  out = []
  for i, s in enumerate(mvtec_samples(demo_root(), "hazelnut")[:4]):
    p = d / f"w{i}.png"
    Image.open(s.path).convert("RGB").resize((400, 150), Image.Resampling.BICUBIC).save(p)
    out.append(Sample(str(p), s.label))
  return out


def test_the_scoring_loop_and_the_predictor_letterbox_alike(wide):
  """The folder scorer's loop and the predictor: the same scores and squashed-geometry maps, a
  short batch topped up in both; and a bundle's letterboxed bank keeps its padding on reload."""
  from fiseclip_jax.deploy.predictor import Predictor
  cfg = fj.CLIPConfig.tiny()
  conf = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2,
                       resize="letterbox")
  params = fj.init_params(cfg, 0)
  m, text = fj.Model.of(params, cfg), fj.text_features(params, cfg, "hazelnut", conf)
  got = scoring.score_samples(wide[:3], model=m, conf=conf, text=text, mesh=sharding.make_mesh(),
                              batch_size=2, top_up_pool=wide[:3], keep_maps=True)
  p = Predictor.build(class_name="hazelnut", conf=conf, cfg=cfg, batch_size=2)
  pred = p.predict([s.path for s in wide[:3]])
  np.testing.assert_allclose([r.score for r in pred], got.scores, rtol=0, atol=1e-6)
  for r, g in zip(pred, got.maps):
    np.testing.assert_allclose(r.map, np.asarray(Image.fromarray(g, mode="F").resize(
        (400, 150), Image.Resampling.BILINEAR)), rtol=0, atol=1e-6)
  bank_conf = conf.replace(references="bank")
  p = Predictor.build(class_name="hazelnut", conf=bank_conf, cfg=cfg, batch_size=2,
                      normal_images=[s.path for s in wide[2:]])
  assert p.bundle.bank_padding is not None and p.bundle.bank_padding.any()
  first = [r.score for r in p.predict([s.path for s in wide[:2]])]
  path = os.path.join(os.path.dirname(wide[0].path), "lb.bundle")
  p.save(path)
  again = Predictor.load(path, cache_dir="")
  assert [r.score for r in again.predict([s.path for s in wide[:2]])] == first


def test_letterbox_and_tiles_are_refused_together(wide, tmp_path):
  p = subprocess.run([sys.executable, "-m", "eval.folder", "--random_weights", "--model=demo",
                      "--image_size=112", "--noprogress", "--platform=cpu",
                      f"--images={os.path.dirname(wide[0].path)}", "--class_name=hazelnut",
                      f"--out={tmp_path / 'o'}", "--resize=letterbox", "--tile=200"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0 and "--resize letterbox is for whole images" in p.stderr, p.stderr
  assert "Traceback" not in p.stderr

"""Whole-category references (DESIGN.md §5 "category"): every image of a category against every
other, in blocks, equals one batch of all of them; over 8 simulated devices equals one device;
the filter's only collectives are all-gathers; its temporary memory grows with the block
workspace, not with the square of the category."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fiseclip_jax as fj
from conftest import SHARED_DATA
from fiseclip_jax.core.config import ConfigError
from fiseclip_jax.data import Sample, demo_root, mvtec_samples
from fiseclip_jax.method import ficlip, references, rescore
from fiseclip_jax.method.api import text_input
from fiseclip_jax.run import category, scoring, sharding, towers

ROOT = Path(__file__).resolve().parents[1]
HAZELNUT = SHARED_DATA / "otx_hazelnut_colour"
DATA = HAZELNUT if HAZELNUT.exists() else Path(demo_root())      # a fresh clone has only the demo
CFG = fj.CLIPConfig.tiny()
CONF = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2)
WHOLE = CONF.replace(reference_scope="category")
# Equal up to float32 summation order: a pair's distances are one matmul in batch mode (u with v,
# read both ways) and two here (u with v, v with u), whose sums XLA may order differently.
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
  params = fj.init_params(CFG, 0)
  return fj.Model.of(params, CFG), fj.text_features(params, CFG, "hazelnut", CONF)


@pytest.fixture(scope="module")
def samples():
  return mvtec_samples(str(DATA), "hazelnut")


def one_batch_of_all(model, samples, conf, bank=None):
  m, text = model
  return scoring.score_samples(samples, model=m, conf=conf, text=text, mesh=sharding.make_mesh(),
                               batch_size=len(samples), bank=bank, keep_maps=True).sorted()


def assert_same(a, b):
  np.testing.assert_array_equal(a.index, b.index)
  np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=TOL)
  np.testing.assert_allclose(a.maps, b.maps, rtol=0, atol=TOL)
  np.testing.assert_array_equal(a.n_ref, b.n_ref)
  np.testing.assert_array_equal(a.seclip_only, b.seclip_only)
  np.testing.assert_array_equal(a.no_candidates, b.no_candidates)


@pytest.mark.parametrize("batch_size", [3, 4])   # 3: a short last batch and empty blocks
def test_the_whole_category_equals_one_batch_of_all_of_it(model, samples, batch_size):
  m, text = model
  got = category.score_category(samples, model=m, conf=WHOLE, text=text,
                                mesh=sharding.make_mesh(), batch_size=batch_size,
                                keep_maps=True).sorted()
  want = one_batch_of_all(model, samples, CONF)
  assert_same(got, want)
  assert (got.n_ref == len(samples) - 1).all() or got.seclip_only.any()


def test_with_a_bank_the_whole_category_and_the_bank(model, samples):
  """references 'both' over the category: the other images and the bank, as one batch of all
  with the bank."""
  m, text = model
  good = [s for s in mvtec_samples(demo_root(), "hazelnut") if s.label == 0][:2]
  conf = CONF.replace(references="both")
  bank = towers.bank_on(m, conf, good, sharding.make_mesh())
  got = category.score_category(samples[:9], model=m, conf=conf.replace(reference_scope="category"),
                                text=text, mesh=sharding.make_mesh(), batch_size=4, bank=bank,
                                keep_maps=True).sorted()
  assert_same(got, one_batch_of_all(model, samples[:9], conf, bank))
  assert (got.n_ref[~got.seclip_only] > 8).all()          # 8 others and the bank's images


def test_letterboxed_the_whole_category_equals_one_batch_of_all_of_it(model, tmp_path):
  """Letterbox padding (DESIGN.md §2) is no reference in blocks either, and the image score
  reads each image's own pixels: wide images, padded slots in the last batch."""
  m, text = model
  wide = []
  for i, s in enumerate(mvtec_samples(demo_root(), "hazelnut")[:5]):
    p = tmp_path / f"w{i}.png"
    Image.open(s.path).convert("RGB").resize((300, 120 + 20 * i)).save(p)
    wide.append(Sample(str(p), s.label))
  conf = CONF.replace(resize="letterbox")
  got = category.score_category(wide, model=m, conf=conf.replace(reference_scope="category"),
                                text=text, mesh=sharding.make_mesh(), batch_size=2,
                                keep_maps=True).sorted()
  assert_same(got, one_batch_of_all(model, wide, conf))


def test_blocks_in_the_filter_equal_every_pair_at_once():
  """ficlip.mutual_filtering with `block` against its all-pairs path, with a bank, masks that
  leave images without any patch, padding slots and a match window."""
  rng = np.random.default_rng(0)
  s, g, b, n, c, k = 3, 2, 12, 16, 8, 3
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  steps = jnp.asarray(unit(rng.normal(size=(s, g, b, n, c))), jnp.float32)
  bank = references.bank(jnp.asarray(unit(rng.normal(size=(s, g, k, n, c))), jnp.float32))
  mask0 = rng.random((b, n)) < 0.3
  mask0[3] = True                                          # no patch left: never a reference
  valid = np.ones(b, bool)
  valid[-2:] = False                                       # padding
  refs = jnp.asarray(valid[None, :] & ~np.eye(b, dtype=bool) & valid[:, None])
  ext_refs = jnp.asarray(np.broadcast_to(valid[:, None], (b, k)))
  for kw in (dict(), dict(external=bank, ext_refs=ext_refs),
             dict(grid=(4, 4), match_window=1), dict(agg="min")):
    kw = {"mu": 0.9, "rule": "majority", "topk_frac": 0.3, "agg": "interval", "pair_chunk": 4,
          **kw}
    want = ficlip.mutual_filtering(steps, jnp.asarray(mask0), refs, **kw)
    for block in (2, 4, 6):
      got = ficlip.mutual_filtering(steps, jnp.asarray(mask0), refs, block=block, **kw)
      for x, y in zip(got, want):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0,
                                   atol=TOL)


def test_slots_per_device_are_a_few_size_classes():
  """Rounds up to 1, 2, 3, 4, 6, 8, 12, 16, ...: a handful of programs, a third padding at most."""
  assert [category.slots_per_device(n, 4, 1) for n in (1, 4, 5, 12, 13, 23, 33, 49, 65)] == \
      [1, 1, 2, 3, 4, 6, 12, 16, 24]
  assert [category.slots_per_device(n, 4, 8) for n in (1, 32, 33, 64, 65, 97)] == \
      [1, 1, 2, 2, 3, 4]
  for rounds in range(1, 200):
    slots = category.slots_per_device(rounds * 4, 4, 1)
    assert rounds <= slots < 1.5 * rounds + 1


def test_config_refuses_a_scope_without_other_images():
  with pytest.raises(ConfigError, match="reference_scope"):
    CONF.replace(references="bank", reference_scope="category")
  with pytest.raises(ConfigError, match="reference_scope"):
    CONF.replace(stream_window=4, reference_scope="category")


def test_the_filter_temporaries_grow_with_the_block_not_with_the_square(model):
  """XLA's buffer plan of the category's filter at n = 32 and 128 (blocks of 8): its temporaries
  grow by about one query block's distances to the added references, far below the all-pairs
  distances at 128 (which batch mode would hold)."""
  m, text = model
  spec = m.spec(WHOLE)
  mesh = sharding.make_mesh(jax.devices()[:1])
  block = 8
  shapes = category.part_shapes(spec, m.params, text_input(spec, text), block, False)
  temps = {}
  for n in (32, 128):
    slots = category.slots_per_device(n, block, 1)
    grow = lambda x, axis: jax.ShapeDtypeStruct(
        (1,) + x.shape[:axis] + (x.shape[axis] * slots,) + x.shape[axis + 1:], x.dtype)
    buf = category.Part(type(shapes.se)(*(grow(x, 0) for x in shapes.se)), grow(shapes.steps, 2),
                        None, grow(shapes.embed, 0))
    roles = fj.Roles(*(jax.ShapeDtypeStruct((1, n), t) for t in (bool, bool, jnp.int32)))
    compiled = category.filter_fn(mesh, spec, block).lower(buf, roles, None).compile()
    temps[n] = compiled.memory_analysis().temp_size_in_bytes
  _, g, _, n_patches, _ = shapes.steps.shape
  per_reference = g * block * n_patches * 4                # one query block's distances to one more
  all_pairs_128 = g * 128 * 128 * n_patches * 4
  assert temps[128] - temps[32] <= 3 * per_reference * (128 - 32), temps
  assert temps[128] < all_pairs_128 / 2, temps


EIGHT = """
import json, numpy as np, jax
import fiseclip_jax as fj
from fiseclip_jax.method.api import text_input
from fiseclip_jax.run import category, sharding
cfg = fj.CLIPConfig.tiny()
conf = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2,
                     reference_scope="category")
mesh = sharding.make_mesh()
m = fj.Model.of(sharding.replicate(fj.init_params(cfg, 0), mesh), cfg)
spec = m.spec(conf)
text = text_input(spec, np.zeros((2, cfg.embed_dim), np.float32))
buf = category.empty_parts(mesh, category.part_shapes(spec, m.params, text, 2, False), 2)
q = np.ones((8, 4), bool)
hlo = category.filter_fn(mesh, spec, 2).lower(buf, fj.Roles(q, q, np.zeros(q.shape, np.int32)),
                                              None).compile().as_text()
print(json.dumps([c for c in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter",
                              "collective-permute") if c in hlo]))
"""


def test_the_filter_over_devices_holds_all_gathers_only():
  """Over a mesh each device filters its own images against the step's features and masks of
  every device, gathered once per step: all-gathers, no other collective (DESIGN.md §11). That
  8 devices give the scores of one batch of all is the program test below."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-c", EIGHT], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.strip().splitlines()[-1]) == ["all-gather"]


FAST = ["--random_weights", "--model=demo", "--image_size=112", "--noprogress", "--platform=cpu",
        "--report=false"]


def run_eval(out, *extra, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "eval.mvtec", f"--data_root={DATA}",
                           f"--out={out}", *FAST, *extra], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scores_of(out):
  with open(out / "scores" / "hazelnut.csv") as f:
    return {r["path"]: float(r["score"]) for r in csv.DictReader(f)}


def test_the_program_over_the_category_on_eight_devices_equals_one_batch_of_all(tmp_path,
                                                                                 samples):
  n = len(samples)
  procs = [run_eval(tmp_path / "category", "--references=category", "--batch_size=4",
                    "--num_devices=8", devices=8),
           run_eval(tmp_path / "batch", f"--batch_size={n}"),
           run_eval(tmp_path / "rescored", "--references=category", "--batch_size=8",
                    "--rescore=rscin")]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  assert "over the whole category" in outs[0][0]
  got, want = scores_of(tmp_path / "category"), scores_of(tmp_path / "batch")
  assert got.keys() == want.keys() and len(got) == n
  assert max(abs(got[k] - want[k]) for k in got) <= TOL
  doc = json.loads((tmp_path / "category" / "results.json").read_text())
  assert doc["config"]["reference_scope"] == "category"
  assert doc["identity"]["config"]["reference_scope"] == "category"
  batch_doc = json.loads((tmp_path / "batch" / "results.json").read_text())
  assert "reference_scope" not in batch_doc["identity"]["config"]   # earlier runs still resume
  assert "rescore" not in batch_doc["identity"] and batch_doc["rescore"] is None
  # --rescore rscin: image scores change, maps (the pixel metrics) do not; recorded.
  rescored = scores_of(tmp_path / "rescored")
  assert rescored.keys() == want.keys()
  assert max(abs(rescored[k] - want[k]) for k in want) > 1e-3
  doc = json.loads((tmp_path / "rescored" / "results.json").read_text())
  assert doc["rescore"] == doc["identity"]["rescore"] == {"method": "rscin", "ks": [1, 2, 3]}
  pixel = lambda d: d["categories"]["hazelnut"]["metrics"]["pixel"]
  assert pixel(doc) == pytest.approx(pixel(batch_doc), abs=1e-6)


def test_rscin_over_the_category_is_the_same_in_both_modes(model, samples):
  """RsCIN reads each image's score and CLS embedding: both equal between the modes."""
  m, text = model
  whole = category.score_category(samples, model=m, conf=WHOLE, text=text,
                                  mesh=sharding.make_mesh(), batch_size=8).sorted()
  batch = one_batch_of_all(model, samples, CONF)
  np.testing.assert_allclose(whole.embeds, batch.embeds, rtol=0, atol=TOL)
  np.testing.assert_allclose(rescore.rscin(whole.scores, whole.embeds),
                             rescore.rscin(batch.scores, batch.embeds), rtol=0, atol=TOL)

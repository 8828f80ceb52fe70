"""Tiles (DESIGN.md §17): where they fall, how their maps blend, and the tiled scorer against the
untiled one run on the tiles cut out as files of their own (the written rule: each tile is
scored against the same tile of the other frames; a frame's score is the maximum over its tiles;
its map is the blend of its tiles' maps)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiseclip_jax as fj
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data import Sample, demo_root, mvtec_samples
from fiseclip_jax.data import tiles
from fiseclip_jax.outputs.overlays import resize_map
from fiseclip_jax.run import scoring, sharding, tiled

ROOT = Path(__file__).resolve().parents[1]
CFG = fj.CLIPConfig.tiny()
CONF = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2)


def written_starts(length, tile, overlap):
  """DESIGN §17 in words: one tile when the axis fits; else the fewest tiles, the first at 0 and
  the last flush with the end, spread evenly (each start rounded), neighbours overlapping by at
  least `overlap`."""
  if length <= tile:
    return [0]
  n = 2
  while (length - tile) / (n - 1) > tile - overlap:
    n += 1
  return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@pytest.mark.parametrize("length,tile,overlap", [(1600, 800, 0), (1600, 800, 64), (1200, 800, 0),
                                                 (1000, 300, 50), (300, 300, 0), (299, 300, 10),
                                                 (1201, 400, 399), (17, 5, 4)])
def test_tiles_fall_where_the_rule_says(length, tile, overlap):
  t = tiles.Tiling(tile, overlap)
  got = tiles.starts(length, t)
  assert got == written_starts(length, tile, overlap)
  size = min(tile, length)
  assert got[0] == 0 and got[-1] + size == length
  assert all(b - a <= tile - overlap for a, b in zip(got, got[1:]))   # overlap at least P


def test_boxes_are_row_major_and_an_axis_that_fits_is_one_tile():
  assert tiles.boxes((1200, 1600), tiles.Tiling(800)) == [
      (0, 0, 800, 800), (0, 800, 800, 800), (400, 0, 800, 800), (400, 800, 800, 800)]
  assert tiles.boxes((1200, 1600), tiles.Tiling(1600)) == [(0, 0, 1200, 1600)]
  assert tiles.boxes((300, 1000), tiles.Tiling(500)) == [(0, 0, 300, 500), (0, 500, 300, 500)]


@pytest.mark.parametrize("tile,overlap", [(0, 0), (8, 8), (8, -1)])
def test_a_tiling_out_of_range_is_refused(tile, overlap):
  with pytest.raises(ValueError):
    tiles.Tiling(tile, overlap)


@pytest.mark.parametrize("hw,tile,overlap", [((1200, 1600), 800, 100), ((97, 131), 40, 13),
                                             ((64, 64), 64, 0), ((50, 90), 30, 0)])
def test_blend_weights_sum_to_one_and_are_one_at_the_borders(hw, tile, overlap):
  t = tiles.Tiling(tile, overlap)
  total = np.zeros(hw)
  for (top, left, h, w), wt in zip(tiles.boxes(hw, t), tiles.blend_weights(hw, t)):
    assert wt.shape == (h, w) and (wt > 0).all() and (wt <= 1).all()
    total[top:top + h, left:left + w] += wt
  np.testing.assert_allclose(total, 1.0, atol=1e-12)
  # A pixel that one tile alone covers takes that tile's map as it is.
  maps = [np.full((8, 8), float(i)) for i in range(len(tiles.boxes(hw, t)))]
  out = tiles.stitch(maps, hw, t, resize_map)
  assert out[0, 0] == 0.0 and out[-1, -1] == len(maps) - 1


def test_one_tile_stitches_to_the_resized_map_exactly():
  m = np.random.default_rng(0).random((56, 56)).astype(np.float32)
  out = tiles.stitch([m], (120, 160), tiles.Tiling(160), resize_map)
  np.testing.assert_array_equal(out, resize_map(m, (120, 160)))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
  """Five demo images upscaled to 1200 x 1600 (WxH 1600 x 1200), masks too."""
  d = tmp_path_factory.mktemp("frames")
  out = []
  for i, s in enumerate(mvtec_samples(demo_root(), "hazelnut")[:5]):
    p = d / f"f{i}.png"
    Image.open(s.path).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC).save(p)
    mask = None
    if s.mask_path:
      mask = d / f"f{i}_mask.png"
      Image.open(s.mask_path).resize((1600, 1200), Image.Resampling.NEAREST).save(mask)
    out.append(Sample(str(p), s.label, mask and str(mask), s.defect))
  return out


@pytest.fixture(scope="module")
def model():
  params = fj.init_params(CFG, 0)
  return fj.Model.of(params, CFG), fj.text_features(params, CFG, "hazelnut", CONF)


def run_both(model, frames, tiling, conf=CONF, bank=()):
  m, text = model
  mesh = sharding.make_mesh()
  kw = dict(model=m, conf=conf, text=text, mesh=mesh, batch_size=3, top_up_pool=frames,
            keep_maps=True)
  untiled = scoring.score_samples(
      frames, bank=fj_bank(m, conf, bank, mesh) if bank else None, with_masks=False, **kw)
  banks = None
  if bank:
    banks = tiled.banks_on(m, conf, bank, tiling, tiles.frame_size(frames, "frames"), mesh)
  return untiled, tiled.score_tiled(frames, tiling=tiling, banks=banks, with_masks=True, **kw)


def fj_bank(m, conf, bank, mesh):
  from fiseclip_jax.run import towers
  return towers.bank_on(m, conf, bank, mesh)


@pytest.mark.parametrize("references", ["batch", "both"])
def test_one_tile_over_the_whole_frame_is_the_untiled_run(model, frames, references):
  conf = CONF.replace(references=references)
  bank = frames[3:] if references == "both" else ()
  scored = frames[:3] if bank else frames
  untiled, got = run_both(model, scored, tiles.Tiling(1600), conf, bank)
  assert got.maps.shape == (len(scored), 1200, 1600)
  assert got.masks.shape == (len(scored), 1200, 1600)
  np.testing.assert_allclose(got.scores, untiled.scores, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got.n_ref, untiled.n_ref)
  for u, t in zip(untiled.maps, got.maps):
    np.testing.assert_allclose(t, resize_map(u, (1200, 1600)), rtol=0, atol=1e-6)


def test_each_tile_is_scored_against_the_same_tile_of_the_others(model, frames, tmp_path):
  """The oracle: every tile position cut out with PIL as files of its own, scored untiled (same
  batches, same top-up); the frame's score is the maximum, its map the blend (DESIGN §17)."""
  m, text = model
  t = tiles.Tiling(800, 64)
  bxs = tiles.boxes((1200, 1600), t)
  assert len(bxs) == 6
  per_tile = []
  for k, (top, left, h, w) in enumerate(bxs):
    cut = []
    for i, s in enumerate(frames):
      p = tmp_path / f"t{k}_{i}.png"
      Image.open(s.path).crop((left, top, left + w, top + h)).save(p)
      cut.append(Sample(str(p), s.label))
    per_tile.append(scoring.score_samples(cut, model=m, conf=CONF, text=text,
                                          mesh=sharding.make_mesh(), batch_size=3,
                                          top_up_pool=cut, keep_maps=True))
  _, got = run_both(model, frames, t)
  np.testing.assert_allclose(got.scores, np.max([r.scores for r in per_tile], 0), atol=1e-6)
  np.testing.assert_array_equal(got.n_ref, np.min([r.n_ref for r in per_tile], 0))
  weights = tiles.blend_weights((1200, 1600), t)
  for i in range(len(frames)):
    want = np.zeros((1200, 1600))
    for r, (top, left, h, w), wt in zip(per_tile, bxs, weights):
      want[top:top + h, left:left + w] += wt * resize_map(r.maps[i], (h, w))
    np.testing.assert_allclose(got.maps[i], want, rtol=0, atol=1e-5)
    gt = np.asarray(Image.open(frames[i].mask_path)) > 0 if frames[i].mask_path else 0
    np.testing.assert_array_equal(got.masks[i], np.zeros((1200, 1600), bool) | gt)


def test_frames_of_another_size_are_one_error_naming_the_file(frames, tmp_path):
  odd = tmp_path / "odd.png"
  Image.new("RGB", (1600, 1100)).save(odd)
  with pytest.raises(BadInputError, match=f"{re.escape(str(odd))}.*1600x1100.*1600x1200"):
    tiles.frame_size(frames + [Sample(str(odd))], "the run")


def folder(*args):
  return subprocess.run([sys.executable, "-m", "eval.folder", "--random_weights", "--model=demo",
                         "--image_size=112", "--noprogress", "--platform=cpu", "--batch_size=4",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_tiled_folder_run_writes_maps_and_overlays_at_the_frames_size(frames, tmp_path):
  images = tmp_path / "line"
  images.mkdir()
  for s in frames:
    os.link(s.path, images / os.path.basename(s.path))
  out = tmp_path / "out"
  p = folder(f"--images={images}", "--class_name=hazelnut", f"--out={out}", "--tile=800",
             "--tile_overlap=64", "--pixel_threshold=0.3", "--noreport")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "tiles of 800px (overlap 64)" in p.stdout
  for s in frames:
    name = os.path.basename(s.path)
    assert np.load(out / "maps" / f"{name}.npy").shape == (1200, 1600)
    assert Image.open(out / "maps" / f"{name}.png").size == (1600, 1200)
    assert Image.open(out / "masks" / f"{name}.png").size == (1600, 1200)


@pytest.mark.parametrize("flags,needle", [
    (["--tile_overlap=8"], "--tile_overlap is the overlap of tiles: it needs --tile"),
    (["--tile=64", "--tile_overlap=64"], "--tile_overlap 64: expected less than --tile 64"),
    (["--tile=0"], "--tile"),
    (["--tile=64", "--references=rolling"], "does not take --references rolling"),
])
def test_tile_flags_are_refused_before_the_model_loads(frames, tmp_path, flags, needle):
  p = folder(f"--images={os.path.dirname(frames[0].path)}", "--class_name=hazelnut",
             f"--out={tmp_path / 'o'}", *flags)
  assert p.returncode != 0 and needle in p.stderr, p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "o").exists()


def test_a_tiled_bundle_predicts_what_the_tiled_scorer_scores(model, frames, tmp_path):
  """The predictor (a bank per tile position, stored in the bundle) against run/tiled's scorer
  with the same bank: the same scores and maps at the frame's size, after a save and a load."""
  from fiseclip_jax.deploy.predictor import Predictor
  m, text = model
  t = tiles.Tiling(800, 64)
  conf = CONF.replace(references="bank")
  p = Predictor.build(class_name="hazelnut", conf=conf, cfg=CFG, batch_size=3, tiling=t,
                      normal_images=[s.path for s in frames[3:]])
  p.save(str(tmp_path / "tiled.bundle"))
  p = Predictor.load(str(tmp_path / "tiled.bundle"), cache_dir="")
  got = p.predict([s.path for s in frames[:3]])
  mesh = sharding.make_mesh()
  banks = tiled.banks_on(m, conf, frames[3:], t, (1200, 1600), mesh)
  want = tiled.score_tiled(frames[:3], tiling=t, model=m, conf=conf, text=text, mesh=mesh,
                           batch_size=3, banks=banks, keep_maps=True)
  np.testing.assert_allclose([r.score for r in got], want.scores, rtol=0, atol=1e-6)
  for r, w in zip(got, want.maps):
    assert r.map.shape == (1200, 1600)
    np.testing.assert_allclose(r.map, w, rtol=0, atol=1e-6)
  small = np.zeros((600, 800, 3), np.uint8)
  with pytest.raises(BadInputError, match="image 1 is 800x600 .* must be 1600x1200"):
    p.predict([frames[0].path, small])
  from fiseclip_jax.deploy.export import ExportError, scoring_fn
  with pytest.raises(ExportError, match="--tile"):
    scoring_fn(p, 3, "xla")

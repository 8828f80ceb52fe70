"""Heat maps that do not lie: the image's own size, one colour scale for a run, contours."""
import numpy as np
import pytest
from PIL import Image

from fiseclip_jax.outputs import overlays


def test_overlay_and_mask_keep_the_images_size(tmp_path):
  img = tmp_path / "part.png"
  Image.fromarray(np.full((600, 800, 3), 128, np.uint8)).save(img)          # H 600, W 800
  amap = np.zeros((112, 112), np.float32)
  amap[40:60, 50:80] = 1.0
  overlays.save_overlay(str(tmp_path / "o.png"), overlays.read_original(str(img)), amap, overlays.ColourScale(0, 1), 0.5, 0.9)
  overlays.save_mask(str(tmp_path / "m.png"), amap, 0.5, (600, 800))
  assert Image.open(tmp_path / "o.png").size == (800, 600)
  mask = np.asarray(Image.open(tmp_path / "m.png"))
  assert mask.shape == (600, 800) and set(np.unique(mask)) == {0, 255}
  # The defect sits where the map put it, stretched to the image's aspect ratio.
  ys, xs = np.nonzero(mask)
  assert abs(ys.mean() / 600 - 50 / 112) < 0.02 and abs(xs.mean() / 800 - 65 / 112) < 0.02


def test_same_score_same_colour_whatever_the_images_range():
  grey = np.full((64, 64, 3), 100, np.uint8)
  scale = overlays.ColourScale(0.0, 1.0)
  low = np.full((64, 64), 0.1, np.float32)
  high = np.full((64, 64), 0.9, np.float32)
  low[:16, :16] = high[:16, :16] = 0.4                  # the same score in both images
  a, b = overlays.render(grey, low, scale), overlays.render(grey, high, scale)
  np.testing.assert_array_equal(a[4:12, 4:12], b[4:12, 4:12])
  assert not np.array_equal(a[40:50, 40:50], b[40:50, 40:50])   # their own ranges still differ
  # Per-image min-max normalization (what overlays did before) paints both 0.4s differently.
  norm = lambda m: (m - m.min()) / (m.max() - m.min())
  assert not np.array_equal(overlays.colour(norm(low))[:16, :16], overlays.colour(norm(high))[:16, :16])


def test_contour_ground_truth_and_score_are_drawn():
  grey = np.full((100, 100, 3), 100, np.uint8)
  amap = np.zeros((100, 100), np.float32)
  amap[30:60, 30:60] = 1.0
  gt = np.zeros((100, 100), bool)
  gt[50:80, 50:80] = True
  out = overlays.render(grey, amap, overlays.ColourScale(0, 1), threshold=0.5, score=0.87,
                        ground_truth=gt)
  assert (out[30, 30:60] == overlays.CONTOUR).all()            # the threshold's edge
  assert (out[79, 60:80] == overlays.GROUND_TRUTH).all()       # the ground truth's edge
  assert (out[45, 45] != overlays.CONTOUR).any()               # inside: colour, not contour
  assert (out[2:12, 2:40] == 0).any()                          # the score's caption box


def test_colour_scale_parsing():
  assert overlays.ColourScale.parse("0.2,0.8") == (0.2, 0.8)
  assert overlays.ColourScale.parse("threshold", 0.3) == (0.0, 0.6)
  for bad in ("1,0", "x", "0.5"):
    with pytest.raises(ValueError):
      overlays.ColourScale.parse(bad)


def test_the_bottom_of_the_scale_shows_the_part_as_it_is():
  """Low scores leave the image visible: at or below the scale's low end the overlay is the
  original pixel; colour grows with the value up to MAX_OPACITY (no navy wash over the part)."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  amap = np.zeros((60, 80), np.float32)
  amap[:, 40:] = np.linspace(0.0, 1.0, 40)[None, :]
  out = overlays.render(rgb, amap, overlays.ColourScale(0.0, 1.0)).astype(int)
  np.testing.assert_array_equal(out[:, :41], rgb[:, :41])             # value 0: the image itself
  u = amap[0, 40:]
  off = np.abs(out[:, 40:] - rgb[:, 40:].astype(int)).max(axis=(0, 2))  # per column
  assert (off <= overlays.opacity(u) * 255 + 1).all(), off            # near the bottom: nearly it
  assert off[1] <= 0.05 * 255
  top = overlays.colour(np.float32(1.0)).astype(float)
  expect = (1 - overlays.MAX_OPACITY) * rgb[:, -1] + overlays.MAX_OPACITY * top
  assert np.abs(out[:, -1] - expect).max() <= 1                       # the top: MAX_OPACITY colour


def test_the_colour_map_is_perceptual():
  """Lightness rises monotonically along the scale (a map a reader can rank values on)."""
  rgb = overlays.colour(np.linspace(0, 1, 64, dtype=np.float32)).astype(float) / 255
  luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
  assert (np.diff(luma) > 0).all()
  stops = overlays.legend_stops(5)
  assert stops[0][0] == 0.0 and stops[-1][0] == 1.0 and len(stops) == 5


def test_the_legend_strip_shows_scale_contour_and_ground_truth():
  grey = np.full((200, 300, 3), 100, np.uint8)
  amap = np.zeros((200, 300), np.float32)
  amap[50:100, 50:100] = 0.8
  gt = np.zeros((200, 300), bool)
  gt[60:90, 60:90] = True
  scale = overlays.ColourScale(0.0, 1.0)
  plain = overlays.render(grey, amap, scale, 0.5, 0.8, gt)
  out = overlays.render(grey, amap, scale, 0.5, 0.8, gt, legend=True)
  assert out.shape[0] > plain.shape[0] and out.shape[1:] == plain.shape[1:]
  np.testing.assert_array_equal(out[:200], plain)                       # the overlay unchanged
  strip = out[200:].reshape(-1, 3)
  as_set = {tuple(p) for p in strip}
  for u in (0.0, 0.5, 1.0):                                             # the colour bar
    c = overlays.colour(np.float32(u)).astype(int)
    assert np.abs(np.array(list(as_set), int) - c).sum(1).min() <= 6, u
  assert tuple(overlays.CONTOUR) in as_set and tuple(overlays.GROUND_TRUTH) in as_set
  # Without a threshold or ground truth the key names neither.
  bare = overlays.render(grey, amap, scale, legend=True)[200:].reshape(-1, 3)
  assert tuple(overlays.GROUND_TRUTH) not in {tuple(p) for p in bare}


def test_a_thumbnail_keeps_its_caption_readable(tmp_path):
  """A shrunk overlay is drawn at its small size, so the score's text is not a speck."""
  rgb = np.full((600, 800, 3), 90, np.uint8)
  amap = np.zeros((64, 64), np.float32)
  overlays.save_overlay(str(tmp_path / "t.png"), rgb, amap, overlays.ColourScale(0, 1), 0.5,
                        0.42, max_side=320)
  t = np.asarray(Image.open(tmp_path / "t.png"))
  assert t.shape == (240, 320, 3)
  rows = np.flatnonzero((t[:, :160] > 200).all(-1).any(1))   # rows holding the caption's text
  assert rows.size and rows.max() - rows.min() + 1 >= 8, rows

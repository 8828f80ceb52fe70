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
  assert not np.array_equal(overlays.jet(norm(low))[:16, :16], overlays.jet(norm(high))[:16, :16])


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

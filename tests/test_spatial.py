"""Spatial sanity of the FiCLIP map with random weights: a pasted foreign patch is found where it is.

Synthetic textures (horizontal stripes, vertical stripes, checkers, smooth noise), one batch of six
images per texture, each image with its own phase, tint and pixel noise; images 1, 3 and 5 get a
foreign square (a 3-pixel checker of a saturated colour against its complement) pasted at a known
place. The places are off the diagonal and away from their mirror positions, and not aligned to the
patch grid, so a transposed, flipped or shifted map scores the wrong pixels:

  - pixel AUROC of the anomaly maps against the pasted masks, over the defective images of each
    texture, is above 0.9;
  - the same maps transposed, flipped up-down or left-right score below 0.7 (chance is 0.5);
  - shifting the maps by whole pixels does not improve them (best shift within 3 pixels);
  - the image scores rank defective above good images on average.

Only the FiCLIP map is tested: se_weight=0 drops P_a from the fusion, image_score="max". The
SeCLIP initial mask M0 comes from random text features: with the paper's lam=1.1 it covered 0 to
100% of the patches here depending on seed and texture (all of them for checkers and noise with
seed 0, which leaves no reference and falls back to SeCLIP). So M0 is switched off: vote="off" (the
paper's "w/o filtering": plain mutual scoring), and vote="majority" with lam=inf (M0 empty; the
exclusions come from FiCLIP's own votes a_r > mu; with mu=0.57 they are few, 0-5% of the patches).

Robustness (random weights, so measured rather than assumed): seed 0 was fixed up-front. Over model
seeds 0-9 (each with its own images), the smallest per-texture pixel AUROC was 0.963, the largest
transposed / flipped AUROC 0.53, the best whole-pixel shift between -1 and +2, and the smallest image
AUROC of a texture 0.89. Per image the pixel AUROC is 0.95-0.99: what lowers the pooled AUROC is an
offset of a whole image's map (an image whose background matches its references less well), not the
localization. With the random init before residual-branch scaling (blocks' out / fc2 kernels not
scaled by (2L)^-1/2), seed 0 passes as well but one seed of ten (1, horizontal stripes) falls to
0.84. The three squares of a batch have different colours on purpose: a foreign patch that also
appears in another image of the batch finds its match there (mutual scoring's known blind spot),
which is how an earlier draft with random colours fell to 0.91.

Mutation checks (monkeypatched, not part of the suite) all fail this file: the pixel map or the
patch map transposed or flipped, the token grid transposed after the patch embedding, the patch
map rolled by one patch, the pixel map shifted by 5 or 7 pixels. Sub-pixel conventions of the
upsampling (half-pixel centres vs align_corners) are pinned by the torch parity tests in
test_numpy_reference.py and test_pipeline.py, not here.
"""
import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

import fiseclip_jax as fj

SIDE, PATCH = 112, 14                    # an 8 x 8 patch grid
SQUARE = 28                              # pasted square: 2 x 2 patches, not grid-aligned
# Top-left corners, one per defective image: each square is disjoint from its transpose and from
# its up-down and left-right mirror images.
PLACES = ((6, 62), (66, 18), (24, 80))
N_IMAGES = 6
DEFECTIVE = np.arange(N_IMAGES) % 2 == 1          # images 1, 3, 5
TEXTURES = ("hstripes", "vstripes", "checkers", "noise")
SEED = 0

CFG = fj.CLIPConfig.tiny(vision_layers=4, image_size=SIDE, patch_size=PATCH, width=64)
BASE = fj.FiSeConfig(se_weight=0.0, image_size=SIDE, feature_layers=(1, 2, 3, 4), proxy_layer=2,
                     image_score="max")
VARIANTS = {
    "off": BASE.replace(vote="off"),
    "majority": BASE.replace(vote="majority", lam=float("inf")),
}

def texture(kind, rng):
  """(SIDE, SIDE, 3) in 0..1: a tinted texture with a random phase."""
  y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
  dy, dx = rng.uniform(0, 16, 2)
  if kind == "hstripes":
    v = 0.5 + 0.4 * np.sign(np.sin(2 * np.pi * (y + dy) / 12))
  elif kind == "vstripes":
    v = 0.5 + 0.4 * np.sign(np.sin(2 * np.pi * (x + dx) / 12))
  elif kind == "checkers":
    v = 0.5 + 0.4 * np.sign(np.sin(2 * np.pi * (y + dy) / 16) * np.sin(2 * np.pi * (x + dx) / 16))
  elif kind == "noise":
    n = ndimage.gaussian_filter(rng.randn(SIDE, SIDE), 2.0, mode="wrap")
    v = 0.5 + 0.15 * np.tanh(n / n.std())
  else:
    raise ValueError(kind)
  tint = np.array([0.9, 0.8, 0.6]) + rng.uniform(-0.05, 0.05, 3)
  return v[..., None] * tint


def foreign(rng, j):
  """(SQUARE, SQUARE, 3): a 3-pixel checker of a saturated colour and its complement.

  The j-th square of a batch is reddish, greenish or bluish: a foreign patch that also appears in
  another image of the batch would find its match there (mutual scoring's known blind spot).
  """
  c1 = np.roll([1.0, rng.uniform(0, 1), 0.0], j)
  y, x = np.mgrid[0:SQUARE, 0:SQUARE]
  m = ((y // 3 + x // 3) % 2)[..., None]
  return m * c1 + (1 - m) * (1 - c1)


def make_batch(kind, seed):
  """Images (B, S, S, 3), RGB in [0, 1], and the pasted-square masks (B, S, S)."""
  rng = np.random.RandomState(seed)
  images, masks = [], []
  places = iter(enumerate(PLACES))
  for defective in DEFECTIVE:
    img = texture(kind, rng)
    mask = np.zeros((SIDE, SIDE), bool)
    if defective:
      j, (r, c) = next(places)
      img[r:r + SQUARE, c:c + SQUARE] = foreign(rng, j)
      mask[r:r + SQUARE, c:c + SQUARE] = True
    img = np.clip(img + 0.02 * rng.randn(*img.shape), 0.0, 1.0)
    images.append(img)
    masks.append(mask)
  return np.stack(images).astype(np.float32), np.stack(masks)


def test_places_are_not_symmetric():
  """The test's own premise: a transposed or mirrored square never touches the true one."""
  for r, c in PLACES:
    m = np.zeros((SIDE, SIDE), bool)
    m[r:r + SQUARE, c:c + SQUARE] = True
    assert r % PATCH and c % PATCH                      # not aligned to the patch grid
    for other in (m.T, m[::-1], m[:, ::-1]):
      assert not (m & other).any()


@pytest.fixture(scope="module")
def runs():
  """Results per (variant, texture), computed on first use."""
  params = fj.init_params(CFG, seed=SEED)
  text = fj.text_features(params, CFG, "texture", BASE)
  cache = {}

  def get(variant, kind):
    if (variant, kind) not in cache:
      images, masks = make_batch(kind, 100 + 10 * SEED + TEXTURES.index(kind))
      t0 = time.time()
      res = fj.detect(params, CFG, VARIANTS[variant], images, np.ones(N_IMAGES, bool), text)
      maps = np.asarray(res.anomaly_maps)
      cache[variant, kind] = dict(masks=masks, maps=maps, res=res, seconds=time.time() - t0)
    return cache[variant, kind]

  return get


def pixel_auroc(masks, maps):
  return roc_auc_score(masks[DEFECTIVE].ravel(), maps[DEFECTIVE].ravel())


@pytest.mark.parametrize("kind", TEXTURES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ficlip_map_finds_the_pasted_square(runs, variant, kind):
  run = runs(variant, kind)
  masks, maps, res = run["masks"], run["maps"], run["res"]
  assert maps.shape == (N_IMAGES, SIDE, SIDE)
  assert np.isfinite(maps).all()
  assert (np.asarray(res.n_ref) == N_IMAGES - 1).all()       # every image had all its references
  auroc = pixel_auroc(masks, maps)
  wrong = {"transposed": maps.transpose(0, 2, 1), "flipud": maps[:, ::-1], "fliplr": maps[:, :, ::-1]}
  wrong = {k: pixel_auroc(masks, v) for k, v in wrong.items()}
  per_image = [roc_auc_score(masks[i].ravel(), maps[i].ravel()) for i in np.where(DEFECTIVE)[0]]
  print(f"\n[{variant:8s} {kind:8s}] pixel AUROC {auroc:.3f} (per image "
        f"{', '.join(f'{a:.3f}' for a in per_image)}); "
        + ", ".join(f"{k} {v:.3f}" for k, v in wrong.items())
        + f"; excluded at the end {np.asarray(res.final_mask).mean():.2f}; {run['seconds']:.1f} s")
  assert auroc > 0.9, (variant, kind, auroc)
  for name, value in wrong.items():
    assert value < 0.7, (variant, kind, name, value)


def shifted(maps, dy, dx):
  """maps moved by (dy, dx) pixels (down, right), edges repeated."""
  p = max(abs(dy), abs(dx))
  m = np.pad(maps, ((0, 0), (p, p), (p, p)), mode="edge")
  return m[:, p - dy:p - dy + SIDE, p - dx:p - dx + SIDE]


def test_map_is_aligned_to_the_pixels(runs):
  """Shifting the maps by whole pixels does not improve them: the best shift is within 3 pixels.

  Pixel AUROC, averaged over the four textures, as a function of a row (column) shift of -10..10
  pixels; with seeds 0-9 its maximum sat at a shift of -1..2. A map misplaced by half a patch
  (7 pixels) would peak at a shift near -7.
  """
  shifts = np.arange(-10, 11)
  runs_ = [runs("off", kind) for kind in TEXTURES]
  best = {}
  for axis in ("rows", "cols"):
    curve = [np.mean([pixel_auroc(r["masks"], shifted(r["maps"], *((d, 0) if axis == "rows" else (0, d))))
                      for r in runs_]) for d in shifts]
    best[axis] = int(shifts[int(np.argmax(curve))])
  print(f"\nbest shift of the maps: {best['rows']:+d} rows, {best['cols']:+d} columns")
  assert abs(best["rows"]) <= 3 and abs(best["cols"]) <= 3, best


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_image_scores_rank_defective_above_good(runs, variant):
  labels, scores = [], []
  for kind in TEXTURES:
    s = np.asarray(runs(variant, kind)["res"].image_scores)
    print(f"\n[{variant:8s} {kind:8s}] image scores good {s[~DEFECTIVE].mean():.3f}, "
          f"defective {s[DEFECTIVE].mean():.3f}")
    assert s[DEFECTIVE].mean() > s[~DEFECTIVE].mean(), (variant, kind, s)
    labels.append(DEFECTIVE)
    scores.append(s)
  # Image AUROC within each batch (scores are compared within a texture, as in one category).
  aurocs = [roc_auc_score(l, s) for l, s in zip(labels, scores)]
  print(f"[{variant:8s}] image AUROC per texture {', '.join(f'{a:.2f}' for a in aurocs)}")
  assert np.mean(aurocs) > 0.8, aurocs

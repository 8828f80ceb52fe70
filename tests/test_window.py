"""Aligned matching (`match_window`, DESIGN.md §4): a patch meets only the reference patches within
w grid cells of its position. Checked against brute force written from that rule (every pair of
positions tested by its grid coordinates), on a non-square grid with masks; a window covering the
grid is unrestricted matching exactly; the pipeline with a window equals the NumPy reference
(tests/numpy_reference.py, extended by the same rule) in batch, bank and both modes."""
import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.method import ficlip, window
from test_extension import (CONF, TEXT_CFG, assert_close, bank_case, numpy_reference,  # noqa: F401
                            setup)

GRID = (3, 5)                 # non-square: a transposed index shows
# float32 sums of products (the windowed path) against float64 brute force.
TOL = 1e-5


def brute_force(fu, fv, ex_v, grid, w):
  """(N,) min over v's kept q with |dy|, |dx| <= w of ||F_u(p) - F_v(q)||; inf where none."""
  h, wd = grid
  out = np.full(fu.shape[0], np.inf)
  for p in range(fu.shape[0]):
    for q in range(fv.shape[0]):
      if ex_v[q] or abs(p // wd - q // wd) > w or abs(p % wd - q % wd) > w:
        continue
      out[p] = min(out[p], np.linalg.norm(fu[p] - fv[q]))
  return out


def features(rng, g=2, b=4, c=8):
  x = rng.randn(g, b, GRID[0] * GRID[1], c)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("w", [0, 1, 2])
def test_batch_pairs_in_a_window_equal_brute_force(w):
  rng = np.random.RandomState(w)
  f = features(rng)
  g, b, n, _ = f.shape
  exclude = rng.rand(b, n) < 0.3
  exclude[2, :] = True                         # slot 2 keeps nothing
  exclude[3, :] = True
  exclude[3, 0] = False                        # slot 3 keeps one corner patch
  d = np.asarray(ficlip.pair_min_distances(jnp.asarray(f, jnp.float32), jnp.asarray(exclude),
                                           pair_chunk=4, grid=GRID, match_window=w))
  for gi in range(g):
    for u in range(b):
      assert np.isinf(d[gi, u, u]).all()
      for v in range(b):
        if u != v:
          want = brute_force(f[gi, u], f[gi, v], exclude[v], GRID, w)
          np.testing.assert_array_equal(np.isinf(d[gi, u, v]), np.isinf(want))
          fin = np.isfinite(want)
          np.testing.assert_allclose(d[gi, u, v][fin], want[fin], atol=TOL, rtol=0)
  assert np.isinf(d[:, 0, 3]).any() and np.isfinite(d[:, 0, 3]).any()   # the corner's window


@pytest.mark.parametrize("w", [1, 2])
def test_tiles_of_a_larger_grid_equal_brute_force(w):
  """The tiled path itself (the programs take it at large grids, a mask on the full matmul at
  small ones), rows and columns, with masks, on a grid that does not divide into tiles."""
  grid = (11, 13)
  rng = np.random.RandomState(20 + w)
  f = rng.randn(2, 2, grid[0] * grid[1], 6)
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  ex = rng.rand(2, grid[0] * grid[1]) < 0.5
  x = jnp.asarray(f, jnp.float32)
  norms = ficlip.sq_norms(x)
  rows, cols = window.pair_distances(x[:, 0], x[:, 1], norms[:, 0], norms[:, 1], jnp.asarray(ex[0]),
                                     jnp.asarray(ex[1]), grid, w)
  for gi in range(2):
    for got, (a, b) in ((rows, (0, 1)), (cols, (1, 0))):
      want = brute_force(f[gi, a], f[gi, b], ex[b], grid, w)
      fin = np.isfinite(want)
      np.testing.assert_array_equal(np.isfinite(np.asarray(got[gi])), fin)
      np.testing.assert_allclose(np.asarray(got[gi])[fin], want[fin], atol=TOL, rtol=0)
  assert window.strategy((37, 37), w) == "tiled" and window.strategy((14, 14), w) == "masked"


@pytest.mark.parametrize("w", [0, 2])
def test_external_references_in_a_window_equal_brute_force(w):
  rng = np.random.RandomState(10 + w)
  f, e = features(rng, b=3), features(rng, b=2)
  ex = rng.rand(2, e.shape[2]) < 0.4
  d = np.asarray(ficlip.external_min_distances(jnp.asarray(f, jnp.float32),
                                               jnp.asarray(e, jnp.float32), jnp.asarray(ex),
                                               pair_chunk=2, grid=GRID, match_window=w))
  for gi in range(2):
    for u in range(3):
      for k in range(2):
        want = brute_force(f[gi, u], e[gi, k], ex[k], GRID, w)
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(d[gi, u, k]), fin)
        np.testing.assert_allclose(d[gi, u, k][fin], want[fin], atol=TOL, rtol=0)


def test_a_window_covering_the_grid_is_unrestricted_matching():
  rng = np.random.RandomState(3)
  f = jnp.asarray(features(rng), jnp.float32)
  exclude = jnp.asarray(rng.rand(4, 15) < 0.3)
  free = ficlip.pair_min_distances(f, exclude, 4)
  for w in (max(GRID) - 1, 10):                # the run takes the unrestricted path: exactly equal
    np.testing.assert_array_equal(np.asarray(ficlip.pair_min_distances(f, exclude, 4, GRID, w)),
                                  np.asarray(free))
  # The shifted views themselves, forced over the whole grid, agree with the matmul to rounding.
  norms = ficlip.sq_norms(f)
  rows, cols = window.pair_distances(f[:, 0], f[:, 1], norms[:, 0], norms[:, 1], exclude[0],
                                     exclude[1], GRID, max(GRID) - 1)
  np.testing.assert_allclose(np.asarray(rows), np.asarray(free[:, 0, 1]), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(cols), np.asarray(free[:, 1, 0]), atol=TOL, rtol=0)


def test_the_tiles_hold_every_neighbour_and_the_flops_count_them():
  for grid, w in (((3, 5), 0), ((3, 5), 1), ((7, 4), 2), ((37, 37), 4)):
    tl = window.tiling(grid, w)
    big_h, big_w = tl.padded
    qy, qx = np.divmod(tl.queries, big_w)                 # (T, t^2)
    ry, rx = np.divmod(tl.regions, big_w)                 # (T, R^2)
    near = (np.abs(qy[:, :, None] - ry[:, None, :]) <= w) & (np.abs(qx[:, :, None] - rx[:, None, :]) <= w)
    assert (near == tl.near[None]).all()                  # the mask is the window
    assert (near.sum(axis=2) == (2 * w + 1) ** 2).all()   # every neighbour is in the region
    inside = (qy >= w) & (qy < w + grid[0]) & (qx >= w) & (qx < w + grid[1])
    assert inside.sum() == grid[0] * grid[1] and len(set(tl.queries[inside].tolist())) == inside.sum()
  flops = ficlip.matching_flops(4, 1369, 8, 12, grid=(37, 37), match_window=1)
  assert flops == 6 * 12 * 2.0 * (13 * 13 * 9 * 25) * 8  # 13 x 13 tiles of 3 x 3, regions 5 x 5
  assert ficlip.matching_flops(4, 15, 8, 12, grid=GRID, match_window=1) == \
      ficlip.matching_flops(4, 15, 8, 12)                # masked: the full matmul
  assert ficlip.matching_flops(4, 15, 8, 12, grid=GRID, match_window=4) == \
      ficlip.matching_flops(4, 15, 8, 12)


@pytest.mark.parametrize("w", [0, 1])
def test_detect_with_a_match_window_equals_the_reference(setup, w):  # noqa: F811
  images, params, fi_params, text = setup
  conf = CONF.replace(match_window=w)
  valid = np.ones(5, bool)
  out = fj.detect(params, TEXT_CFG, conf, images, valid, text)
  assert_close(out, numpy_reference(params, images, text, conf, valid))
  free = fj.detect(params, TEXT_CFG, CONF, images, valid, text)
  assert np.abs(np.asarray(out.patch_map) - np.asarray(free.patch_map)).max() > 1e-3


def test_bank_with_a_match_window_equals_the_reference(setup):  # noqa: F811
  assert_close(*bank_case(setup, CONF.replace(references="both", match_window=1)))


def test_a_negative_window_is_refused():
  with pytest.raises(ValueError, match="match_window"):
    fj.FiSeConfig(match_window=-1)


def test_a_stream_with_a_match_window_equals_the_reference(setup):  # noqa: F811
  images, params, _, text = setup
  conf = CONF.replace(stream_window=2, match_window=1)
  ring = fj.empty_stream(TEXT_CFG, conf)
  roles = fj.make_roles(np.ones(4, bool), np.ones(4, bool), np.arange(4))
  res, _ = fj.score_stream(params, TEXT_CFG, conf, images[:4], roles, text, ring)
  want = numpy_reference(params, images[:4], text, conf, np.ones(4, bool), mode="rolling",
                         window=2, positions=np.arange(4))
  np.testing.assert_array_equal(np.asarray(res.n_candidates), [0, 1, 2, 2])
  assert_close(res, want)

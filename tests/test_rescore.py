"""RsCIN image re-scoring (DESIGN.md §18) against a NumPy reference written from the rule as §18
states it (loops over images and windows, float64), not from `method/rescore.py`: random inputs
with padding, one valid image, k clipped, ties, clamped negative cosines; properties (slot order,
embedding length, affine scores, identical embeddings); jit with padding equals the unpadded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax.method import rescore

# float32 (cosines from a float32 matmul, weighted sums) against float64 loops: relative errors
# are a few 1e-7 per operation on O(1) values and sums of <= 9 terms; 1e-5 leaves margin and is far
# below the differences a wrong window or weight makes (tested below: >= 1e-2).
TOL = 1e-5


def reference(scores, embeds, valid=None, ks=(1, 2, 3)):
  """§18 rule, in loops."""
  s = np.asarray(scores, np.float64)
  e = np.asarray(embeds, np.float64)
  n = len(s)
  v = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  out = s.copy()
  idx = [j for j in range(n) if v[j]]
  unit = {}
  for j in idx:
    norm = np.sqrt(sum(x * x for x in e[j]))
    unit[j] = e[j] / norm if norm > 0 else np.zeros_like(e[j])
  for i in idx:
    others = [j for j in idx if j != i]
    cos = {j: float(np.dot(unit[i], unit[j])) for j in others}
    ranked = sorted(others, key=lambda j: (-cos[j], j))   # largest cosine first, ties: smaller j
    total = 0.0
    for k in ks:
      m = min(k - 1, len(others))
      window = [i] + ranked[:m]
      num = den = 0.0
      for j in window:
        w = 1.0 if j == i else max(cos[j], 0.0)
        num += w * s[j]
        den += w
      total += num / den
    out[i] = total / len(ks)
  return out


def case(rng, n, d=16, spread=0.5):
  """Clustered embeddings, as one category's images (a wide spread gives some negative cosines)."""
  centre = rng.randn(d)
  e = centre + spread * np.linalg.norm(centre) * rng.randn(n, d) / np.sqrt(d)
  return rng.rand(n).astype(np.float32), e.astype(np.float32)


def run(scores, embeds, valid=None, ks=(1, 2, 3)):
  v = None if valid is None else jnp.asarray(valid)
  return np.asarray(rescore.rscin(jnp.asarray(scores), jnp.asarray(embeds), v, ks=ks))


@pytest.mark.parametrize("seed,n,ks", [(0, 7, (1, 2, 3)), (1, 12, (1, 8, 9)), (2, 30, (1, 2, 3)),
                                       (3, 5, (2, 3)), (4, 9, (1,)), (5, 20, (4, 1, 4))])
def test_equals_reference_on_random_inputs(seed, n, ks):
  rng = np.random.RandomState(seed)
  s, e = case(rng, n, spread=1.5)      # wide: some cosines negative, so the clamp is exercised
  valid = rng.rand(n) < 0.8
  valid[0] = True
  got = run(s, e, valid, ks)
  want = reference(s, e, valid, ks)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  np.testing.assert_array_equal(got[~valid], s[~valid])     # invalid: exactly their input
  assert got.dtype == np.float32 and got.shape == (n,)


def test_reference_sees_a_wrong_rule():
  """The tests can fail: rules one step off (uniform weights; self left out) differ by >= 1e-2."""
  rng = np.random.RandomState(7)
  s, e = case(rng, 10, spread=1.5)
  want = reference(s, e)
  got = run(s, e)
  u = e / np.linalg.norm(e, axis=1, keepdims=True)
  c = u @ u.T
  uniform, no_self = [], []
  for i in range(10):
    order = [j for j in np.argsort(-c[i], kind="stable") if j != i]
    uniform.append(np.mean([np.mean(s[[i] + order[:k - 1]]) for k in (1, 2, 3)]))
    no_self.append(np.mean([np.average(s[order[:k]], weights=np.maximum(c[i, order[:k]], 1e-9))
                            for k in (1, 2, 3)]))
  for wrong in (uniform, no_self):
    assert np.max(np.abs(np.array(wrong) - want)) > 1e-2
    assert np.max(np.abs(got - np.array(wrong))) > 1e-2


def test_one_valid_image_is_unchanged():
  rng = np.random.RandomState(1)
  s, e = case(rng, 6)
  valid = np.zeros(6, bool)
  valid[3] = True
  np.testing.assert_array_equal(run(s, e, valid), s)
  np.testing.assert_array_equal(run(s[:1], e[:1]), s[:1])    # n = 1, no mask


def test_padding_rows_reach_no_valid_output():
  """NaN and huge values in invalid slots change nothing; invalid outputs are their inputs."""
  rng = np.random.RandomState(2)
  s, e = case(rng, 8)
  valid = np.array([1, 1, 0, 1, 1, 0, 1, 0], bool)
  s2, e2 = s.copy(), e.copy()
  s2[~valid] = [np.nan, 1e30, -np.inf]
  e2[2] = np.nan
  e2[5] = 1e20 * e[0]                  # would be everyone's nearest neighbour if it counted
  got = run(s2, e2, valid)
  np.testing.assert_allclose(got[valid], run(s[valid], e[valid]), atol=TOL, rtol=TOL)
  np.testing.assert_array_equal(got[~valid], s2[~valid])
  np.testing.assert_allclose(got[valid], reference(s, e, valid)[valid], atol=TOL, rtol=TOL)


def test_k_clipped_to_the_valid_images():
  """3 valid images: window 9 holds all 3, as window 3 does; with 2 valid, windows 2 and 3 agree."""
  rng = np.random.RandomState(3)
  s, e = case(rng, 5)
  valid = np.array([1, 0, 1, 1, 0], bool)
  np.testing.assert_allclose(run(s, e, valid, ks=(9,)), run(s, e, valid, ks=(3,)), atol=TOL)
  np.testing.assert_allclose(run(s, e, valid, ks=(1, 8, 9)), reference(s, e, valid, (1, 8, 9)),
                             atol=TOL, rtol=TOL)
  two = np.array([1, 0, 0, 1, 0], bool)
  np.testing.assert_allclose(run(s, e, two, ks=(3,)), run(s, e, two, ks=(2,)), atol=TOL)
  # by hand, 2 valid images a (0), b (3): w = max(cos, 0); windows 1, 2, 2
  c = float(e[0] @ e[3] / np.linalg.norm(e[0]) / np.linalg.norm(e[3]))
  w = max(c, 0.0)
  want_a = (s[0] + 2 * (s[0] + w * s[3]) / (1 + w)) / 3
  np.testing.assert_allclose(run(s, e, two)[0], want_a, atol=TOL)


def test_ties_go_to_the_smaller_index_and_self_stays():
  """Identical embeddings: every weight 1, window k = self + the k - 1 smallest other indices."""
  s = np.array([0.9, 0.1, 0.5, 0.3, 0.7], np.float32)
  e = np.tile(np.array([[1.0, 2.0, -0.5]], np.float32), (5, 1))
  e[2] *= 3.0                                           # length does not count
  got = run(s, e, ks=(1, 2, 3))
  others = lambda i: [j for j in range(5) if j != i]   # noqa: E731
  want = [np.mean([np.mean([s[i]] + [s[j] for j in others(i)[:k - 1]]) for k in (1, 2, 3)])
          for i in range(5)]
  np.testing.assert_allclose(got, want, atol=TOL)
  np.testing.assert_allclose(got, reference(s, e), atol=TOL)
  # a duplicate of image 0 at slot 4: image 4's window 2 holds itself and 0, not 0 alone
  e2 = np.eye(5, 3, dtype=np.float32) + 0.1
  e2[4] = e2[0]
  got2 = run(s, e2, ks=(2,))
  np.testing.assert_allclose(got2[4], (s[4] + s[0]) / 2, atol=TOL)
  np.testing.assert_allclose(got2[0], (s[0] + s[4]) / 2, atol=TOL)


def test_negative_cosines_weigh_nothing():
  """An image whose only other is opposite: weight 0, its score stays."""
  s = np.array([0.2, 0.8], np.float32)
  e = np.array([[1.0, 0.0], [-1.0, 0.1]], np.float32)
  np.testing.assert_allclose(run(s, e), s, atol=TOL)
  # and a zero embedding: cosine 0 with everyone, weight 0
  s3 = np.array([0.2, 0.8, 0.4], np.float32)
  e3 = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.2]], np.float32)
  got = run(s3, e3)
  assert got[0] == pytest.approx(0.2, abs=TOL)
  np.testing.assert_allclose(got, reference(s3, e3), atol=TOL)


def test_permutation_equivariant():
  rng = np.random.RandomState(4)
  s, e = case(rng, 15)
  valid = rng.rand(15) < 0.7
  p = rng.permutation(15)
  np.testing.assert_allclose(run(s[p], e[p], valid[p]), run(s, e, valid)[p], atol=TOL, rtol=TOL)


def test_positive_affine_scores_map_through():
  """a s + b in, a r + b out (MuSc's min-max normalization is such a map: same ranking)."""
  rng = np.random.RandomState(5)
  s, e = case(rng, 11)
  lo, hi = s.min(), s.max()
  np.testing.assert_allclose(run((s - lo) / (hi - lo), e), (run(s, e) - lo) / (hi - lo),
                             atol=1e-5)
  np.testing.assert_allclose(run(3.0 * s + 2.0, e), 3.0 * run(s, e) + 2.0, atol=1e-4)


def test_pulls_a_noisy_normal_image_down():
  """The purpose: a high score among low-scored look-alikes drops; its window-1 share remains."""
  rng = np.random.RandomState(6)
  e = rng.randn(1, 8) + 0.05 * rng.randn(6, 8)
  s = np.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
  got = run(s, e)
  assert 0.9 / 3 < got[0] < 0.9 * 0.7


def test_jit_with_padding_equals_unpadded():
  rng = np.random.RandomState(8)
  s, e = case(rng, 9)
  f = jax.jit(rescore.rscin, static_argnames=("ks",))
  pad = 16
  sp = np.concatenate([s, np.full(pad - 9, 5.0, np.float32)])
  ep = np.concatenate([e, rng.randn(pad - 9, e.shape[1]).astype(np.float32)])
  vp = np.arange(pad) < 9
  got = np.asarray(f(jnp.asarray(sp), jnp.asarray(ep), jnp.asarray(vp), ks=(1, 2, 3)))
  np.testing.assert_allclose(got[:9], run(s, e), atol=TOL, rtol=TOL)
  np.testing.assert_array_equal(got[9:], sp[9:])
  # a second mask with the same shapes: no recompile, still right
  vp2 = np.arange(pad) < 4
  got2 = np.asarray(f(jnp.asarray(sp), jnp.asarray(ep), jnp.asarray(vp2), ks=(1, 2, 3)))
  np.testing.assert_allclose(got2[:4], run(s[:4], e[:4]), atol=TOL, rtol=TOL)
  assert f._cache_size() == 1


@pytest.mark.parametrize("ks", [(), (0, 1), (1, -2), (1.5,)])
def test_bad_window_sizes_are_refused(ks):
  with pytest.raises(ValueError):
    rescore.rscin(jnp.zeros(3), jnp.ones((3, 2)), ks=ks)

"""FiCLIP-AD building blocks: the k rule, per-image voters and the distance numerics.

Each test here was written to fail on the code before the references issue (see the note of
that change): floor(0.7 * 90) in floating point, a shared voter count, and `2 - 2 cos` in bf16.
"""
import inspect

import numpy as np
import jax.numpy as jnp

import fiseclip_jax as fj
from fiseclip_jax.method import ficlip


def test_interval_k_is_computed_in_integers():
  """k = max(1, floor(frac * n_ref)) exactly, frac read as the decimal it is written as.

  0.7 x 90 = 63 (float64 gives floor(62.99999...) = 62, as the NumPy reference did);
  0.036 x 1250 = 45 (float32 with a 1e-6 nudge, as the scorer did, gives 44).
  """
  for frac, n, k in ((0.7, 90, 63), (0.036, 1250, 45), (0.7, 9000, 6300), (0.3, 9, 2), (0.3, 1, 1)):
    # The k-th smallest distance is the first 1: the mean is 1/k, and 0 if k were one less.
    d = np.where(np.arange(n) < k - 1, 0.0, 1.0).astype(np.float32)[None, None, :, None]
    s, n_ref = ficlip.aggregate(jnp.asarray(d), jnp.ones((1, n), bool), frac, "interval")
    assert int(n_ref[0]) == n
    np.testing.assert_allclose(float(s[0, 0, 0]), 1.0 / k, rtol=1e-6, err_msg=f"{frac} x {n}")


def test_interval_k_reads_the_fraction_as_written_without_rounding_it():
  """DESIGN.md §4: topk_frac is the decimal its shortest repr writes, never rounded to fewer
  digits. 1/3 as a float is 0.3333333333333333, and 0.3333333333333333 x 6 = 1.9999999999999998:
  k = 1 (the NumPy reference's rule). Rounding the fraction to 4 decimals (1/3) would give k = 2.
  Also when num * n_ref overflows int32 (16-digit numerators): the exact host table."""
  import numpy_reference as ref
  for frac, n in ((1 / 3, 6), (1 / 3, 300), (2 / 3, 9), (0.1234567, 7000), (0.3, 6)):
    k = ref.topk_count(frac, n)
    # 0 below the k-th, 1 at it, 3 above: the mean of the k smallest is 1/k; of k + 1, 4/(k + 1).
    i = np.arange(n)
    d = np.where(i < k - 1, 0.0, np.where(i == k - 1, 1.0, 3.0)).astype(np.float32)[None, None, :, None]
    s, _ = ficlip.aggregate(jnp.asarray(d), jnp.ones((1, n), bool), frac, "interval")
    np.testing.assert_allclose(float(s[0, 0, 0]), 1.0 / k, rtol=1e-6, err_msg=f"{frac} x {n}")
  assert ref.topk_count(1 / 3, 6) == 1


def test_image_without_references_casts_no_vote():
  """Under "and", an image with no reference keeps M0: it adds neither a vote nor a voter."""
  rng = np.random.RandomState(1)
  steps = jnp.asarray(rng.randn(2, 1, 3, 4, 5).astype(np.float32))    # (S, G, B, N, C)
  steps = steps / jnp.linalg.norm(steps, axis=-1, keepdims=True)
  mask0 = np.array([[True, False, True, False]] * 3)
  mask0[1] = True                                                     # slot 1 keeps nothing
  mask0[2] = True                                                     # slot 2 keeps nothing
  # Slot 0's only candidates (1 and 2) are fully excluded: slot 0 has no reference.
  res = ficlip_filter(steps, mask0, rule="and")
  assert int(np.asarray(res.n_ref)[0, 0]) == 0
  np.testing.assert_array_equal(np.asarray(res.final_mask)[0], mask0[0])
  np.testing.assert_array_equal(np.asarray(res.masks)[1, 0], mask0[0])


def ficlip_filter(steps, mask0, rule):
  """mutual_filtering over a batch where every slot is a query and a reference."""
  b = mask0.shape[0]
  kwargs = dict(mu=0.0, rule=rule, topk_frac=0.3, agg="interval")
  if "valid" in inspect.signature(ficlip.mutual_filtering).parameters:     # before roles existed
    return ficlip.mutual_filtering(steps, jnp.asarray(mask0), jnp.ones(b, bool), **kwargs)
  refs = jnp.asarray(~np.eye(b, dtype=bool))                                # (B, B) candidates
  return ficlip.mutual_filtering(steps, jnp.asarray(mask0), refs, **kwargs)


def dominant_channel_features(rng, n, c=64, spread=0.05):
  """Unit vectors whose mass sits in 4 channels, near-duplicates ~0.1 apart."""
  base = np.zeros((n, c))
  base[:, :4] = 1.0 + 0.3 * rng.randn(n, 4)
  base[:, 4:] = 0.02 * rng.randn(n, c - 4)
  base /= np.linalg.norm(base, axis=-1, keepdims=True)
  other = base + spread * rng.randn(n, c) / np.sqrt(c)
  other /= np.linalg.norm(other, axis=-1, keepdims=True)
  return base, other


def test_bf16_distances_use_the_norms_of_the_rounded_vectors():
  """Against float64 on the float32 features, the bf16 error drops >= 4x against 2 - 2 cos."""
  rng = np.random.RandomState(2)
  a, b = dominant_channel_features(rng, 256)
  feats = np.stack([a, b])[None].astype(np.float32)                  # (G=1, B=2, N, C)
  truth = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(1)   # (N,) u=0 vs v=1
  assert 0.03 < np.median(truth) < 0.3                                # nearest neighbours ~0.1
  got = np.asarray(ficlip.pair_min_distances(jnp.asarray(feats, jnp.bfloat16),
                                             jnp.zeros((2, 256), bool)))[0, 0, 1]
  ab, bb = (jnp.asarray(x, jnp.bfloat16) for x in (a, b))
  cos = np.asarray(jnp.einsum("nc,mc->nm", ab, bb, preferred_element_type=jnp.float32))
  old = np.sqrt(np.maximum(2 - 2 * cos, 0)).min(1)                    # the former formula
  err_new, err_old = np.abs(got - truth).max(), np.abs(old - truth).max()
  print(f"bf16 max abs distance error: 2-2cos {err_old:.4f}, norms {err_new:.4f}")
  assert err_new * 4 <= err_old

"""outputs/decisions.py: the automatic threshold against the rule DESIGN §13 writes, its refusals,
the normalized score's exact 0.5, and one decision per part."""
import numpy as np
import pytest
from scipy import stats

from fiseclip_jax.outputs import decisions


def rule(scores, max_fpr):
  """DESIGN §13 written out independently (scipy's normal, numpy's percentiles): a normal with
  location the median and scale the median-to-25th-percentile gap over the normal's."""
  x = np.asarray(scores, float)
  q25, q50 = np.percentile(x, 25), np.percentile(x, 50)
  scale = (q50 - q25) / (stats.norm.ppf(0.5) - stats.norm.ppf(0.25))
  return q50 + stats.norm.ppf(1 - max_fpr) * scale, q50, scale


def test_auto_threshold_is_the_rule():
  rng = np.random.default_rng(0)
  clean = rng.gamma(3.0, 0.1, size=57)
  dirty = np.r_[rng.normal(0.4, 0.03, 45), rng.normal(0.8, 0.05, 12)]
  for x, max_fpr in ((clean, 0.05), (dirty, 0.1)):
    fit = decisions.auto_threshold(x, max_fpr)
    t, loc, scale = rule(x, max_fpr)
    assert fit.threshold == pytest.approx(t, rel=1e-9)
    assert (fit.n, fit.max_fpr) == (57, max_fpr)
    assert fit.median == pytest.approx(loc) and fit.scale == pytest.approx(scale)
    assert fit.median == np.median(x) and fit.z == pytest.approx(stats.norm.ppf(1 - max_fpr))


def test_auto_threshold_ignores_the_upper_half():
  """Defective parts only ever sit above the median: how far up they are changes nothing."""
  x = np.random.default_rng(1).normal(0.5, 0.05, size=40)
  far, farther = x.copy(), x.copy()
  top = np.argsort(x)[-15:]
  far[top] += 1.0
  farther[top] += 100.0
  assert decisions.auto_threshold(far, 0.1) == decisions.auto_threshold(farther, 0.1)


@pytest.mark.parametrize("max_fpr", [0.05, 0.1])
def test_auto_threshold_on_a_line(max_fpr):
  """Averaged over draws (one draw's FPR is Binomial(n, max_fpr) / n noise): on good parts alone
  the share flagged is max_fpr; with 5% defective parts far above, still about max_fpr and every
  defect flagged; with 20%, fewer good parts than max_fpr (the fit errs that way), never more."""
  rng = np.random.default_rng(2)
  for n_bad, lo, hi in ((0, 0.7, 1.3), (5, 0.6, 1.2), (20, 0.15, 1.0)):
    fprs = []
    for _ in range(200):
      good = rng.normal(0.4, 0.03, size=100 - n_bad)
      bad = rng.normal(0.9, 0.05, size=n_bad)
      fit = decisions.auto_threshold(np.concatenate([good, bad]), max_fpr)
      fprs.append(float((good >= fit.threshold).mean()))
      assert (bad >= fit.threshold).all()
    assert lo * max_fpr <= np.mean(fprs) <= hi * max_fpr, (n_bad, np.mean(fprs))


def test_auto_threshold_refusals():
  with pytest.raises(decisions.FitError, match=f"at least {decisions.MIN_AUTO_IMAGES}"):
    decisions.auto_threshold(np.linspace(0, 1, decisions.MIN_AUTO_IMAGES - 1), 0.1)
  decisions.auto_threshold(np.linspace(0, 1, decisions.MIN_AUTO_IMAGES), 0.1)   # enough
  with pytest.raises(decisions.FitError, match="no spread"):
    decisions.auto_threshold(np.full(30, 0.25), 0.1)                   # all equal: scale 0
  lower_equal = np.r_[np.full(20, 0.25), np.linspace(0.3, 1, 10)]   # the lower half equal
  with pytest.raises(decisions.FitError, match="no spread"):
    decisions.auto_threshold(lower_equal, 0.1)
  for bad in (0.0, 0.5, float("nan")):
    with pytest.raises(decisions.FitError, match="max_fpr"):
      decisions.auto_threshold(np.linspace(0, 1, 30), bad)


@pytest.mark.parametrize("text,want", [("auto", "auto"), (" AUTO ", "auto"), ("0.25", 0.25),
                                       ("-1", -1.0), ("nan", None), ("inf", None),
                                       ("-inf", None), ("abc", None), ("", None)])
def test_parse_threshold(text, want):
  assert decisions.parse_threshold(text) == want


def test_normalized_is_one_half_exactly_at_the_threshold():
  rng = np.random.default_rng(3)
  for t in (0.3, 0.1 + 0.2, 1.5, 1e-7, 7.0):
    below = np.nextafter(t, 0.0)
    s = np.r_[0.0, below, t, np.nextafter(t, np.inf), 2 * t, 1e6, rng.uniform(0, 3 * t, 1000)]
    n = decisions.normalize(s, t)
    assert n[2] == 0.5 and n[0] == 0.0
    assert ((n >= 0.5) == (s >= t)).all()
    assert np.all(np.diff(n[np.argsort(s, kind="stable")]) >= 0)         # monotone
    assert ((0 <= n) & (n < 1)).all()
    header, cols = decisions.label_columns(s, t, normalized=True)
    assert header == ["pred_label", "score_normalized"]
    # As written to and read back from scores.csv.
    assert all((float(v) >= 0.5) == (k == 1) == (x >= t) for (k, v), x in zip(cols, s))
  assert decisions.normalize([1.0], 1.0)[0] == 0.5
  assert decisions.normalize([3.0], 1.0)[0] == 0.75              # s / (s + t)
  with pytest.raises(ValueError, match="positive"):
    decisions.normalize([1.0], 0.0)


def test_label_columns():
  assert decisions.label_columns([0.1, 0.2], None, normalized=False) == ([], [[], []])
  assert decisions.label_columns([0.1, 0.2], 0.2, normalized=False) == (["pred_label"], [[0], [1]])


def test_one_decision_per_part():
  assert decisions.part_pixel_threshold(0.4, 0.5, 0.3) is None          # passed: nothing drawn
  assert decisions.part_pixel_threshold(0.5, 0.5, 0.3) == 0.3           # flagged (>=)
  assert decisions.part_pixel_threshold(0.4, None, 0.3) == 0.3          # the pixel rule alone
  assert decisions.part_pixel_threshold(0.9, 0.5, None) is None


def test_resolvable_fpr_warning():
  assert decisions.resolvable_fpr(8) == 0.125
  line = decisions.unresolvable_warning(8, 0.01)
  assert "1/8 = 0.125" in line and "--max_fpr 0.01" in line
  assert decisions.unresolvable_warning(8, 0.125) is None
  assert decisions.unresolvable_warning(100, 0.01) is None

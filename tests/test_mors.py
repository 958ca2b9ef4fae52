import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ric.mors import mors_keep_mask, mors_thresholds, sample_original, sample_targets

score_arrays = arrays(
    float,
    st.tuples(st.integers(1, 60), st.integers(1, 5)),
    elements=st.floats(-5, 5).map(lambda x: round(x, 1)),
)


@settings(max_examples=100, deadline=None)
@given(scores=score_arrays, q=st.floats(0, 1))
def test_keeps_exactly_samples_above_a_threshold_somewhere(scores, q):
    thr = mors_thresholds(scores, q)
    keep = mors_keep_mask(scores, thr)
    for row, kept in zip(scores, keep):
        assert kept == any(row[d] > thr[d] for d in range(scores.shape[1]))
        # dropped exactly when at or below the threshold in every dimension
        assert (not kept) == all(row[d] <= thr[d] for d in range(scores.shape[1]))
    inclusive = mors_keep_mask(scores, thr, inclusive=True)
    assert np.all(inclusive >= keep)
    for row, kept in zip(scores, inclusive):
        assert kept == any(row[d] >= thr[d] for d in range(scores.shape[1]))


def test_thresholds_are_quantiles():
    scores = np.stack([np.arange(11.0), -np.arange(11.0)], axis=1)
    np.testing.assert_allclose(mors_thresholds(scores), [7.0, -3.0])
    keep = mors_keep_mask(scores, [7.0, -3.0])
    # rows 8..10 beat dim 0, rows 0..2 beat dim 1
    assert keep.tolist() == [True] * 3 + [False] * 5 + [True] * 3


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 6), num=st.integers(1, 200), seed=st.integers(0, 10))
def test_paper_targets_one_dimension_at_max(n, num, seed):
    lo, hi = -np.arange(1, n + 1, dtype=float), np.arange(1, n + 1, dtype=float)
    t = sample_targets(num, lo, hi, variant="paper", rng=seed)
    assert t.shape == (num, n)
    assert np.all(t >= lo) and np.all(t <= hi)
    assert np.all((t == hi).sum(axis=1) >= 1)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 6), num=st.integers(1, 200), seed=st.integers(0, 10))
def test_authors_targets_all_but_one_at_max(n, num, seed):
    t = sample_targets(num, -4.0, 4.0, num_rewards=n, variant="authors", rng=seed)
    assert np.all((t == 4.0).sum(axis=1) >= n - 1)


def test_paper_target_max_dimension_is_uniform():
    t = sample_targets(30_000, -1.0, 1.0, num_rewards=3, rng=0)
    share = (t == 1.0).mean(axis=0)
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)
    others = t[t < 1.0]
    assert abs(others.mean()) < 0.02 and others.min() >= -1.0


def test_sample_original_ratio_and_filter():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1000, 2))
    idx = sample_original(scores, buffer_size=200, ratio=0.5, rng=1)
    assert idx.size == 100 and np.unique(idx).size == 100
    keep = mors_keep_mask(scores, mors_thresholds(scores))
    assert keep[idx].all()
    assert sample_original(scores, buffer_size=10_000, rng=1).size == keep.sum()
    assert sample_original(scores, buffer_size=0).size == 0


def test_errors():
    with pytest.raises(ValueError, match="non-finite score nan at sample 1, reward dimension 0"):
        mors_thresholds(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="quantile"):
        mors_thresholds(np.zeros((3, 2)), 1.5)
    with pytest.raises(ValueError, match="3 thresholds"):
        mors_keep_mask(np.zeros((3, 2)), [0, 0, 0])
    with pytest.raises(ValueError, match="variant"):
        sample_targets(3, -1, 1, num_rewards=2, variant="nope")
    with pytest.raises(ValueError, match="r_min < r_max"):
        sample_targets(3, 1, 1, num_rewards=2)

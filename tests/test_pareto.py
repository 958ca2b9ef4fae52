import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ric.pareto import hypervolume, non_dominated, non_dominated_mask, plot_fronts, shared_reference


def test_non_dominated_filter():
    pts = np.array([[1, 2], [2, 1], [0.5, 0.5], [1, 1], [2, 2.5]])
    assert non_dominated_mask(pts).tolist() == [False, False, False, False, True]
    pts = np.array([[1, 3], [2, 2], [3, 1], [1, 1]])
    np.testing.assert_array_equal(non_dominated(pts), pts[:3])


@settings(max_examples=50, deadline=None)
@given(pts=arrays(float, st.tuples(st.integers(1, 30), st.integers(2, 4)), elements=st.floats(-3, 3)))
def test_non_dominated_points_are_not_dominated(pts):
    mask = non_dominated_mask(pts)
    assert mask.any()
    for i in np.flatnonzero(mask):
        dominated = np.all(pts >= pts[i], axis=1) & np.any(pts > pts[i], axis=1)
        assert not dominated.any()
    for i in np.flatnonzero(~mask):
        assert np.any(np.all(pts >= pts[i], axis=1) & (np.arange(len(pts)) != i))


def test_hypervolume_known_values():
    # staircase in 2-D: union of [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1] = 3 + 1 + 1... computed exactly: 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    assert hypervolume([[1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)
    # two boxes in 3-D overlapping in [0,1]^3: 2*1*1 + 1*2*1 - 1 = 3
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)
    # a dominated point adds nothing; a point below the reference adds nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [-1, 5]], [0, 0]) == pytest.approx(6.0)
    assert hypervolume([[-1, -1]], [0, 0]) == 0.0
    # 4 objectives: unit hypercube
    assert hypervolume([[1, 1, 1, 1]], [0, 0, 0, 0]) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(pts=arrays(float, st.tuples(st.integers(1, 20), st.just(2)), elements=st.floats(0.01, 3)))
def test_hypervolume_2d_matches_sweep(pts):
    front = non_dominated(pts)
    front = front[np.argsort(-front[:, 0])]
    area, prev_y = 0.0, 0.0
    for x, y in front:
        area += x * (y - prev_y)
        prev_y = y
    assert hypervolume(pts, [0, 0]) == pytest.approx(area, rel=1e-9)


def test_hypervolume_errors():
    with pytest.raises(ValueError, match="3 objectives"):
        hypervolume([[1, 1]], [0, 0, 0])
    with pytest.raises(ValueError, match="non-finite"):
        hypervolume([[1, np.nan]], [0, 0])


def test_shared_reference_below_every_point():
    a, b = np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([[0.0, 3.0]])
    ref = shared_reference([a, b])
    assert np.all(ref < np.vstack([a, b]).min(axis=0))


def test_plots(tmp_path):
    fronts = {"RiC": np.array([[0, 1.0], [0.5, 0.8], [1, 0.1]]), "SFT": np.array([[0.2, 0.3]])}
    path = plot_fronts(fronts, tmp_path / "front.png", ["harmless", "helpful"], {"RiC": [0.0, 0.5, 1.0]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    path3 = plot_fronts({"a": np.random.default_rng(0).random((13, 3))}, tmp_path / "f3.png", ["x", "y", "z"])
    assert path3.stat().st_size > 5000
    with pytest.raises(ValueError, match="objective names"):
        plot_fronts(fronts, tmp_path / "x.png", ["a"])

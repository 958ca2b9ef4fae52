import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ric.mapping import (
    default_reward_range,
    desired_rewards,
    expected_normal_max,
    preference_to_unit,
    validate_preference,
)


@st.composite
def preferences(draw, min_n=1, max_n=6):
    """Simplex points with entries either 0 or >= 1e-3 (the solver's 1e-6 accuracy domain)."""
    n = draw(st.integers(min_n, max_n))
    raw = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)))
    raw[raw < 1e-2] = 0.0
    assume(raw.sum() > 0)
    w = raw / raw.sum()
    assume(np.all((w == 0) | (w >= 1e-3)))
    return w


@st.composite
def valid_lambdas(draw, w, p):
    """lambda >= 1 keeping w_i^(1/p)/lambda_i in the order of w."""
    n = w.size
    ratios_sorted = sorted(draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n)), reverse=True)
    order = np.argsort(-w, kind="stable")
    ratio = np.empty(n)
    ratio[order] = ratios_sorted
    base = w ** (1.0 / p) if np.isfinite(p) else np.ones(n)
    lam = np.where(base > 0, base / ratio, draw(st.floats(1.0, 5.0)))
    return np.maximum(lam, 1.0)


P_VALUES = st.floats(1.25, 12.0)


def test_readme_example_values():
    w = (0.2, 0.8)
    top = expected_normal_max()
    np.testing.assert_allclose(desired_rewards(w, "linear"), [-top + 0.2 * 2 * top, -top + 0.8 * 2 * top])
    z2 = np.array([0.2, 0.8]) / np.linalg.norm([0.2, 0.8])
    np.testing.assert_allclose(desired_rewards(w, "p_norm", p=2), -top + z2 * 2 * top)
    # p = inf practical rule: w_1 < 1/2 -> z_1 = 2 * 0.2, w_2 >= 1/2 -> z_2 = 1
    np.testing.assert_allclose(desired_rewards(w, "p_inf"), -top + np.array([0.4, 1.0]) * 2 * top)


def test_default_range_matches_sampled_extremes():
    lo, hi = default_reward_range()
    assert lo == -hi
    assert 4.0 < hi < 4.4
    sampled = np.random.default_rng(0).standard_normal((200, 50_000)).max(axis=1).mean()
    assert abs(sampled - hi) < 0.06
    assert expected_normal_max(2) == pytest.approx(1 / np.sqrt(np.pi), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), w=preferences(), p=P_VALUES)
def test_solver_matches_p_norm_closed_form(data, w, p):
    lam = data.draw(valid_lambdas(w, p)) if data.draw(st.booleans()) else None
    closed = preference_to_unit(w, "p_norm", p=p, lam=lam)
    solved = preference_to_unit(w, "solver", p=p, lam=lam)
    np.testing.assert_allclose(solved, closed, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), w=preferences())
def test_solver_matches_p_inf(data, w):
    np.testing.assert_allclose(preference_to_unit(w, "solver", p=np.inf), preference_to_unit(w, "p_inf"), atol=1e-6)
    lam = data.draw(valid_lambdas(w, np.inf))
    np.testing.assert_allclose(
        preference_to_unit(w, "solver", p=np.inf, lam=lam), preference_to_unit(w, "p_inf", lam=lam), atol=1e-6
    )


@settings(max_examples=80, deadline=None)
@given(w=preferences(), p=P_VALUES, method=st.sampled_from(["linear", "p_norm", "p_inf"]))
def test_unit_targets_in_range_and_ordered_like_w(w, p, method):
    z = preference_to_unit(w, method, p=p)
    assert np.all(z >= 0) and np.all(z <= 1 + 1e-12)
    for i in range(w.size):
        for j in range(w.size):
            if w[i] > w[j]:
                assert z[i] >= z[j] - 1e-12


@settings(max_examples=40, deadline=None)
@given(p=P_VALUES, method=st.sampled_from(["linear", "p_norm", "p_inf", "solver"]))
def test_desired_reward_non_decreasing_in_own_weight(p, method):
    ts = np.linspace(0, 1, 21)
    r = np.array([desired_rewards([t, 1 - t], method, p=p) for t in ts])
    assert np.all(np.diff(r[:, 0]) >= -1e-6)
    assert np.all(np.diff(r[:, 1]) <= 1e-6)


def test_range_scalars_and_arrays():
    r = desired_rewards([0.5, 0.5], "linear", r_min=[-1, 0], r_max=[1, 10])
    np.testing.assert_allclose(r, [0.0, 5.0])
    r = desired_rewards([1.0, 0.0], "linear", r_min=-2, r_max=2)
    np.testing.assert_allclose(r, [2.0, -2.0])


def test_extra_convex_constraint_in_solver():
    # cap the first dimension at 0.5: the optimum moves budget to the second
    cap = {"type": "ineq", "fun": lambda z: 0.5 - z[0]}
    z = preference_to_unit([0.7, 0.3], "solver", p=2, constraints=[cap])
    assert z[0] == pytest.approx(0.5, abs=1e-6)
    assert z[1] == pytest.approx(0.5, abs=1e-6)  # ordering z_1 >= z_2 binds before the norm ball


@pytest.mark.parametrize(
    "preference, match",
    [
        ([0.5, np.nan], "non-finite"),
        ([0.5, np.inf], "non-finite"),
        ([1.2, -0.2], "negative"),
        ([0.3, 0.3], "sums to"),
        ([[0.5, 0.5]], "1-D"),
        ([], "1-D"),
        ("ab", "not a vector"),
    ],
)
def test_invalid_preferences_raise(preference, match):
    with pytest.raises(ValueError, match=match):
        desired_rewards(preference, "p_norm")


def test_wrong_length_raises():
    with pytest.raises(ValueError, match=r"3 entries, expected 2"):
        validate_preference([0.2, 0.3, 0.5], num_rewards=2)
    with pytest.raises(ValueError, match="r_min"):
        desired_rewards([0.2, 0.3, 0.5], "linear", r_min=[0, 0], r_max=[1, 1])
    with pytest.raises(ValueError, match="lam"):
        desired_rewards([0.5, 0.5], "p_norm", lam=[1, 1, 1])


@pytest.mark.parametrize("p", [1.0, 0.5, -2, np.nan])
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match="p must be > 1"):
        desired_rewards([0.5, 0.5], "p_norm", p=p)


def test_p_norm_with_infinite_p_points_to_p_inf():
    with pytest.raises(ValueError, match="p_inf"):
        desired_rewards([0.5, 0.5], "p_norm", p=np.inf)


def test_lambda_violating_theorem_raises():
    with pytest.raises(ValueError, match="ordering condition"):
        desired_rewards([0.8, 0.2], "p_norm", p=2, lam=[4.0, 1.0])
    with pytest.raises(ValueError, match=">= 1"):
        desired_rewards([0.8, 0.2], "p_norm", p=2, lam=[0.5, 1.0])
    with pytest.raises(ValueError, match="ordering condition"):
        desired_rewards([0.8, 0.2], "p_inf", lam=[3.0, 1.0])


def test_unknown_method_and_bad_range_raise():
    with pytest.raises(ValueError, match="unknown mapping method 'l3'"):
        desired_rewards([0.5, 0.5], "l3")
    with pytest.raises(ValueError, match="r_min < r_max"):
        desired_rewards([0.5, 0.5], "linear", r_min=1, r_max=1)

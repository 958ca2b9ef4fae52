import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ric.mapping import RewardRange, default_reward_range, desired_rewards
from ric.space import RewardSpace
from ric.text.rewards import Readability, Verbosity


@settings(max_examples=40, deadline=None)
@given(scores=arrays(float, st.tuples(st.integers(2, 50), st.integers(1, 5)), elements=st.floats(-1e3, 1e3)))
def test_fit_normalize_denormalize(scores):
    names = [f"r{i}" for i in range(scores.shape[1])]
    space = RewardSpace.fit(names, scores)
    z = space.normalize(scores)
    varying = scores.std(axis=0) > 1e-9 * np.maximum(1.0, np.abs(scores).max(axis=0))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=0)[varying], 1, rtol=1e-5)
    np.testing.assert_allclose(space.denormalize(z), scores, atol=1e-6 * (1 + np.abs(scores).max()))


def test_data_range_is_quantiles_of_the_normalized_scores_and_overrides_win():
    scores = np.stack([np.arange(101.0), -(np.arange(101.0) ** 2)], axis=1)
    space = RewardSpace.fit(["a", "b"], scores, RewardRange("data"))
    z = space.normalize(scores)
    np.testing.assert_allclose(space.r_min, z.min(axis=0))
    np.testing.assert_allclose(space.r_max, z.max(axis=0))
    space = RewardSpace.fit(["a", "b"], scores, RewardRange("data", (0.1, 0.9)))
    np.testing.assert_allclose(space.r_min, np.quantile(z, 0.1, axis=0))
    assert space.range_source == {"kind": "data", "quantiles": [0.1, 0.9]}
    space = RewardSpace.fit(["a", "b"], scores, RewardRange("data", r_min=-1.0, r_max=[2.0, 3.0]))
    assert space.r_min.tolist() == [-1.0, -1.0] and space.r_max.tolist() == [2.0, 3.0]
    normal = RewardSpace.fit(["a", "b"], scores)
    assert normal.r_max.tolist() == [default_reward_range()[1]] * 2
    with pytest.raises(ValueError, match="reward_range"):
        RewardRange("dataset")
    with pytest.raises(ValueError, match="range_quantiles"):
        RewardRange("data", (0.9, 0.1))


def test_desired_uses_the_spaces_mapping_unless_overridden():
    scores = np.random.default_rng(0).normal(size=(200, 2))
    space = RewardSpace.fit(["a", "b"], scores, RewardRange("data", (0.05, 0.95)), method="linear")
    w = [0.2, 0.8]
    lo, hi = space.r_min, space.r_max
    np.testing.assert_allclose(space.desired(w), desired_rewards(w, "linear", r_min=lo, r_max=hi))
    np.testing.assert_allclose(
        space.desired(w, "p_norm", p=3.0), desired_rewards(w, "p_norm", p=3.0, r_min=lo, r_max=hi)
    )
    batch = space.desired([[1.0, 0.0], [0.0, 1.0]])
    assert batch.shape == (2, 2) and batch[0, 0] == pytest.approx(hi[0]) and batch[1, 0] == pytest.approx(lo[0])
    with pytest.raises(ValueError, match=r"preference \[0.5, 0.6\] sums to 1.1"):
        space.desired([0.5, 0.6])
    with pytest.raises(ValueError, match="1 entries, expected 2"):
        space.desired([[1.0, 0.0], [1.0]])
    with pytest.raises(ValueError, match="unknown mapping method 'p_two'"):
        space.desired(w, "p_two")


def test_save_load_round_trip_and_schema_1(tmp_path):
    scores = np.random.default_rng(0).normal([1.0, -3.0], [2.0, 0.5], size=(100, 2))
    rewards = [Verbosity().config(), Readability(metric="grade").config()]
    space = RewardSpace.fit(["verbosity", "readability"], scores, RewardRange("data"), method="p_norm", p=3.0,
                            rewards=rewards, fitted_on={"dataset": "x", "split": "train"})  # fmt: skip
    path = space.save(tmp_path / "s" / "reward_space.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 3 and data["mapping"] == {"method": "p_norm", "p": 3.0, "lam": None}
    assert data["fitted_on"] == {"num_samples": 100, "dataset": "x", "split": "train"}
    loaded = RewardSpace.load(path, expected_names=["verbosity", "readability"])
    np.testing.assert_allclose(loaded.normalize(scores), space.normalize(scores))
    np.testing.assert_allclose(loaded.desired([0.3, 0.7]), space.desired([0.3, 0.7]))
    rebuilt = loaded.build_rewards()
    assert [type(r).__name__ for r in rebuilt] == ["Verbosity", "Readability"] and rebuilt[1].metric == "grade"
    old = {"schema_version": 1, "reward_names": ["a", "b"], "mean": [1.0, 2.0], "std": [1.0, 4.0]}
    (tmp_path / "normalization.json").write_text(json.dumps(old))
    v1 = RewardSpace.load(tmp_path / "normalization.json")
    assert v1.method == "p_inf" and v1.r_max.tolist() == [default_reward_range()[1]] * 2
    np.testing.assert_allclose(v1.normalize([[2.0, 6.0]]), [[1.0, 1.0]])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        RewardSpace.fit(["a", "b"], np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-finite scores, first at row 1 for reward 'b'"):
        RewardSpace.fit(["a", "b"], np.array([[0.0, 1.0], [1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        RewardSpace.fit(["a", "b"], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="p must be > 1, got 1.0"):
        RewardSpace.fit(["a", "b"], np.eye(2), method="p_norm", p=1.0)
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*\['a', 'c'\]"):
        RewardSpace.from_dict(RewardSpace.fit(["a", "b"], np.eye(2) + 1).to_dict(), expected_names=["a", "c"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RewardSpace.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RewardSpace.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        RewardSpace.load(bad)
    space = RewardSpace.fit(["a", "b"], np.eye(2) + 1)
    with pytest.raises(ValueError, match=r"desired rewards \[1.0, 2.0, 3.0\] need 2 finite values, one per reward"):
        space.check_desired([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"desired rewards \[1.0, nan\] need 2 finite values"):
        space.check_desired([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"desired rewards \[True, 1.0\] are not numbers"):
        space.check_desired([True, 1.0])
    with pytest.raises(ValueError, match=r"desired rewards \[\[1.0, 2.0\], \[3.0\]\] need 2 finite values"):
        space.check_desired([[1.0, 2.0], [3.0]])
    np.testing.assert_array_equal(space.check_desired([[1, 2], [3, 4]]), [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"preference \[0.5, 0.6\] sums to 1.1.*; rewards: \['a', 'b'\]"):
        space.check_preference([0.5, 0.6])


def test_constant_reward_stays_finite():
    space = RewardSpace.fit(["a", "b"], np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    assert np.all(np.isfinite(space.normalize(np.array([[1.0, 5.0]]))))


def test_reward_config_records_constructor_arguments():
    assert Verbosity("words", batch_size=8).config() == {
        "class_path": "ric.text.rewards.Verbosity", "init_args": {"name": "words", "batch_size": 8}
    }  # fmt: skip
    from ric.rewards import FunctionReward

    assert FunctionReward("f", lambda p, s: [0.0] * len(s)).config() is None  # a function cannot be saved

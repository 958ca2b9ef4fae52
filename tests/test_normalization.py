import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ric.normalization import RewardNormalizer


@settings(max_examples=40, deadline=None)
@given(scores=arrays(float, st.tuples(st.integers(2, 50), st.integers(1, 5)), elements=st.floats(-1e3, 1e3)))
def test_fit_transform_inverse(scores):
    names = [f"r{i}" for i in range(scores.shape[1])]
    norm = RewardNormalizer(names).fit(scores)
    z = norm.transform(scores)
    varying = scores.std(axis=0) > 1e-9 * np.maximum(1.0, np.abs(scores).max(axis=0))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=0)[varying], 1, rtol=1e-5)
    np.testing.assert_allclose(norm.inverse_transform(z), scores, atol=1e-6 * (1 + np.abs(scores).max()))


def test_save_load_round_trip(tmp_path):
    scores = np.random.default_rng(0).normal([1.0, -3.0], [2.0, 0.5], size=(100, 2))
    norm = RewardNormalizer(["harmless", "helpful"]).fit(scores, fitted_on={"dataset": "hh-rlhf", "split": "train"})
    path = norm.save(tmp_path / "stats" / "normalization.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert data["reward_names"] == ["harmless", "helpful"]
    assert data["fitted_on"] == {"num_samples": 100, "dataset": "hh-rlhf", "split": "train"}
    loaded = RewardNormalizer.load(path, expected_names=["harmless", "helpful"])
    np.testing.assert_allclose(loaded.transform(scores), norm.transform(scores))


def test_load_with_other_names_is_an_error(tmp_path):
    path = RewardNormalizer(["harmless", "helpful"]).fit(np.eye(2) + 1).save(tmp_path / "n.json")
    with pytest.raises(ValueError, match=r"\['harmless', 'helpful'\].*\['harmless', 'humor'\]"):
        RewardNormalizer.load(path, expected_names=["harmless", "humor"])


def test_bad_inputs(tmp_path):
    norm = RewardNormalizer(["a", "b"])
    with pytest.raises(RuntimeError, match="not fitted"):
        norm.transform(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        norm.fit(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-finite scores, first at row 1 for reward 'b'"):
        norm.fit(np.array([[0.0, 1.0], [1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        norm.fit(np.zeros((1, 2)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RewardNormalizer.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RewardNormalizer.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        RewardNormalizer.load(bad)


def test_constant_column_stays_finite():
    norm = RewardNormalizer(["a", "b"]).fit(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    assert np.all(np.isfinite(norm.transform(np.array([[1.0, 5.0]]))))

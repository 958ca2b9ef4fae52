"""The calibrated mapping: an isotonic map from written to obtained rewards, inverted at inference."""

import json
import re

import numpy as np
import pytest
import torch
from policies import EchoPolicy

import ric
from ric.calibration import Calibration, calibrate, split_prompts
from ric.cli import main
from ric.rewards import FunctionReward
from ric.space import RewardSpace


def knots(written, obtained, names=("a", "b")):
    return Calibration(list(names), written, obtained)


def test_fit_is_monotone_weighted_and_inverts_within_the_achievable_range():
    rng = np.random.default_rng(0)
    grid = np.linspace(-2, 2, 5)
    written = np.repeat(np.stack([grid, grid[::-1]], 1), 40, axis=0)
    truth = np.stack([np.tanh(written[:, 0]), 0.25 * written[:, 1]], 1)
    cal = Calibration.fit(["a", "b"], written, truth + rng.normal(0, 0.05, truth.shape))
    assert [len(x) for x in cal.written] == [5, 5] and all(np.all(np.diff(y) >= 0) for y in cal.obtained)
    np.testing.assert_allclose(cal.obtained[0], np.tanh(grid), atol=0.03)
    lo, hi = cal.achievable()
    np.testing.assert_allclose([lo[1], hi[1]], [-0.5, 0.5], atol=0.03)
    asked = np.array([[0.5, 0.2], [-0.7, -0.1]])
    np.testing.assert_allclose(cal.expected(cal.marker_values(asked)), asked, atol=1e-9)
    assert cal.marker_values([0.5, 0.2]).shape == (2,)
    # beyond what the model reached: the most extreme value of the grid, not an extrapolation
    np.testing.assert_allclose(cal.marker_values([5.0, -5.0]), [2.0, -2.0])


def test_a_decreasing_mean_is_pooled_and_a_flat_reward_writes_its_middle():
    written = [[0, 0], [1, 1], [2, 2], [3, 3]]
    cal = Calibration.fit(["a", "b"], written, [[0.0, 1.0], [0.4, 1.0], [0.2, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(cal.obtained[0], [0.0, 0.3, 0.3, 1.0])  # the dip is pooled, not a reversal
    assert cal.marker_values([0.3, 1.0])[0] == pytest.approx(1.5)  # the plateau answers with its middle
    assert cal.steerable() == [True, False]
    assert cal.marker_values([0.3, 7.0])[1] == pytest.approx(1.5)
    assert "b +1.00 (its marker does not move it)" in cal.describe()


@pytest.mark.parametrize(
    "written, obtained, message",
    [
        ([[0, 1]], [[0, 1]], "knots for each of the 2 rewards"),
        ([[0, 1], [0]], [[0, 1], [0]], "'b' needs at least 2 written and obtained knots"),
        ([[0, 1], [1, 0]], [[0, 1], [0, 1]], "ascending"),
        ([[0, 1], [0, 1]], [[1, 0], [0, 1]], "non-decreasing"),
        ([[0, 1], [0, 1]], [[0, float("nan")], [0, 1]], "finite"),
    ],
)
def test_bad_knots_are_refused(written, obtained, message):
    with pytest.raises(ValueError, match=message):
        knots(written, obtained)


def test_fit_refuses_one_written_value_and_non_finite_rewards():
    with pytest.raises(ValueError, match="wrote one value for 'a'"):
        Calibration.fit(["a"], [[1.0], [1.0]], [[0.0], [1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        Calibration.fit(["a"], [[0.0], [1.0]], [[0.0], [np.inf]])


def space_with(calibration=None):
    return RewardSpace(["a", "b"], [0.0, 0.0], [1.0, 1.0], [-2.0, -2.0], [2.0, 2.0], method="linear",
                       calibration=calibration)  # fmt: skip


def test_the_space_maps_preferences_onto_the_achievable_range_and_writes_what_achieves_them(tmp_path):
    plain = space_with()
    np.testing.assert_allclose(plain.desired([1, 0]), [2, -2])
    np.testing.assert_allclose(plain.markers([[0.3, 0.1]]), [[0.3, 0.1]])
    cal = knots([[-2, 0, 2], [-2, 0, 2]], [[-0.5, 0.0, 0.5], [-1.0, 0.0, 1.0]])
    space = space_with(cal)
    np.testing.assert_allclose(space.desired([1, 0]), [0.5, -1.0])
    np.testing.assert_allclose(space.markers(space.desired([1, 0])), [2.0, -2.0])
    np.testing.assert_allclose(space.markers([0.25, 0.5]), [1.0, 1.0])
    loaded = RewardSpace.load(space.save(tmp_path / "reward_space.json"))
    assert json.loads((tmp_path / "reward_space.json").read_text())["schema_version"] == 3
    np.testing.assert_allclose(loaded.calibration.obtained, cal.obtained)
    np.testing.assert_allclose(loaded.markers([0.25, 0.5]), [1.0, 1.0])
    older = {**plain.to_dict(), "schema_version": 2}
    older.pop("calibration")
    assert RewardSpace.from_dict(older).calibration is None  # schema 2 files load as before
    with pytest.raises(ValueError, match=r"calibration is for rewards \['x', 'y'\]"):
        space_with(knots([[0, 1], [0, 1]], [[0, 1], [0, 1]], names=("x", "y")))


def test_split_keeps_prompts_apart_and_refuses_too_few():
    fit, held = split_prompts([f"p{i}" for i in range(10)] + ["p0"], 0.3, seed=1)
    assert len(held) == 3 and len(fit) == 7 and not set(fit) & set(held)
    assert split_prompts([f"p{i}" for i in range(10)], 0.3, seed=1) == (fit, held)
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        split_prompts(["same", "same"], 0.5, 0)


class Squashing(EchoPolicy):
    """A policy that obtains a squashed, noisy version of what its prompt carries: "a" as tanh, "b" at a
    third of it, reported in the answer for the rewards to read."""

    def generate(self, prompts, desired_rewards=None, **sampling):
        out = []
        for text in self.condition(prompts, desired_rewards):
            a, b = (float(v) for v in re.findall(r"<R\d> (\S+)", text))
            noise = torch.randn(2).mul(0.05).tolist()
            out.append(f"{np.tanh(a) + noise[0]:.4f} {b / 3 + noise[1]:.4f}")
        return out


def reader(i):
    return FunctionReward("ab"[i], lambda prompts, samples: [float(s.split()[i]) for s in samples])


def test_calibrate_halves_the_error_on_held_out_prompts(tmp_path):
    policy = Squashing()
    policy.set_reward_space(space_with())
    prompts = [f"question {i}" for i in range(12)]
    space = calibrate(policy, [reader(0), reader(1)], prompts, tmp_path, points=5, samples=2, seed=3)
    assert policy.reward_space.calibration is None  # the policy keeps its own space
    error = space.calibration.error
    assert error["held_out_prompts"] == 6 and len(error["asked"]) == 5
    assert error["mean_after"] < 0.25 * error["mean_before"], error
    lo, hi = space.calibration.achievable()
    np.testing.assert_allclose([lo[0], hi[0]], [np.tanh(-2), np.tanh(2)], atol=0.05)
    np.testing.assert_allclose([lo[1], hi[1]], [-2 / 3, 2 / 3], atol=0.05)
    policy.set_reward_space(space)  # steering now asks for what the model obtains
    steered = policy.steer(["new question"] * 40, [1, 0], seed=0)
    obtained = np.array([[float(v) for v in s.sample.split()] for s in steered]).mean(0)
    np.testing.assert_allclose(obtained, steered[0].desired_rewards, atol=0.05)
    assert steered[0].written_rewards == pytest.approx([2.0, -2.0], abs=0.05)


def test_ric_calibrate_writes_an_export_with_the_calibration(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I water plant {i}?"}) + "\n" for i in range(6)))
    out = tmp_path / "calibrated"
    code = main(["calibrate", str(trained["ckpt"]), "--prompts", str(prompts), "--out", str(out), "--points", "3",
                 "--samples", "1", "--max-new-tokens", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "calibration error on 3 held-out prompts" in printed and "achievable (calibrated)" in printed
    meta = json.loads((out / "ric.json").read_text())
    assert meta["reward_space"]["schema_version"] == 3
    calibration = meta["reward_space"]["calibration"]
    assert [len(x) for x in calibration["written"]] == [3, 3] and calibration["settings"] == {"max_new_tokens": 4}
    assert "## Calibration" in (out / "README.md").read_text()
    policy = ric.load(out)
    assert policy.reward_space.calibration is not None
    assert (tmp_path / "calibrated.calibration" / "after").is_dir()  # the sweeps are kept beside it
    code = main(["generate", str(out), "--preference", "1,0", "--prompt", "Hi?", "--max-new-tokens", "3"])
    assert code == 0 and "achievable (calibrated)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/new", "--prompts", "{tmp}/missing.jsonl"], "prompts file not found"),
        (["--prompts", "{tmp}/prompts.jsonl"], "is a checkpoint: give --out FOLDER"),
        (["--out", "{tmp}", "--prompts", "{tmp}/prompts.jsonl"], "already exists and is not an empty folder"),
        (["--out", "{tmp}/new", "--prompts", "{tmp}/one.jsonl"], "at least 2 distinct prompts"),
        (["--out", "{tmp}/new", "--prompts", "{tmp}/prompts.jsonl", "--points", "1"], "--points 1 is out of range"),
        (["--out", "{tmp}/new", "--prompts", "{tmp}/prompts.jsonl", "--temperature", "-1"], "temperature"),
    ],
)
def test_ric_calibrate_refuses_bad_input_before_loading(trained, tmp_path, capsys, args, message):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "one.jsonl").write_text('{"prompt": "a"}\n')
    code = main(["calibrate", str(trained["ckpt"]), *[a.format(tmp=tmp_path) for a in args]])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

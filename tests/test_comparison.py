"""benchmarks/comparison.py's rules: the split fixed while everything else follows the seed, one learning-rate
rule for every arm, a reference point from the training data, curves summarized over seeds, goals decided on
the budget each method had, and a results file of other rules refused rather than merged."""

from __future__ import annotations

import json

import numpy as np
import pytest

NAMES = ["verbosity", "readability"]


@pytest.fixture
def comparison():
    from benchmarks import comparison

    return comparison


@pytest.mark.parametrize("task", ["hh", "tldr"])
def test_every_seed_changes_all_but_the_split(comparison, task, tmp_path):
    from benchmarks.experiment import get

    base = comparison.base_config(comparison.TASKS[task])
    configs = [comparison.run_config(base, tmp_path / str(s), s, {}) for s in (0, 1)]
    for seed, config in enumerate(configs):
        assert get(config, "data.seed") == comparison.SPLIT_SEED  # one split for every arm and seed
        assert config["seed_everything"] == get(config, "data.shuffle_seed") == seed
        assert get(config, "data.val_fraction") == comparison.VAL_FRACTION
        assert get(config, "data.max_test_prompts") == comparison.TASKS[task].prompts
        # a training run reports its steps in the log (the shipped configs leave the bar on)
        assert comparison.PROGRESS in get(config, "trainer.callbacks")
        assert get(config, "trainer.enable_progress_bar", None) is not False
    rules = comparison.rules(comparison.TASKS[task], base)
    # one scaling rule: every learning rate is the paper's times the recipe's factor
    factor = get(base, "model.init_args.learning_rate") / comparison.PAPER["offline_lr"]
    assert rules["learning_rates"]["ric_online"] == pytest.approx(1e-5 * factor)
    assert rules["learning_rates"]["grpo"] == pytest.approx(1e-5 * factor) and rules["grpo_kl"] == 0.2


def point(arm: str, curve: str, at: int, obtained: list, seconds: float, spearman: float = 1.0) -> dict:
    cost = {"seconds": seconds, "generations": 10 * at, "reward_calls": 20 * at}
    return {"arm": arm, "curve": curve, ("k" if arm == "ric" else "step"): at, "obtained": obtained,
            "preferences": [[0.0, 1.0], [1.0, 0.0]], "train": cost, "with_evaluation": cost,
            "steering": {n: {"spearman": spearman, "spread_ratio": 0.5} for n in NAMES}}  # fmt: skip


def test_curves_goals_and_clipping(comparison, monkeypatch, tmp_path):
    ref = {"reference_point": [-1.0, -1.0], "clip_high": [1.0, 1.0]}
    records = {}
    for seed, lift in ((0, 0.0), (1, 0.2)):
        records[f"seed{seed}"] = {
            "p_inf-k0": point("ric", "p_inf", 0, [[0.0 + lift, 0.0]], 100.0),
            "p_inf-k1": point("ric", "p_inf", 1, [[0.5 + lift, 0.5]], 200.0),
            "morlhf-step4": point("morlhf", "morlhf", 4, [[0.2, 0.2]], 150.0, 0.5),
            "morlhf-step8": point("morlhf", "morlhf", 8, [[3.0, 3.0]], 900.0, 0.5),  # past the clip
            "soups-step4": point("soups", "soups", 4, [[0.1, 0.1]], 120.0),
        }
    summary = comparison.summarize(records, ref, NAMES)
    k1 = summary["p_inf"]["1"]
    assert k1["seeds"] == 2 and k1["hv"] == pytest.approx(np.mean([1.5 * 1.5, 1.7 * 1.5]))
    assert k1["hv_sd"] > 0 and k1["train_seconds"] == 200.0
    far = summary["morlhf"]["8"]
    assert far["hv"] == pytest.approx(16.0) and far["hv_clipped"] == pytest.approx(4.0)
    # at RiC's 200 s MORLHF had only its 4-step point (its 8-step point cost 900 s)
    assert comparison.interpolate(summary["morlhf"], 200.0) == pytest.approx(1.2 * 1.2)
    assert comparison.interpolate(summary["morlhf"], 50.0) is None
    goals = comparison.goals(summary, NAMES)
    first = goals["RiC's hypervolume >= MORLHF's and Soups' at RiC's training seconds, Spearman >= 0.9"]
    assert first["met"] is True and first["seconds"] == 200.0
    assert goals["RiC's hypervolume rises with each online round"]["met"] is True
    cost = goals["MORLHF and Soups need >= 3x RiC's training seconds to reach RiC's best front"]
    assert cost["ratio_to_reach_ric_best"] == {"morlhf": pytest.approx(4.5), "soups": None}
    # Soups never reached it, but its largest budget was 0.6x RiC's: the budgets run cannot decide the goal
    assert cost["ratio_of_largest_budget"]["soups"] == pytest.approx(0.6) and cost["met"] is None
    # the fronts are drawn at the matched budget (RiC's 200 s: MORLHF's 4-step front, not its 900 s one) and at
    # each method's largest budget
    figures = []
    monkeypatch.setattr(comparison, "save_figure", lambda fig, path: figures.append(fig) or path)
    comparison.plot(summary, NAMES, ref, tmp_path / "comparison_hh")
    matched, largest = figures[1].axes[:2]
    drawn = {line.get_label().split(",")[0]: line.get_xydata().tolist() for line in matched.get_lines()}
    assert drawn["MORLHF"] == [[0.2, 0.2]] and "200 training seconds" in matched.get_title()
    assert [line.get_xydata().tolist() for line in largest.get_lines()][1] == [[3.0, 3.0]]
    # goals compare positions over the same seeds: a seed missing a point is left out of them
    del records["seed1"]["soups-step4"]
    assert comparison.complete_seeds(records) == ["seed0"]


def test_reference_point_comes_from_the_training_data(comparison, monkeypatch):
    rng = np.random.default_rng(0)
    raw = rng.normal([10.0, 50.0], [2.0, 5.0], size=(1000, 2))
    monkeypatch.setattr(comparison, "train_scores", lambda base: raw)
    ref = comparison.reference(comparison.normalized_train_scores({}))
    z = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(ref["reference_point"], np.quantile(z, 0.01, axis=0))
    np.testing.assert_allclose(ref["clip_high"], np.quantile(z, 0.99, axis=0))
    assert ref["responses"] == 1000


def test_results_of_other_rules_are_refused(comparison, monkeypatch, tmp_path):
    monkeypatch.setattr(comparison, "RESULTS", tmp_path)
    stale = {"rules": {"split_seed": 1}, "points": {}}
    (tmp_path / "comparison_hh.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="measured under other rules"):
        comparison.main(["--task", "hh", "--report", "--out", str(tmp_path / "runs")])
    # runs left by a killed run of other rules are not reused either
    (tmp_path / "comparison_hh.json").unlink()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "rules.json").write_text(json.dumps({"split_seed": 1}))
    with pytest.raises(SystemExit, match="holds runs made under other rules"):
        comparison.main(["--task", "hh", "--report", "--out", str(tmp_path / "runs")])


def test_unknown_arm_is_refused(comparison, capsys):
    with pytest.raises(SystemExit):
        comparison.main(["--task", "hh", "--arms", "ppo"])
    assert "unknown arm(s) ['ppo']" in capsys.readouterr().err


def test_a_kept_range_choice_is_reported_without_reading_the_training_data(comparison, monkeypatch, tmp_path):
    from benchmarks import experiment

    for module in (comparison, experiment):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(comparison, "normalized_train_scores", lambda base: pytest.fail("read the training data"))
    base = comparison.base_config(comparison.TASKS["hh"])
    ref = {"reference_point": [-1.0, -1.0], "clip_high": [1.0, 1.0]}
    results = {"rules": comparison.rules(comparison.TASKS["hh"], base), "reference": ref, "points": {}}
    (tmp_path / "comparison_hh.json").write_text(json.dumps(results, default=float))
    runs = tmp_path / "runs"
    runs.mkdir()
    choice = {"chosen": "normal", "measured": {}}
    (runs / comparison.RANGE_CHOICE).write_text(json.dumps(choice))
    comparison.main(["--task", "hh", "--report", "--out", str(runs)])
    assert json.loads((tmp_path / "comparison_hh.json").read_text())["range_choice"] == choice

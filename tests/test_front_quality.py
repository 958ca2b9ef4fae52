"""benchmarks/front_quality.py's aggregation: one reference point for every arm and seed, mean and sd over
seeds, costs that include the offline training an arm reuses, and the issue's goals decided on those numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["verbosity", "readability"]
PREFS = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]


def write_sweep(folder: Path, means: np.ndarray, prefs: list | None, cost: dict, spearman: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, m in enumerate(means):
        row = {}
        for d, name in enumerate(NAMES):
            row[f"w_{name}"] = float("nan") if prefs is None else prefs[k][d]
            row[f"obtained_{name}"] = m[d]
            row[f"obtained_{name}_sem"] = 0.01
        rows.append(row)
    with (folder / "front.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {"cost": cost, "train_reward_correlation": [[1.0, -0.3], [-0.3, 1.0]]}
    if prefs is not None:
        metrics["steering"] = {n: {"spearman": spearman, "spread_ratio": 0.5} for n in NAMES}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def front_quality():
    from benchmarks import front_quality

    return front_quality


def fake_seed(out: Path, seed: int, lift: float) -> dict[str, Path]:
    """Sweep folders of every arm of one seed: RiC arms on a line from (-1, 1) to (1, -1), shifted by ``lift``."""
    line = np.array([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
    sweeps = out / f"seed{seed}" / "sweeps"
    train = {"train_seconds": 100.0, "sweep_seconds": 10.0, "generated_samples_sweep": 30, "reward_calls_sweep": 60,
             "training_tokens": 1000}  # fmt: skip
    test = {"sweep_seconds": 10.0, "generated_samples_sweep": 30, "reward_calls_sweep": 60}
    arms = {
        "base": write_sweep(sweeps / "base", np.array([[-2.0, -2.0]]), None, {"sweep_seconds": 2.0}),
        "sft": write_sweep(sweeps / "sft", np.array([[-1.0, -1.0]]), None, train),
        "ric_linear": write_sweep(sweeps / "ric_linear", line + lift, PREFS, train),
        "ric_p_norm": write_sweep(sweeps / "ric_p_norm", line + lift + 0.1, PREFS, test),
        "ric_p_inf": write_sweep(sweeps / "ric_p_inf", line + lift + 0.2, PREFS, test),
        "online": write_sweep(sweeps / "online", line + lift + 0.5, PREFS, {**train, "train_seconds": 50.0}),
        "morlhf": write_sweep(sweeps / "morlhf", line - 0.5, PREFS, {**train, "train_seconds": 1000.0}, 0.5),
        "soups": write_sweep(sweeps / "soups", line, PREFS, {**train, "train_seconds": 400.0}),
    }
    summary = out / f"seed{seed}" / "online" / "online" / "round0" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"generated": 16}))
    return arms


def test_summary_shares_one_reference_and_averages_seeds(front_quality, tmp_path):
    from ric.pareto import hypervolume

    per_seed = {seed: fake_seed(tmp_path, seed, lift) for seed, lift in ((0, 0.0), (1, 0.2))}
    summary = front_quality.summarize(tmp_path, [0, 1], per_seed)
    reference = np.array(summary["reference_point"])
    # the lowest point of any arm (the base model's -2) sets the reference of all of them
    assert np.all(reference < -2.0)
    ric = summary["arms"]["ric_linear"]
    line = np.array([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
    expected = [hypervolume(line + lift, reference) for lift in (0.0, 0.2)]
    assert ric["hypervolume_mean"] == pytest.approx(np.mean(expected))
    assert ric["hypervolume_sd"] == pytest.approx(np.std(expected, ddof=1))
    np.testing.assert_allclose(ric["obtained_mean"], line + 0.1)
    assert ric["verbosity_spearman_mean"] == 1.0
    assert "verbosity_spearman_mean" not in summary["arms"]["base"]  # one unconditioned point: no steering
    assert summary["train_reward_pearson"] == pytest.approx(-0.3)
    # the online arm pays for the offline training it continues, and for its round's generations
    online = summary["arms"]["online"]
    assert online["train_seconds_mean"] == pytest.approx(150.0)
    assert online["generated_samples_mean"] == pytest.approx(30 + 16)
    assert online["reward_calls_mean"] == pytest.approx(60 + 32)
    assert summary["arms"]["ric_p_inf"]["train_seconds_mean"] == pytest.approx(100.0)


def test_online_cost_carried_from_the_offline_checkpoint_is_not_added_twice(front_quality, tmp_path):
    """An online fit started from an offline checkpoint that kept its ledger counts from step 0: its cost
    already holds the offline training; one started from a checkpoint without a ledger gets it added."""
    arms = fake_seed(tmp_path, 0, 0.0)
    metrics = arms["online"] / "metrics.json"
    for counted_from, expected in ((0, 150.0), (200, 250.0)):
        data = json.loads(metrics.read_text())
        data["cost"].update(train_seconds=150.0, counted_from_step=counted_from)
        metrics.write_text(json.dumps(data))
        cost = front_quality.arm_cost("online", tmp_path / "seed0", arms)
        assert cost["train_seconds"] == pytest.approx(expected), counted_from


def test_goals_follow_the_numbers(front_quality, tmp_path):
    per_seed = {seed: fake_seed(tmp_path, seed, lift) for seed, lift in ((0, 0.0), (1, 0.05))}
    goals = front_quality.goals(front_quality.summarize(tmp_path, [0, 1], per_seed))
    assert goals["RiC Spearman >= 0.9 for each reward"]["met"]
    assert goals["RiC + online >= Rewarded Soups and >= MORLHF"]["met"]
    assert goals["p = 2 and p = inf >= linear"]["met"]
    # RiC: 100 s offline + 50 s online + its 10 s sweep; MORLHF 1,010 s: less than a third
    assert goals["RiC (offline + online) costs <= 1/3 of MORLHF (wall seconds)"]["met"]
    assert goals["online > offline > SFT > base, each gap > 1 sd"]["met"]


def test_a_gap_within_one_sd_is_not_a_gap(front_quality, tmp_path):
    # seeds far apart: RiC offline's sd swamps its lead over SFT
    per_seed = {seed: fake_seed(tmp_path, seed, lift) for seed, lift in ((0, -0.9), (1, 1.5))}
    goals = front_quality.goals(front_quality.summarize(tmp_path, [0, 1], per_seed))
    assert not goals["online > offline > SFT > base, each gap > 1 sd"]["met"]


def test_plots_and_table(front_quality, tmp_path, capsys):
    per_seed = {0: fake_seed(tmp_path, 0, 0.0)}
    summary = front_quality.summarize(tmp_path, [0], per_seed)
    paths = front_quality.plot(summary, tmp_path / "front_quality_test")
    assert [p.name for p in paths] == ["front_quality_test.png", "front_quality_test_mappings.png",
                                       "front_quality_test_cost.png"]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in paths)
    front_quality.print_table(summary, front_quality.goals(summary))
    table = capsys.readouterr().out
    assert "MORLHF (5 policies)" in table and "RiC offline, p = inf" in table
    assert "Pearson of verbosity and readability on the training split: -0.30" in table


def test_arms_run_in_parts(front_quality, tmp_path, capsys):
    # only the RiC arms of one seed so far (--arms ric,mappings): the goals needing other arms are not decided
    arms = fake_seed(tmp_path, 0, 0.0)
    ric = {a: arms[a] for a in front_quality.MAPPINGS}
    summary = front_quality.summarize(tmp_path, [0], {0: ric})
    goals = front_quality.goals(summary)
    assert goals["RiC Spearman >= 0.9 for each reward"]["met"] is True
    assert goals["online > offline > SFT > base, each gap > 1 sd"] == {
        "met": None,
        "values": "not run: online, sft, base",
    }
    front_quality.print_table(summary, goals)
    assert "goal: RiC + online >= Rewarded Soups and >= MORLHF: not measured" in capsys.readouterr().out
    assert len(front_quality.plot(summary, tmp_path / "part")) == 3


def test_recorded_runs_count_after_a_fresh_checkout(front_quality, tmp_path, capsys):
    """A results file keeps every run: a later run in an empty folder (a fresh checkout) adds its seeds to them
    and gets the summary of all seeds run in one place; a file of other settings is not mixed in."""
    both = {seed: fake_seed(tmp_path / "together", seed, lift) for seed, lift in ((0, 0.0), (1, 0.2))}
    together = front_quality.summarize(tmp_path / "together", [0, 1], both)

    scale = front_quality.SCALES["cpu"]
    first = front_quality.summarize(tmp_path / "first", [0], {0: fake_seed(tmp_path / "first", 0, 0.0)})
    path = tmp_path / "front_quality_cpu.json"
    settings = {"settings": front_quality.dataclasses.asdict(scale), "recipe": front_quality.recipe_settings(scale)}
    path.write_text(json.dumps({**settings, **first}, default=float))
    earlier = front_quality.earlier_runs(path, scale)
    assert sorted(earlier["runs"]) == sorted((0, arm) for arm in first["arms"])
    later = front_quality.summarize(tmp_path / "later", [0, 1], {1: fake_seed(tmp_path / "later", 1, 0.2)}, earlier)
    assert later["reference_point"] == pytest.approx(together["reference_point"])
    for arm, row in together["arms"].items():
        assert later["arms"][arm]["seeds"] == 2
        assert later["arms"][arm]["hypervolume_mean"] == pytest.approx(row["hypervolume_mean"])
        assert later["arms"][arm]["train_seconds_mean"] == pytest.approx(row["train_seconds_mean"])

    lr = "model.init_args.learning_rate"
    path.write_text(json.dumps({**settings, "recipe": {**settings["recipe"], lr: 1.0}, **first}, default=float))
    assert front_quality.earlier_runs(path, scale)["runs"] == {}
    assert f"not merged, its recipe differ in ['{lr}']" in capsys.readouterr().out


def test_online_after_a_fresh_checkout_pays_for_the_recorded_offline_training(front_quality, tmp_path, monkeypatch):
    """The online arm continues a RiC checkpoint that a fresh checkout retrains without sweeping it again (its
    sweep is recorded): run_seed trains RiC with no sweep callback, and the online arm's cost still includes
    the offline training, taken from the recorded run."""
    trained = []
    monkeypatch.setattr(front_quality.recipe, "train", lambda folder, config: trained.append(
        (folder.name, config["trainer"]["callbacks"][1:])))  # fmt: skip
    monkeypatch.setattr(front_quality.recipe, "online_round", lambda *a, **k: 0.0)
    scale = front_quality.SCALES["smoke"]
    arms = front_quality.run_seed(tmp_path / "seed0", scale, 0, ("online",), frozenset({"ric_linear"}))
    assert trained == [("ric", [])] and sorted(arms) == ["online"]
    trained.clear()
    front_quality.run_seed(tmp_path / "seed0", scale, 0, ("online",))  # nothing recorded: RiC is swept as well
    assert [c["init_args"]["label"] for c in trained[0][1]] == ["ric_linear"]

    sweeps = fake_seed(tmp_path / "out", 0, 0.0)
    recorded = {"runs": {(0, "ric_linear"): {"seed": 0, "obtained": [[-1.0, 1.0], [1.0, -1.0]], "preferences": PREFS,
                                             "steering": {}, "cost": {"train_seconds": 700.0, "training_tokens": 5}}},
                "reward_names": NAMES, "train_reward_pearson": -0.3}  # fmt: skip
    summary = front_quality.summarize(tmp_path / "out", [0], {0: {"online": sweeps["online"]}}, recorded)
    assert summary["arms"]["online"]["train_seconds_mean"] == pytest.approx(50.0 + 700.0)
    assert summary["arms"]["online"]["training_tokens_mean"] == pytest.approx(1000 + 5)


def test_baselines_start_from_the_sft_model(front_quality, tmp_path, monkeypatch):
    """MORLHF and Rewarded Soups fine-tune the SFT arm's model (appendix B), exported once with its LoRA merged;
    a fresh checkout trains SFT again without sweeping it twice, and the baselines' cost includes it."""
    trained, exported, ran = [], [], []
    monkeypatch.setattr(front_quality.recipe, "train", lambda folder, config: trained.append(
        (folder.name, config["trainer"]["callbacks"][1:])))  # fmt: skip

    def export(cmd: list[str], **kwargs) -> None:
        exported.append(cmd[-3:])
        Path(cmd[-1]).mkdir(parents=True)
        (Path(cmd[-1]) / "ric.json").write_text("{}")

    def run_baseline(argv: list[str]) -> int:
        config = json.loads(Path(argv[2]).read_text())
        ran.append((argv[0], config["policy"]["model"]))
        Path(config["sweep"]["init_args"]["output_dir"]).mkdir(parents=True)
        return 0

    monkeypatch.setattr("benchmarks.experiment.subprocess.run", export)
    monkeypatch.setattr("ric.baselines.methods.main", run_baseline)
    out = tmp_path / "seed0"
    arms = front_quality.run_seed(out, front_quality.SCALES["smoke"], 0, ("morlhf", "soups"), frozenset({"sft"}))
    merged = out / "sft" / "merged"
    assert trained == [("sft", [])]
    assert exported == [["export", str(out / "sft" / "ckpt" / "last.ckpt"), str(merged)]]
    assert ran == [("morlhf", str(merged)), ("soups", str(merged))]
    assert arms == {name: out / "sweeps" / name for name in ("morlhf", "soups")}
    trained.clear()
    finished = frozenset({"sft", "morlhf", "soups"})  # all recorded: nothing is trained, exported or run again
    assert (
        front_quality.run_seed(tmp_path / "fresh", front_quality.SCALES["smoke"], 0, ("morlhf", "soups"), finished)
        == {}
    )
    assert len(trained) == 0 and len(exported) == 1 and len(ran) == 2

    sweeps = fake_seed(tmp_path / "out", 0, 0.0)
    summary = front_quality.summarize(tmp_path / "out", [0], {0: sweeps})
    assert summary["arms"]["morlhf"]["train_seconds_mean"] == pytest.approx(1000.0 + 100.0)
    assert summary["arms"]["soups"]["training_tokens_mean"] == pytest.approx(1000 + 1000)


def test_unknown_arm_is_refused(front_quality, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["front_quality.py", "--arms", "ric,rlhf"])
    with pytest.raises(SystemExit):
        front_quality.main()
    assert "unknown arm(s) ['rlhf']" in capsys.readouterr().err


def test_shipped_recipe_is_the_benchmarked_arm(front_quality, tmp_path):
    """configs/steer_hh_cpu.yaml is what the README reports: front_quality's cpu RiC arm is that config, its
    scale's overrides changing no setting (where the run writes, its progress display, checkpoint cadence and
    the sweep's output folder aside)."""
    from benchmarks.experiment import PATH_KEYS, flatten, load_config

    shipped = load_config("steer_hh_cpu")
    scale = front_quality.SCALES["cpu"]
    seed = shipped["seed_everything"]
    sweep = front_quality.sweep(tmp_path / "sweep", scale, seed, after_fit=True)
    arm = front_quality.fit_config(tmp_path, front_quality.settings(scale), seed, [sweep])

    per_run = ("trainer.callbacks", "trainer.default_root_dir", "trainer.enable_progress_bar", "data.output_dir",
               "data.progress", *PATH_KEYS)  # fmt: skip
    assert {k: v for k, v in flatten(shipped).items() if not k.startswith(per_run)} == {
        k: v for k, v in flatten(arm).items() if not k.startswith(per_run)
    }
    for key in PATH_KEYS:  # the same files, found from the checkout's root
        assert Path(flatten(arm)[key]) == (ROOT / flatten(shipped)[key]).resolve()
    assert front_quality.recipe.HH == Path(flatten(arm)["data.dataset.init_args.path"])

    def sweep_of(config: dict) -> dict:
        (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PreferenceSweep")]
        return {k: v for k, v in callback["init_args"].items() if k not in ("output_dir", "label")}

    assert sweep_of(shipped) == sweep_of(arm)

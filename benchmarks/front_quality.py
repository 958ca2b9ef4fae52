"""The paper's comparison at small scale: base model, plain SFT, RiC offline (three mappings), RiC + one online
round, MORLHF (one GRPO policy per preference) and Rewarded Soups (one GRPO expert per reward), over seeds, on
the same held-out prompts, with the cost of each arm.

hh-rlhf harmless-base from ``../shared/data``, SmolLM2-135M-Instruct, the offline rewards verbosity and
readability. RiC is the steering recipe of ``benchmarks/steering.py`` (``configs/steer_hh_cpu.yaml`` with the
scale's overrides, through the same config builder, so both benchmarks train the same model); SFT is the same
fine-tuning without reward markers; the baselines take the RiC arm's policy settings, data split and reward
space. Every arm is swept at the same 5 preferences with the same sampling and seed; hypervolumes of every arm
and seed share one reference point.

    .venv/bin/python -m benchmarks.front_quality --scale cpu      # 3 seeds; resumable, so it can run in parts
    .venv/bin/python -m benchmarks.front_quality --scale cpu --seeds 0   # one seed (then the others)
    .venv/bin/python -m benchmarks.front_quality --scale smoke    # wiring check, minutes
    .venv/bin/python -m benchmarks.front_quality --scale gpu      # one GPU machine

Everything finished (a trained arm, a sweep) is kept under ``--out`` and not rerun; the runs recorded in the
results file count too, so a fresh checkout adds arms and seeds to them instead of starting over. Results:
``benchmarks/results/front_quality_<scale>.json`` with ``.png`` (seed-averaged fronts), ``_mappings.png`` and
``_cost.png`` (hypervolume against wall seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import steering as recipe  # the recipe's config builder
from benchmarks.experiment import (
    PATH_KEYS,
    PREFERENCES,
    RESULTS,
    ROOT,
    command,
    export_once,
    flatten,
    get,
    load_config,
    override,
    sweep_callback,
    write_config,
    write_results,
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much of everything one run of the benchmark does.

    Args:
        steps: offline steps of SFT and RiC (the recipe's own where the budget allows).
        online_steps, online_generations: the online round: training steps on the MORS-kept samples, and
            samples generated for it.
        rl_steps, rl_learning_rate: GRPO steps per baseline policy and their learning rate.
        prompts, samples: held-out prompts and answers per prompt and preference of every sweep.
        new_tokens: the longest answer, in training-time generation and in the sweeps.
        seeds: the default seeds (``--seeds`` overrides).
        accelerator: Lightning's accelerator for every arm.
    """

    steps: int
    online_steps: int
    online_generations: int
    rl_steps: int
    prompts: int
    samples: int
    new_tokens: int
    seeds: tuple[int, ...] = (0, 1, 2)
    rl_learning_rate: float = 2.0e-4
    accelerator: str = "cpu"


SCALES = {
    "smoke": Scale(steps=4, online_steps=2, online_generations=8, rl_steps=2, prompts=4, samples=1, new_tokens=16,
                   seeds=(0,)),
    "cpu": Scale(steps=200, online_steps=60, online_generations=256, rl_steps=30, prompts=64, samples=2,
                 new_tokens=128),
    "gpu": Scale(steps=2000, online_steps=500, online_generations=4096, rl_steps=500, prompts=200, samples=2,
                 new_tokens=128, accelerator="gpu"),
}  # fmt: skip

#: arm -> its label in tables and plots (the main comparison; the mappings are compared on their own)
ARMS = {"base": "base", "sft": "plain SFT", "ric_linear": "RiC offline", "online": "RiC + 1 online",
        "morlhf": "MORLHF (5 policies)", "soups": "Rewarded Soups (2 experts)"}  # fmt: skip
MAPPINGS = {"ric_linear": "linear", "ric_p_norm": "p = 2", "ric_p_inf": "p = inf"}


def settings(scale: Scale) -> dict[str, Any]:
    """Overrides of the recipe at this scale: its steps (and warmup), accelerator, held-out prompts and answer
    length."""
    warmup = get(load_config(recipe.RECIPE_CONFIG), "model.init_args.warmup_steps")
    return {"trainer.max_steps": scale.steps, "model.init_args.warmup_steps": min(warmup, max(1, scale.steps // 4)),
            "trainer.accelerator": scale.accelerator, "data.max_test_prompts": scale.prompts,
            "model.init_args.max_new_tokens": scale.new_tokens,
            **({"model.init_args.dtype": "bfloat16"} if scale.accelerator == "gpu" else {})}  # fmt: skip


#: keys of a composed config that only say where a run reads and writes (left out when recipes are compared)
PER_RUN = ("seed_everything", "trainer.callbacks", "trainer.default_root_dir", "data.output_dir", *PATH_KEYS)


def recipe_settings(scale: Scale) -> dict[str, Any]:
    """The RiC arm's settings at this scale, dotted key -> value (what a results file's runs were trained with)."""
    config = recipe.recipe_config(Path("run"), settings(scale), 0)
    return {k: v for k, v in flatten(config).items() if not k.startswith(PER_RUN)}


def sweep(dest: Path, scale: Scale, seed: int, **extra: Any) -> dict:
    """The sweep every arm gets: 5 preferences, the recipe's sampling, ``samples`` answers per prompt."""
    sampling = {**recipe.EVAL, "max_new_tokens": scale.new_tokens, "batch_size": recipe.BATCH}
    return sweep_callback(dest, seed, scale.samples, sampling, marker_responses=64, **extra)


def fit_config(folder: Path, overrides: dict, seed: int, callbacks: list[dict] = ()) -> dict:
    """The recipe with ``overrides`` (a scale's settings and an arm's), run in ``folder``."""
    return recipe.recipe_config(folder, overrides, seed, callbacks=callbacks)


def run_cli(args: list[str]) -> None:
    from ric.cli import RiCCLI

    RiCCLI(args=args)


def test_sweep(folder: Path, config: dict, ckpt: Path | None, callback: dict) -> Path:
    """``ric test`` of a config (no online loop, no checkpointing) with one sweep; skipped once written."""
    dest = Path(callback["init_args"]["output_dir"])
    if not (dest / "metrics.json").is_file():
        path = write_config(folder / f"test-{dest.name}.yaml", override(config, {"trainer.callbacks": [callback]}))
        run_cli(["test", "--config", str(path), *(["--ckpt_path", str(ckpt)] if ckpt else [])])
    return dest


#: what ``--arms`` selects: a group -> the arms (sweep folders) it produces
GROUPS = {"base": ("base",), "sft": ("sft",), "ric": ("ric_linear",), "mappings": ("ric_p_norm", "ric_p_inf"),
          "online": ("online",), "morlhf": ("morlhf",), "soups": ("soups",)}  # fmt: skip


def run_seed(
    out: Path, scale: Scale, seed: int, groups: tuple[str, ...] = tuple(GROUPS), recorded: frozenset[str] = frozenset()
) -> dict[str, Path]:
    """The arms of ``groups`` for one seed, as far as not done before; returns arm -> sweep folder.

    ``recorded``: arms of this seed that the results file already holds. Where the online arm or the other
    mappings need the RiC checkpoint again (a fresh checkout), RiC is retrained without sweeping it twice."""
    sweeps = out / "sweeps"
    groups = tuple(g for g in groups if not set(GROUPS[g]) <= recorded)  # recorded arms are finished arms
    s = settings(scale)
    steps = s["trainer.max_steps"]
    arms: dict[str, Path] = {}
    plain = {**s, "model.init_args.conditioned": False}

    # plain SFT: the same fine-tuning without markers; the base model is its config before any step. The
    # baselines start from it, as in the paper (appendix B: they fine-tune the SFT model with RL)
    baselines = [name for name in ("morlhf", "soups") if name in groups]
    if "sft" in groups or baselines:
        train_arm(out / "sft", plain, scale, seed, "sft", recorded, arms)
    if "base" in groups:
        arms["base"] = test_sweep(out / "base", fit_config(out / "base", plain, seed), None,
                                  sweep(sweeps / "base", scale, seed, unconditioned=True))  # fmt: skip

    # RiC offline, swept after training with the recipe's mapping, then with the other two
    ric = out / "ric"
    ckpt = recipe.checkpoint_at(ric, steps, steps)
    if {"ric", "mappings", "online"} & set(groups):
        train_arm(ric, s, scale, seed, "ric_linear", recorded, arms)
    if "mappings" in groups:
        for name, method in (("ric_p_norm", "p_norm"), ("ric_p_inf", "p_inf")):
            arms[name] = test_sweep(ric, fit_config(ric, s, seed), ckpt,
                                    sweep(sweeps / name, scale, seed, method=method))  # fmt: skip

    # one online round with MORS from the offline checkpoint, swept after it
    if "online" in groups:
        recipe.online_round(ckpt, out / "online", s, seed, steps, scale.online_generations, scale.online_steps,
                            [sweep(sweeps / "online", scale, seed, after_fit=True)])  # fmt: skip
        arms["online"] = sweeps / "online"

    for name in baselines:
        arms[name] = baseline(name, out, s, scale, seed, sft_model(out / "sft", s))
    return arms


def train_arm(folder: Path, s: dict, scale: Scale, seed: int, arm: str, recorded: frozenset[str],
              arms: dict[str, Path]) -> None:  # fmt: skip
    """Train ``arm`` unless trained, swept after training unless the results file already holds its sweep
    (a fresh checkout that needs the checkpoint again: RiC for the online round, SFT for the baselines)."""
    dest = folder.parent / "sweeps" / arm
    swept_before = arm in recorded and not (dest / "metrics.json").is_file()
    callbacks = [] if swept_before else [sweep(dest, scale, seed, after_fit=True)]
    recipe.train(folder, fit_config(folder, s, seed, callbacks))
    if not swept_before:
        arms[arm] = dest


def sft_model(folder: Path, s: dict) -> Path:
    """The SFT arm's final checkpoint as a standalone model folder (LoRA merged), exported once."""
    steps = s["trainer.max_steps"]
    return export_once(recipe.checkpoint_at(folder, steps, steps), folder / "merged")


def baseline(name: str, out: Path, s: dict, scale: Scale, seed: int, start: Path) -> Path:
    """MORLHF or Rewarded Soups with the RiC arm's policy settings, data split, reward space and sampling,
    trained from the model folder ``start`` (the SFT arm's)."""
    from ric.baselines.methods import main as run_baseline

    dest = out / "sweeps" / name
    if (dest / "metrics.json").is_file():
        return dest
    ric = fit_config(out / name, s, seed)
    policy = {k: v for k, v in ric["model"]["init_args"].items() if k not in ("reward_names", "conditioned")}
    policy["model"] = str(start)
    grpo = {"steps": scale.rl_steps, "learning_rate": scale.rl_learning_rate, "max_new_tokens": scale.new_tokens,
            "temperature": recipe.EVAL["temperature"], "top_p": recipe.EVAL["top_p"],
            "save_steps": max(1, scale.rl_steps // 4), "seed": seed}  # fmt: skip
    cfg = {
        "policy": policy,
        "data": {"class_path": "ric.data.RelabelDataModule", "init_args": ric["data"]},
        "grpo": grpo,
        "sweep": sweep(dest, scale, seed),
        "output_dir": str(out / name),
        **({"preferences": PREFERENCES} if name == "morlhf" else {}),
    }
    path = out / name / "baseline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    if run_baseline([name, "--config", str(path)]) != 0:
        raise RuntimeError(f"ric baseline {name} failed")
    return dest


def arm_cost(arm: str, seed_out: Path, arms: dict[str, Path], recorded: dict[str, dict] | None = None) -> dict:
    """Wall seconds (training, generating in the sweep), generated samples, reward calls and training tokens
    of one arm of one seed; RiC's other mappings and the online arm include the offline training they reuse
    (unless the online fit's checkpoint carried it), the baselines the SFT training they start from, from its
    sweep here or else from ``recorded`` (arm -> cost of this seed in the results file)."""
    from ric.compare import read_cost

    cost = {k: v or 0.0 for k, v in read_cost(arms[arm]).items()}
    reused = {"ric_p_norm": "ric_linear", "ric_p_inf": "ric_linear", "online": "ric_linear", "morlhf": "sft",
              "soups": "sft"}.get(arm)  # fmt: skip
    ledger = json.loads((arms[arm] / "metrics.json").read_text()).get("cost", {})
    if reused and ledger.get("counted_from_step") != 0:  # 0: the online fit's ledger began with the offline one
        offline = read_cost(arms[reused]) if reused in arms else (recorded or {})[reused]
        for key in ("train_seconds", "training_tokens"):
            cost[key] += offline[key] or 0.0
    if arm == "online":  # the online round's generations and their reward calls (the ledger counts training only)
        summaries = sorted((seed_out / "online" / "online").glob("round*/summary.json"))
        made = sum(json.loads(p.read_text())["generated"] for p in summaries)
        names = len(read_front(arms[arm])[0])
        cost["generated_samples"] += made
        cost["reward_calls"] += made * names
    return cost


def read_front(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    from ric.compare import read_front as read

    return read(folder)


#: what :func:`earlier_runs` gives when there is nothing to add (read only)
NO_EARLIER: dict[str, Any] = {"runs": {}, "reward_names": None, "train_reward_pearson": None}


def summarize(out: Path, seeds: list[int], per_seed: dict[int, dict[str, Path]], earlier: dict | None = None) -> dict:
    """Hypervolume (one reference point for all), controllability and cost per arm: mean and sd over seeds.

    ``earlier`` (:func:`earlier_runs`) holds runs of an earlier results file; they count where ``out`` no longer
    has that seed and arm (a fresh checkout keeps the results, not the runs), so the benchmark runs in parts."""
    from ric.pareto import hypervolume, shared_reference

    earlier = earlier or NO_EARLIER
    records: dict[tuple[int, str], dict] = {}
    names = earlier["reward_names"]
    recorded_costs: dict[int, dict[str, dict]] = {}
    for (seed, arm), run in earlier["runs"].items():
        recorded_costs.setdefault(seed, {})[arm] = run["cost"]
    for seed, arms in per_seed.items():
        for arm, path in arms.items():
            names, prefs, means = read_front(path)
            metrics = json.loads((path / "metrics.json").read_text())
            records[(seed, arm)] = {
                "seed": seed,
                "obtained": means.tolist(),
                "preferences": prefs.tolist(),
                "steering": metrics.get("steering", {}),
                "marker_effects": metrics.get("marker_effects", {}).get("rewards", {}),
                "cost": arm_cost(arm, out / f"seed{seed}", arms, recorded_costs.get(seed)),
            }
    for key, run in earlier["runs"].items():
        records.setdefault(key, run)
    records = {key: run for key, run in records.items() if key[0] in seeds}
    reference = shared_reference([np.array(run["obtained"]) for run in records.values()])
    rows: dict[str, dict] = {}
    for arm in sorted({a for _, a in records}):
        runs = [{**records[(seed, arm)], "hypervolume": hypervolume(np.array(records[(seed, arm)]["obtained"]),
                                                                    reference)}
                for seed in sorted(seeds) if (seed, arm) in records]  # fmt: skip
        hv = np.array([r["hypervolume"] for r in runs])
        row: dict[str, Any] = {"seeds": len(runs), "hypervolume_mean": hv.mean(), "hypervolume_sd": sd(hv)}
        for name in names:
            for key in ("spearman", "spread_ratio"):
                values = np.array([r["steering"][name][key] for r in runs if name in r["steering"]])
                if len(values):
                    row[f"{name}_{key}_mean"], row[f"{name}_{key}_sd"] = values.mean(), sd(values)
        for key in runs[0]["cost"]:
            row[f"{key}_mean"] = float(np.mean([r["cost"][key] for r in runs]))
        row["obtained_mean"] = np.mean([r["obtained"] for r in runs], axis=0).tolist()
        row["preferences"] = runs[0]["preferences"]
        row["runs"] = runs
        rows[arm] = row
    correlation = next((c for arms in per_seed.values() for path in arms.values()
                        if (c := json.loads((path / "metrics.json").read_text()).get("train_reward_correlation"))),
                       None)  # fmt: skip
    pearson = earlier["train_reward_pearson"] if correlation is None else correlation[0][1]
    return {"reward_names": names, "reference_point": reference.tolist(), "arms": rows,
            "train_reward_pearson": pearson}  # fmt: skip


def earlier_runs(path: Path, scale: Scale) -> dict:
    """The runs of an earlier results file (seed, arm -> run), if it measured the same scale and recipe;
    a file of other settings is not mixed in (and is replaced)."""
    if not path.is_file():
        return NO_EARLIER
    previous = json.loads(path.read_text())
    current = json.loads(json.dumps({"settings": dataclasses.asdict(scale), "recipe": recipe_settings(scale)}))
    for part, now in current.items():
        then = previous.get(part) or {}
        if changed := sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k)):
            print(f"{path.name}: not merged, its {part} differ in {changed}")
            return NO_EARLIER
    runs = {(run["seed"], arm): run for arm, row in previous["arms"].items() for run in row["runs"]}
    return {"runs": runs, "reward_names": previous["reward_names"],
            "train_reward_pearson": previous.get("train_reward_pearson")}  # fmt: skip


def sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def goals(summary: dict) -> dict[str, dict]:
    """The issue's goals, each with the numbers it was decided on; ``met`` is None where an arm it needs was
    not run (``--arms``)."""
    arms, names = summary["arms"], summary["reward_names"]

    def hv(arm: str) -> tuple[float, float]:
        return arms[arm]["hypervolume_mean"], arms[arm]["hypervolume_sd"]

    def above(a: str, b: str) -> bool:  # a beats b by more than the larger of their sds
        (ma, sa), (mb, sb) = hv(a), hv(b)
        return ma - mb > max(sa, sb)

    def seconds(arm: str) -> float:
        return arms[arm]["train_seconds_mean"] + arms[arm]["generation_seconds_mean"]

    def spearman(arm: str) -> dict[str, float | None]:
        return {n: arms[arm].get(f"{n}_spearman_mean") for n in names}

    def check(needed: tuple[str, ...], met: Callable[[], bool], values: Callable[[], Any]) -> dict:
        missing = [a for a in needed if a not in arms]
        if missing:
            return {"met": None, "values": f"not run: {', '.join(missing)}"}
        return {"met": bool(met()), "values": values()}

    return {
        "RiC Spearman >= 0.9 for each reward": check(
            ("ric_linear",), lambda: all(v is not None and v >= 0.9 for v in spearman("ric_linear").values()),
            lambda: {a: spearman(a) for a in (*ARMS, *MAPPINGS) if a in arms}),
        "online > offline > SFT > base, each gap > 1 sd": check(
            ("online", "ric_linear", "sft", "base"),
            lambda: above("online", "ric_linear") and above("ric_linear", "sft") and above("sft", "base"),
            lambda: {a: hv(a) for a in ("online", "ric_linear", "sft", "base")}),
        "RiC + online >= Rewarded Soups and >= MORLHF": check(
            ("online", "soups", "morlhf"), lambda: hv("online")[0] >= max(hv("soups")[0], hv("morlhf")[0]),
            lambda: {a: hv(a) for a in ("online", "soups", "morlhf")}),
        "RiC (offline + online) costs <= 1/3 of MORLHF (wall seconds)": check(
            ("online", "morlhf"), lambda: seconds("online") <= seconds("morlhf") / 3,
            lambda: {"RiC": seconds("online"), "MORLHF": seconds("morlhf")}),
        "p = 2 and p = inf >= linear": check(
            tuple(MAPPINGS), lambda: min(hv("ric_p_norm")[0], hv("ric_p_inf")[0]) >= hv("ric_linear")[0],
            lambda: {a: hv(a) for a in MAPPINGS}),
    }  # fmt: skip


def plot(summary: dict, stem: Path) -> list[Path]:
    """Seed-averaged fronts of the main arms and of the mappings, and hypervolume against cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ric.pareto import plot_fronts

    arms, names = summary["arms"], summary["reward_names"]
    paths = []
    for labels, path in ((ARMS, stem.with_suffix(".png")), (MAPPINGS, stem.with_name(stem.name + "_mappings.png"))):
        shown = {seeded(label, arms[arm]): arm for arm, label in labels.items() if arm in arms}
        plot_fronts({label: np.array(arms[arm]["obtained_mean"]) for label, arm in shown.items()}, path, names,
                    {label: [p[0] for p in arms[arm]["preferences"]] for label, arm in shown.items()
                     if np.all(np.isfinite(arms[arm]["preferences"]))},
                    title=f"obtained rewards, mean over seeds (labels: w_{names[0]})")  # fmt: skip
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, label in rows_shown().items():
        if arm not in arms:
            continue
        a = arms[arm]
        x = a["train_seconds_mean"] + a["generation_seconds_mean"]
        ax.errorbar(x, a["hypervolume_mean"], yerr=a["hypervolume_sd"], fmt="o", capsize=3, label=seeded(label, a))
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds per seed (training + sweep)")
    ax.set_ylabel("hypervolume (shared reference)")
    ax.set_title("hypervolume vs cost, mean ± sd over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    cost = stem.with_name(stem.name + "_cost.png")
    fig.savefig(cost, dpi=130)
    plt.close(fig)
    return [*paths, cost]


def seeded(label: str, row: dict) -> str:
    """An arm's label with the number of seeds its mean is over (arms are run in parts, so they differ)."""
    return f"{label} ({row['seeds']} seed{'s' if row['seeds'] != 1 else ''})"


def rows_shown() -> dict[str, str]:
    """arm -> label of the table and the cost plot: the main arms, then RiC's other two mappings."""
    return {**ARMS, **{k: f"RiC offline, {v}" for k, v in MAPPINGS.items() if k != "ric_linear"}}


def print_table(summary: dict, checks: dict) -> None:
    names = summary["reward_names"]
    head = f"{'arm':<28}{'hypervolume':>16}" + "".join(f"{'Spearman ' + n[:11]:>22}" for n in names)
    print("\n" + head + f"{'train s':>9}{'sweep s':>9}{'generated':>11}{'reward calls':>14}")
    for arm, label in rows_shown().items():
        a = summary["arms"].get(arm)
        if a is None:
            continue
        cells = [f"{a['hypervolume_mean']:.3f} ± {a['hypervolume_sd']:.3f}"]
        for n in names:
            m = a.get(f"{n}_spearman_mean")
            cells.append("-" if m is None else f"{m:+.2f} ± {a[f'{n}_spearman_sd']:.2f}")
        costs = [f"{a[k]:.0f}" for k in ("train_seconds_mean", "generation_seconds_mean", "generated_samples_mean",
                                         "reward_calls_mean")]  # fmt: skip
        print(f"{label:<28}{cells[0]:>16}" + "".join(f"{c:>22}" for c in cells[1:])
              + f"{costs[0]:>9}{costs[1]:>9}{costs[2]:>11}{costs[3]:>14}")  # fmt: skip
    if summary["train_reward_pearson"] is not None:
        print(f"Pearson of {names[0]} and {names[1]} on the training split: {summary['train_reward_pearson']:+.2f}")
    for name, check in checks.items():
        print(f"goal: {name}: {({True: 'met', False: 'not met', None: 'not measured'})[check['met']]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the scale's)")
    parser.add_argument("--out", type=Path, help="default runs/front_quality-<scale>")
    parser.add_argument("--arms", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else list(scale.seeds)
    groups = tuple(args.arms.split(","))
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"unknown arm(s) {unknown} in --arms; choose from {list(GROUPS)}")
    out = (args.out or ROOT / "runs" / f"front_quality-{args.scale}").resolve()
    if not recipe.HH.is_file():
        raise FileNotFoundError(f"hh-rlhf data not found at {recipe.HH} (../shared/data beside the checkout)")
    if args.scale == "smoke":
        recipe.EVAL["max_new_tokens"] = scale.new_tokens
    start = time.perf_counter()
    # every arm and seed finished so far counts: by this run, an earlier one, or one recorded in the results
    stem = RESULTS / f"front_quality_{args.scale}"
    earlier = earlier_runs(stem.with_suffix(".json"), scale)
    for seed in seeds:
        run_seed(out / f"seed{seed}", scale, seed, groups, frozenset(a for k, a in earlier["runs"] if k == seed))
    per_seed = {}
    for folder in sorted(out.glob("seed*")):
        done = {
            a: folder / "sweeps" / a for a in (*ARMS, *MAPPINGS) if (folder / "sweeps" / a / "metrics.json").is_file()
        }
        if done:
            per_seed[int(folder.name[4:])] = done
    seeds = sorted(set(per_seed) | {seed for seed, _ in earlier["runs"]})
    summary = summarize(out, seeds, per_seed, earlier)
    checks = goals(summary)
    print_table(summary, checks)
    result = {"scale": args.scale, "settings": dataclasses.asdict(scale), "recipe": recipe_settings(scale),
              "seeds": seeds, **summary, "goals": checks, "wall_seconds_this_run": time.perf_counter() - start,
              "command": command()}  # fmt: skip
    write_results(stem.name, result)
    for path in plot(summary, stem):
        print(path)


if __name__ == "__main__":
    main()

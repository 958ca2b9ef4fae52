"""Steering on real data: what limits RiC's control of each reward on hh-rlhf, one factor at a time, and a
recipe that steers, measured over seeds on held-out prompts.

SmolLM2-135M-Instruct, hh-rlhf harmless-base (``../shared/data``, both responses of every dialogue), the
offline rewards verbosity and readability. Every run trains through ``ric fit`` (checkpoints at the steps a
study asks for) and is evaluated through the public API (``ric.load`` + ``policy.steer``) on the held-out
prompts of its split: 5 preferences, ``--prompts`` prompts x ``--samples`` answers each, the same seed for
every preference. Per reward: Spearman of the obtained mean against the reward's weight, and the spread
ratio (range of the obtained means over the range of the desired ones).

    .venv/bin/python benchmarks/steering.py --study length            # steering along training (one run)
    .venv/bin/python benchmarks/steering.py --study lr|format|responses|layers|lora|range|online
    .venv/bin/python benchmarks/steering.py --study control|alone|alone-long
    .venv/bin/python benchmarks/steering.py --study recipe --seeds 0,1,2 --prompts 64 --samples 2

Every finished training run and evaluation is kept under ``--out`` (default ``runs/steering``) and skipped
when the command is run again; results go to ``benchmarks/results/steering_<study>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RESULTS = ROOT / "benchmarks" / "results"
PREFERENCES = [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
#: sampling of every evaluation: the paper's online settings, answers up to 128 tokens (shorter would cap verbosity)
EVAL: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128}
#: answers decoding at once on a continuous batch (on this CPU 2.4x faster than the static batches of 8 used
#: before, benchmarks/generation.py)
BATCH = 32

#: the recipe: what the studies below vary one at a time
BASE: dict[str, Any] = {
    "steps": 400, "lr": 2.0e-3, "warmup": 20, "lora_r": 16, "lora_layers": None, "lora_modules": None,
    "decimals": 1, "batch": 8,
    "max_tokens": 192, "responses": "both", "reward_range": "data", "quantiles": [0.05, 0.95], "method": "linear",
    "template": "{prompt} {rewards}\n\nAssistant:", "data": "hh", "rewards": ["verbosity", "readability"],
    "conditioned": True,
}  # fmt: skip
#: reward name -> its class in ``ric.text.rewards``
REWARDS = {"verbosity": "Verbosity", "readability": "Readability", "sentiment": "Sentiment", "relevance": "Relevance"}

#: study -> (variants: name -> overrides of BASE, steps at which each variant is evaluated)
SHORT = {"steps": 200}
STUDIES: dict[str, tuple[dict[str, dict[str, Any]], list[int] | None]] = {
    "length": ({"recipe": {}}, [100, 200]),
    "lr": ({"lr=5e-4": {**SHORT, "lr": 5.0e-4}, "lr=2e-3": SHORT, "lr=5e-3": {**SHORT, "lr": 5.0e-3}}, None),
    "format": (
        {"1 decimal": SHORT, "integers": {**SHORT, "decimals": 0},
         "markers first": {**SHORT, "template": "{rewards} {prompt}\n\nAssistant:"}},
        None,
    ),
    "responses": ({"both (2 per prompt)": SHORT, "chosen only (1 per prompt)": {**SHORT, "responses": "chosen"}}, None),
    "layers": ({"all 30 layers": SHORT, "top 10 layers": {**SHORT, "lora_layers": list(range(20, 30))}}, None),
    # the adapter's capacity: the paper's rank (alpha = r throughout, so the update's scale is unchanged), and
    # the authors' script's target modules
    "lora": (
        {"r=16, all 7 projections (recipe)": SHORT, "r=64 (the paper's)": {**SHORT, "lora_r": 64},
         "q_proj, v_proj only (the authors')": {**SHORT, "lora_modules": ["q_proj", "v_proj"]}},
        None,
    ),
    "control": ({"quickstart data": {**SHORT, "data": "quickstart", "max_tokens": 256}}, None),
    "recipe": ({"recipe": {}}, None),
    # is readability's marker ignored because verbosity's is easier to read, or on its own as well?
    "alone": ({"readability alone": {**SHORT, "rewards": ["readability"]}}, None),
    # trained twice as long (the quickstart's data needs ~4x its 120 steps before the marker is read)
    "alone-long": ({"readability alone": {"rewards": ["readability"]}}, [200, 400]),
}  # fmt: skip


def run_dir(out: Path, study: str, name: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in name)
    return out / study / f"{safe}-seed{seed}"


def train_config(
    folder: Path, s: dict[str, Any], seed: int, save_steps: list[int], callbacks: list[dict] = ()
) -> dict[str, Any]:
    """A ``ric fit`` config for settings ``s``: checkpoints at ``save_steps``, then ``callbacks`` (none: no
    sweep, the studies evaluate below; ``front_quality.py`` adds its own)."""
    dataset = (
        {"class_path": "ric.text.datasets.HHRLHF", "init_args": {"path": str(HH), "responses": s["responses"]}}
        if s["data"] == "hh"
        else {"class_path": "ric.text.datasets.Quickstart"}
    )
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder / "ckpt"), "filename": "step{step}",
                       "every_n_train_steps": min(save_steps), "save_top_k": -1, "save_last": True,
                       "auto_insert_metric_name": False}},
        *callbacks,
    ]  # fmt: skip
    lora = {}
    if s["lora_layers"] or s["lora_modules"]:
        lora = {"lora_layers": s["lora_layers"], "lora_target_modules": list(s["lora_modules"] or LLAMA)}
    return {
        "seed_everything": seed,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": s["steps"], "logger": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "default_root_dir": str(folder),
                    "enable_progress_bar": False, "callbacks": callbacks},
        "model": {"class_path": "ric.text.policy.TextPolicy", "init_args": {
            "model": "smollm2", "reward_names": list(s["rewards"]), "template": s["template"],
            "conditioned": s.get("conditioned", True),
            "decimals": s["decimals"], "lora_r": s["lora_r"], "lora_alpha": s["lora_r"], "lora_dropout": 0.0,
            "learning_rate": s["lr"], "warmup_steps": s["warmup"], "max_length": s["max_tokens"],
            "max_tokens": s["max_tokens"], "max_new_tokens": 128, "generation_batch_size": 32, "packing": True,
            **lora}},
        "data": {"dataset": dataset,
                 "rewards": [{"class_path": f"ric.text.rewards.{REWARDS[r]}"} for r in s["rewards"]],
                 "batch_size": s["batch"], "val_fraction": 0.0, "test_fraction": 0.04 if s["data"] == "hh" else 0.15,
                 "max_test_prompts": 64, "seed": 0, "cache_dir": str(ROOT / ".ric_cache"), "output_dir": str(folder),
                 "reward_range": s["reward_range"], "range_quantiles": s["quantiles"], "method": s["method"],
                 "progress": False},
    }  # fmt: skip


LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train(
    folder: Path,
    s: dict[str, Any],
    seed: int,
    save_steps: list[int],
    callbacks: list[dict] = (),
    adjust: Callable[[dict], None] | None = None,
) -> float:
    """Train unless the final checkpoint exists; returns the training seconds (recorded on the first run).
    ``adjust`` edits the config in place before it is written (another benchmark's scale)."""
    done = folder / "trained.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.json"  # (LightningCLI writes its own config.yaml beside it)
    settings = train_config(folder, s, seed, save_steps, callbacks)
    if adjust is not None:
        adjust(settings)
    config.write_text(json.dumps(settings))
    ckpt = folder / "ckpt" / "last.ckpt"
    cmd = [sys.executable, "-m", "ric.cli", "fit", "--config", str(config)] + (
        ["--ckpt_path", "last"] if ckpt.exists() else []
    )
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"seconds": seconds, "steps": s["steps"]}))
    return seconds


def data_module(folder: Path) -> Any:
    """The run's data module as its config builds it (no model is loaded)."""
    return build_data_module(json.loads((folder / "run.json").read_text())["data"])


def build_data_module(config: dict[str, Any]) -> Any:
    """A ``RelabelDataModule`` from the ``data`` section of a ``ric fit`` config."""
    import importlib

    from ric.data import RelabelDataModule

    def build(spec: dict) -> Any:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))

    settings = {k: v for k, v in config.items() if k not in ("dataset", "rewards")}
    return RelabelDataModule(build(config["dataset"]), [build(r) for r in config["rewards"]], **settings)


def held_out_prompts(folder: Path, n: int) -> list[str]:
    """The held-out prompts of the run's split (the same for every run on the same data)."""
    dm = data_module(folder)
    return dm.split(dm.dataset.load())[2][:n]


def evaluate(ckpt: Path, prompts: list[str], samples: int, seed: int, space_override: dict | None = None) -> dict:
    """Steer the checkpoint at the 5 preferences and measure how each reward follows its weight."""
    import ric
    from ric.evaluation import steering_measures
    from ric.interfaces import score_all
    from ric.pareto import hypervolume

    policy = ric.load(ckpt)
    if space_override:
        policy.reward_space = dataclasses.replace(policy.reward_space, **space_override)
    space = policy.reward_space
    rewards = space.build_rewards()
    desired, means, sems = [], [], []
    # one reward has no trade-off to prefer: its desired value is swept across the range instead
    alone = len(space.reward_names) == 1
    points = [[t] for t in np.linspace(0.0, 1.0, len(PREFERENCES))] if alone else PREFERENCES
    start = time.perf_counter()
    for w in points:
        target = (
            {"desired_rewards": space.r_min + np.array(w) * (space.r_max - space.r_min)} if alone else {"preference": w}
        )
        steered = policy.steer(prompts, **target, num_samples=samples, seed=seed, **EVAL, batch_size=BATCH)
        z = space.normalize(score_all(rewards, [s.prompt for s in steered], [s.sample for s in steered]))
        desired.append(steered[0].desired_rewards)
        means.append(z.mean(axis=0))
        sems.append(z.std(axis=0, ddof=1) / np.sqrt(len(z)))
    seconds = time.perf_counter() - start
    prefs, desired, means = np.array(points), np.array(desired), np.array(means)
    measures = steering_measures(space.reward_names, prefs, desired, means)
    return {
        "steering": measures,
        "desired": desired.tolist(),
        "obtained": means.tolist(),
        "obtained_sem": np.array(sems).tolist(),
        "hypervolume": hypervolume(means, space.r_min),
        "r_min": space.r_min.tolist(),
        "r_max": space.r_max.tolist(),
        "seconds_generating": seconds,
        "generations": len(points) * len(prompts) * samples,
    }


def checkpoint_at(folder: Path, step: int, final: int) -> Path:
    """The checkpoint saved at ``step`` (a resumed run writes ``last-v1.ckpt`` beside an older ``last.ckpt``,
    so ``last`` is only the fallback for the final step)."""
    saved = folder / "ckpt" / f"step{step}.ckpt"
    return saved if saved.is_file() or step != final else folder / "ckpt" / "last.ckpt"


def run_study(args: argparse.Namespace) -> dict:
    variants, steps = STUDIES.get(args.study, ({"recipe": {}}, None))
    seeds = [int(v) for v in args.seeds.split(",")]
    results: dict[str, Any] = {"study": args.study, "base": BASE, "prompts": args.prompts, "samples": args.samples,
                               "seeds": seeds, "runs": []}  # fmt: skip
    if args.study in ("range", "online"):
        return derived_study(args, results, seeds)
    for name, overrides in variants.items():
        s = {**BASE, **overrides}
        at = steps or [s["steps"]]
        for seed in seeds:
            # the length study evaluates the recipe's own run along the way: one training run serves both
            folder = run_dir(args.out, "recipe" if args.study == "length" else args.study, name, seed)
            seconds = train(folder, s, seed, at if steps else [s["steps"]])
            prompts = held_out_prompts(folder, args.prompts)
            for step in at:
                path = folder / f"eval-step{step}-p{args.prompts}x{args.samples}.json"
                ckpt = checkpoint_at(folder, step, s["steps"])
                evaluation = cached(path, evaluate, ckpt, prompts, args.samples, seed)
                results["runs"].append({"variant": name, "seed": seed, "step": step, "train_seconds": seconds,
                                        "settings": s, **evaluation})  # fmt: skip
                report(name, seed, step, evaluation)
    return results


def derived_study(args: argparse.Namespace, results: dict, seeds: list[int]) -> dict:
    """Studies on the recipe's trained model: the reward range used for the desired values (evaluation only),
    and one online round with MORS (training continued from the recipe's final checkpoint)."""
    s = results["base"] = dict(BASE)
    for seed in seeds:
        folder = run_dir(args.out, "recipe", "recipe", seed)
        if args.recipe_runs:  # another benchmark's runs of the recipe (front_quality's RiC arm), as trained there
            folder = Path(args.recipe_runs.format(seed=seed))
            if not (folder / "trained.json").is_file():
                raise FileNotFoundError(f"--recipe-runs: no finished training run at {folder} (no trained.json)")
            s["steps"] = json.loads((folder / "trained.json").read_text())["steps"]
            results["recipe_runs"] = args.recipe_runs
        seconds = train(folder, s, seed, [s["steps"]])
        prompts = held_out_prompts(folder, args.prompts)
        ckpt = folder / "ckpt" / "last.ckpt"
        if args.study == "range":
            import ric

            space = ric.load(ckpt).reward_space
            z = None
            variants = {
                "data 5-95% (recipe)": None,
                "data 1-99%": "q01",
                "normal +-4.23 (the paper's)": {"r_min": np.full(2, -4.2305), "r_max": np.full(2, 4.2305)},
            }
            for name, override in variants.items():
                if override == "q01":
                    z = z if z is not None else normalized_training_scores(folder, space)
                    override = {"r_min": np.quantile(z, 0.01, axis=0), "r_max": np.quantile(z, 0.99, axis=0)}
                tag = name.split()[0] + name.split()[1]
                path = folder / f"eval-range-{tag}-p{args.prompts}x{args.samples}.json"
                evaluation = cached(path, evaluate, ckpt, prompts, args.samples, seed, override)
                results["runs"].append({"variant": name, "seed": seed, "train_seconds": seconds, **evaluation})
                report(name, seed, s["steps"], evaluation)
        else:
            # from the offline run as far as it was trained, against the same run's evaluation at that step
            trained = json.loads((folder / "trained.json").read_text()).get("steps", s["steps"])
            offline = checkpoint_at(folder, trained, s["steps"])
            online = folder.parent / f"recipe+online-step{trained}-seed{seed}"
            extra = online_round(offline, online, s, seed, trained)
            for name, path, secs in (
                (f"offline (recipe, step {trained})", offline, seconds),
                ("+1 online round", online / "ckpt" / "last.ckpt", seconds + extra),
            ):
                name_of = f"eval-step{trained}-p{args.prompts}x{args.samples}.json"
                target = (folder if path == offline else online) / name_of
                evaluation = cached(target, evaluate, path, prompts, args.samples, seed)
                results["runs"].append({"variant": name, "seed": seed, "train_seconds": secs, **evaluation})
                report(name, seed, trained, evaluation)
    return results


def normalized_training_scores(folder: Path, space: Any) -> np.ndarray:
    dm = data_module(folder)
    train, _, _ = dm.split(dm.dataset.load())
    return space.normalize(dm.cache.scores(dm.rewards, train, progress=False))


def online_round(
    offline: Path,
    folder: Path,
    s: dict[str, Any],
    seed: int,
    offline_steps: int,
    generations: int = 256,
    steps: int = 60,
    callbacks: list[dict] = (),
    adjust: Callable[[dict], None] | None = None,
) -> float:
    """One online round with MORS continued from the ``offline`` checkpoint (saved at ``offline_steps``);
    ``callbacks`` run after it (a sweep), ``adjust`` as in :func:`train`."""
    done = folder / "trained.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    folder.mkdir(parents=True, exist_ok=True)
    online = {"class_path": "ric.online.OnlineLoop", "init_args": {
        "iterations": 1, "offline_steps": offline_steps, "steps_per_iteration": steps,
        "prompts_per_iteration": generations, "learning_rate": 2.0e-4, "chunk_size": 32,
        "buffer_dir": str(folder / "online"),
        "sampling": {"max_new_tokens": EVAL["max_new_tokens"], "batch_size": BATCH}}}  # fmt: skip
    config = train_config(folder, {**s, "steps": offline_steps}, seed, [offline_steps + steps], [online, *callbacks])
    if adjust is not None:
        adjust(config)
    (folder / "run.json").write_text(json.dumps(config))
    resume = folder / "ckpt" / "last.ckpt"
    start_from = resume if resume.exists() else offline
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ric.cli", "fit", "--config", str(folder / "run.json"), "--ckpt_path",
                    str(start_from)], check=True, cwd=ROOT)  # fmt: skip
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def cached(path: Path, compute: Any, *args: Any) -> dict:
    """``compute(*args)``, kept in ``path``: a finished evaluation is not run again."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute(*args)
    path.write_text(json.dumps(value, indent=2))
    return value


def report(name: str, seed: int, step: int, e: dict) -> None:
    m = e["steering"]
    print(f"{name:<28} seed {seed} step {step:>4}: " + ", ".join(
        f"{r} Spearman {v['spearman']:+.2f} spread {v['spread_ratio']:.2f}" for r, v in m.items()
    ) + f", hypervolume {e['hypervolume']:.3f}", flush=True)  # fmt: skip


def summarize(results: dict) -> dict:
    """Mean and sd over seeds, per variant (and step)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["variant"], r.get("step")), []).append(r)
    table = []
    for (variant, step), runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "step": step, "seeds": len(runs)}
        for reward in runs[0]["steering"]:
            for key in ("spearman", "spread_ratio"):
                vals = np.array([r["steering"][reward][key] for r in runs])
                row[f"{reward}_{key}_mean"] = float(vals.mean())
                row[f"{reward}_{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        hv = np.array([r["hypervolume"] for r in runs])
        row["hypervolume_mean"], row["hypervolume_sd"] = float(hv.mean()), float(hv.std(ddof=1)) if len(hv) > 1 else 0.0
        row["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in runs]))
        table.append(row)
    return {"table": table}


def plot(results: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["table"]
    rewards = list(results["runs"][0]["steering"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    curve = all(r["step"] is not None for r in rows) and len({r["variant"] for r in rows}) == 1
    labels = [str(r["step"]) if curve else r["variant"] for r in rows]
    x = [r["step"] for r in rows] if curve else np.arange(len(rows))
    for reward, marker in zip(rewards, "os"):
        for ax, key, title in (
            (axes[0], "spearman", "Spearman(obtained, weight)"),
            (axes[1], "spread_ratio", "spread ratio"),
        ):
            ax.errorbar(x, [r[f"{reward}_{key}_mean"] for r in rows], yerr=[r[f"{reward}_{key}_sd"] for r in rows],
                        marker=marker, capsize=3, label=reward)  # fmt: skip
            ax.set_title(title)
    axes[0].axhline(0.9, color="grey", ls="--", lw=1)
    axes[1].axhline(0.5, color="grey", ls="--", lw=1)
    for ax in axes[:2]:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("training steps" if curve else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # desired vs obtained for the last variant (seed-averaged)
    last = [r for r in results["runs"] if r["variant"] == rows[-1]["variant"] and r.get("step") == rows[-1]["step"]]
    desired, obtained = np.mean([r["desired"] for r in last], axis=0), np.mean([r["obtained"] for r in last], axis=0)
    for d, reward in enumerate(rewards):
        axes[2].plot(desired[:, d], obtained[:, d], "o-", label=reward)
    lo, hi = float(min(desired.min(), obtained.min())), float(max(desired.max(), obtained.max()))
    axes[2].plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="obtained = desired")
    axes[2].set_title(f"desired vs obtained: {labels[-1]}")
    axes[2].set_xlabel("desired (normalized)")
    axes[2].set_ylabel("obtained (normalized)")
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"steering on hh-rlhf, study '{results['study']}' ({results['prompts']} prompts x {results['samples']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="length", choices=[*STUDIES, "range", "online"])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "steering")
    parser.add_argument("--recipe-runs", default=None,
                        help="range/online: evaluate these finished recipe runs instead of training the recipe, "
                             "a folder with {seed} (e.g. runs/front_quality-cpu/seed{seed}/ric)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="wiring check: 4 steps, 4 prompts, short answers")
    args = parser.parse_args()
    if args.smoke:
        BASE.update(steps=4, warmup=1)
        for variants, _ in STUDIES.values():
            for overrides in variants.values():
                overrides.pop("steps", None)
        STUDIES["length"] = (STUDIES["length"][0], [2, 4])
        EVAL["max_new_tokens"] = 16
        args.prompts, args.out = 4, args.out.with_name(args.out.name + "-smoke")
    if not HH.is_file():
        raise FileNotFoundError(f"hh-rlhf data not found at {HH} (../shared/data beside the checkout)")
    results = run_study(args)
    summary = summarize(results)
    results["summary"] = summary
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"steering_{args.study}" + ("_smoke" if args.smoke else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=float))
    plot(results, summary, RESULTS / f"{name}.png")
    print(json.dumps(summary, indent=2))
    print(RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()

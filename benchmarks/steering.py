"""Steering on real data: what limits RiC's control of each reward on hh-rlhf, one factor at a time, and a
recipe that steers, measured over seeds on held-out prompts.

The recipe is ``configs/steer_hh_cpu.yaml`` trained for 400 steps (SmolLM2-135M-Instruct, hh-rlhf
harmless-base from ``../shared/data`` with both responses of every dialogue, the offline rewards verbosity and
readability); a study's variant is a set of dotted overrides of it. Every run trains through ``ric fit``
(checkpoints at the steps a study asks for) and is evaluated through the public API (``ric.load`` +
``policy.steer``) on the held-out prompts of its split: 5 preferences, ``--prompts`` prompts x ``--samples``
answers each, the same seed for every preference. Per reward: Spearman of the obtained mean against the
reward's weight, and the spread ratio (range of the obtained means over the range of the desired ones).

    .venv/bin/python -m benchmarks.steering --study length            # steering along training (one run)
    .venv/bin/python -m benchmarks.steering --study lr|format|responses|layers|lora|range|online
    .venv/bin/python -m benchmarks.steering --study control|alone|alone-long
    .venv/bin/python -m benchmarks.steering --study recipe --seeds 0,1,2 --prompts 64 --samples 2

Every finished training run and evaluation is kept under ``--out`` (default ``runs/steering``) and skipped
when the command is run again; results go to ``benchmarks/results/steering_<study>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment import (
    PREFERENCES,
    RESULTS,
    ROOT,
    build_data_module,
    cached,
    checkpoints,
    command,
    diagonal,
    fit,
    get,
    load_config,
    override,
    pyplot,
    rooted,
    run_dir,
    save_figure,
    saved_config,
    seeds,
    write_results,
)
from ric.text.policy import LLAMA_PROJECTIONS

#: the recipe is this shipped config (its settings are what the README reports) ...
RECIPE_CONFIG = "steer_hh_cpu"
#: ... trained twice as long as it ships: what the studies vary one at a time
RECIPE: dict[str, Any] = {"trainer.max_steps": 400}
#: the positive control's data, as the text quickstart ships it
QUICKSTART_CONFIG = "quickstart_text"
HH = (ROOT / get(load_config(RECIPE_CONFIG), "data.dataset.init_args.path")).resolve()
#: sampling of every evaluation: the paper's online settings, answers up to 128 tokens (shorter would cap verbosity)
EVAL: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128}
#: answers decoding at once on a continuous batch (faster than static batches of 8 on this CPU,
#: benchmarks/generation.py)
BATCH = 32
#: reward name -> its class in ``ric.text.rewards``
REWARDS = {"verbosity": "Verbosity", "readability": "Readability", "sentiment": "Sentiment", "relevance": "Relevance"}


def rewards(*names: str) -> dict[str, Any]:
    """Overrides training on the rewards ``names`` (the model's markers and the data's labels)."""
    return {"model.init_args.reward_names": list(names),
            "data.rewards": [{"class_path": f"ric.text.rewards.{REWARDS[n]}"} for n in names]}  # fmt: skip


def quickstart_data() -> dict[str, Any]:
    """Overrides training the recipe on the text quickstart's data: its data set, held-out share and longest
    response, with room for its prompt and response in a row."""
    quickstart = load_config(QUICKSTART_CONFIG)
    return {"data.dataset": get(quickstart, "data.dataset"),
            "data.test_fraction": get(quickstart, "data.test_fraction"),
            "model.init_args.max_tokens": get(quickstart, "model.init_args.max_tokens"),
            "model.init_args.max_length": 256}  # fmt: skip


#: the shipped config's own length, half the recipe's
SHORT = {"trainer.max_steps": 200}
#: a wiring check of any study (``--smoke``): 4 steps
SMOKE = {"trainer.max_steps": 4, "model.init_args.warmup_steps": 1}
#: study -> (variants: name -> overrides of the recipe, steps at which each variant is evaluated)
STUDIES: dict[str, tuple[dict[str, dict[str, Any]], list[int] | None]] = {
    "length": ({"recipe": {}}, [100, 200]),
    "lr": ({"lr=5e-4": {**SHORT, "model.init_args.learning_rate": 5.0e-4}, "lr=2e-3": SHORT,
            "lr=5e-3": {**SHORT, "model.init_args.learning_rate": 5.0e-3}}, None),
    "format": (
        {"1 decimal": SHORT, "integers": {**SHORT, "model.init_args.decimals": 0},
         "markers first": {**SHORT, "model.init_args.template": "{rewards} {prompt}\n\nAssistant:"}},
        None,
    ),
    "responses": ({"both (2 per prompt)": SHORT,
                   "chosen only (1 per prompt)": {**SHORT, "data.dataset.init_args.responses": "chosen"}}, None),
    "layers": ({"all 30 layers": SHORT,
                "top 10 layers": {**SHORT, "model.init_args.lora_layers": list(range(20, 30)),
                                  "model.init_args.lora_target_modules": list(LLAMA_PROJECTIONS)}}, None),
    # the adapter's capacity: the paper's rank (alpha = r throughout, so the update's scale is unchanged), and
    # the authors' script's target modules
    "lora": (
        {"r=16, all 7 projections (recipe)": SHORT,
         "r=64 (the paper's)": {**SHORT, "model.init_args.lora_r": 64, "model.init_args.lora_alpha": 64},
         "q_proj, v_proj only (the authors')": {**SHORT, "model.init_args.lora_target_modules": ["q_proj", "v_proj"]}},
        None,
    ),
    "control": ({"quickstart data": {**SHORT, **quickstart_data()}}, None),
    "recipe": ({"recipe": {}}, None),
    # is readability's marker ignored because verbosity's is easier to read, or on its own as well?
    "alone": ({"readability alone": {**SHORT, **rewards("readability")}}, None),
    # trained twice as long (the quickstart's data needs ~4x its 120 steps before the marker is read)
    "alone-long": ({"readability alone": rewards("readability")}, [200, 400]),
}  # fmt: skip


def studies(smoke: bool = False) -> dict[str, tuple[dict[str, dict[str, Any]], list[int] | None]]:
    """:data:`STUDIES`, or at the wiring check's scale (every variant 4 steps, the length study at 2 and 4)."""
    if not smoke:
        return STUDIES
    scaled = {study: ({name: {**o, **SMOKE} for name, o in variants.items()}, steps)
              for study, (variants, steps) in STUDIES.items()}  # fmt: skip
    scaled["length"] = (scaled["length"][0], [2, 4])
    return scaled


def recipe_config(
    folder: Path, overrides: dict[str, Any], seed: int, every: int | None = None, callbacks: list[dict] = ()
) -> dict[str, Any]:
    """The recipe with a variant's ``overrides``, run in ``folder``: a checkpoint every ``every`` steps (default:
    at the end), then ``callbacks`` (none: the shipped sweep is left out, the studies evaluate below;
    ``front_quality.py`` adds its own)."""
    config = load_config(RECIPE_CONFIG, {**RECIPE, **overrides})
    every = every or get(config, "trainer.max_steps")
    run = {"seed_everything": seed, "trainer.default_root_dir": str(folder), "trainer.enable_progress_bar": False,
           "trainer.callbacks": [checkpoints(folder, every), *callbacks], "data.output_dir": str(folder),
           "data.progress": False}  # fmt: skip
    return rooted(override(config, run))


def planned(study: str, out: Path, seed_list: list[int], smoke: bool = False) -> list[dict[str, Any]]:
    """Every training run of a study: variant, seed, folder, its config and the steps it is evaluated at."""
    variants, steps = studies(smoke)[study]
    runs = []
    for name, overrides in variants.items():
        for seed in seed_list:
            # the length study evaluates the recipe's own run along the way: one training run serves both
            folder = run_dir(out, "recipe" if study == "length" else study, name, seed)
            config = recipe_config(folder, overrides, seed, min(steps) if steps else None)
            at = steps or [get(config, "trainer.max_steps")]
            runs.append({"variant": name, "seed": seed, "folder": folder, "config": config, "at": at,
                         "overrides": overrides})  # fmt: skip
    return runs


def train(folder: Path, config: dict[str, Any]) -> float:
    """Train unless the run finished; returns the training seconds (recorded on the first run)."""
    return fit(folder, config, record={"steps": get(config, "trainer.max_steps")})


def data_module(folder: Path) -> Any:
    """The run's data module as its config builds it (no model is loaded)."""
    return build_data_module(saved_config(folder)["data"])


def held_out_prompts(folder: Path, n: int) -> list[str]:
    """The held-out prompts of the run's split (the same for every run on the same data)."""
    dm = data_module(folder)
    return dm.split(dm.dataset.load())[2][:n]


def evaluate(ckpt: Path, prompts: list[str], samples: int, seed: int, space_override: dict | None = None) -> dict:
    """Steer the checkpoint at the 5 preferences and measure how each reward follows its weight."""
    import ric
    from ric.pareto import hypervolume
    from ric.report import steering_measures
    from ric.rewards import score_all

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
    seed_list = seeds(args.seeds)
    results: dict[str, Any] = {"study": args.study, "config": f"configs/{RECIPE_CONFIG}.yaml",
                               "base": {**RECIPE, **(SMOKE if args.smoke else {})}, "prompts": args.prompts,
                               "samples": args.samples, "seeds": seed_list, "runs": []}  # fmt: skip
    if args.study in ("range", "online"):
        return derived_study(args, results, seed_list)
    for run in planned(args.study, args.out, seed_list, args.smoke):
        name, seed, folder, config = run["variant"], run["seed"], run["folder"], run["config"]
        seconds = train(folder, config)
        prompts = held_out_prompts(folder, args.prompts)
        for step in run["at"]:
            path = folder / f"eval-step{step}-p{args.prompts}x{args.samples}.json"
            ckpt = checkpoint_at(folder, step, get(config, "trainer.max_steps"))
            evaluation = cached(path, evaluate, ckpt, prompts, args.samples, seed)
            results["runs"].append({"variant": name, "seed": seed, "step": step, "train_seconds": seconds,
                                    "overrides": run["overrides"], **evaluation})  # fmt: skip
            report(name, seed, step, evaluation)
    return results


def derived_study(args: argparse.Namespace, results: dict, seed_list: list[int]) -> dict:
    """Studies on the recipe's trained model: the reward range used for the desired values (evaluation only),
    and one online round with MORS (training continued from the recipe's final checkpoint)."""
    overrides = dict(results["base"])
    steps = overrides["trainer.max_steps"]
    for seed in seed_list:
        folder = run_dir(args.out, "recipe", "recipe", seed)
        if args.recipe_runs:  # another benchmark's runs of the recipe (front_quality's RiC arm), as trained there
            folder = Path(args.recipe_runs.format(seed=seed))
            if not (folder / "trained.json").is_file():
                raise FileNotFoundError(f"--recipe-runs: no finished training run at {folder} (no trained.json)")
            steps = overrides["trainer.max_steps"] = json.loads((folder / "trained.json").read_text())["steps"]
            results["base"], results["recipe_runs"] = dict(overrides), args.recipe_runs
        seconds = train(folder, recipe_config(folder, overrides, seed))
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
                report(name, seed, steps, evaluation)
        else:
            # from the offline run as far as it was trained, against the same run's evaluation at that step
            trained = json.loads((folder / "trained.json").read_text()).get("steps", steps)
            offline = checkpoint_at(folder, trained, steps)
            online = folder.parent / f"recipe+online-step{trained}-seed{seed}"
            extra = online_round(offline, online, overrides, seed, trained)
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
    overrides: dict[str, Any],
    seed: int,
    offline_steps: int,
    generations: int = 256,
    steps: int = 60,
    callbacks: list[dict] = (),
) -> float:
    """One online round with MORS continued from the ``offline`` checkpoint (saved at ``offline_steps``) of the
    recipe with ``overrides``; ``callbacks`` run after it (a sweep)."""
    online = {"class_path": "ric.online.OnlineLoop", "init_args": {
        "iterations": 1, "offline_steps": offline_steps, "steps_per_iteration": steps,
        "prompts_per_iteration": generations, "learning_rate": 2.0e-4, "chunk_size": 32,
        "buffer_dir": str(folder / "online"),
        "sampling": {"max_new_tokens": EVAL["max_new_tokens"], "batch_size": BATCH}}}  # fmt: skip
    config = recipe_config(folder, {**overrides, "trainer.max_steps": offline_steps}, seed, offline_steps + steps,
                           [online, *callbacks])  # fmt: skip
    return fit(folder, config, ckpt_path=offline)


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
    plt = pyplot()
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
    diagonal(axes[2], float(min(desired.min(), obtained.min())), float(max(desired.max(), obtained.max())))
    axes[2].set_title(f"desired vs obtained: {labels[-1]}")
    axes[2].set_xlabel("desired (normalized)")
    axes[2].set_ylabel("obtained (normalized)")
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"steering on hh-rlhf, study '{results['study']}' ({results['prompts']} prompts x {results['samples']})"
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    if args.smoke:
        EVAL["max_new_tokens"] = 16
        args.prompts, args.out = 4, args.out.with_name(args.out.name + "-smoke")
    if not HH.is_file():
        raise FileNotFoundError(f"hh-rlhf data not found at {HH} (../shared/data beside the checkout)")
    results = run_study(args)
    summary = summarize(results)
    results["summary"] = summary
    results["command"] = command()
    name = f"steering_{args.study}" + ("_smoke" if args.smoke else "")
    write_results(name, results)
    plot(results, summary, RESULTS / f"{name}.png")
    print(json.dumps(summary, indent=2))
    print(RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()

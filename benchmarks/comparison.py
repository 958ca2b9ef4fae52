"""The comparison at equal compute: RiC's front after each online round against MORLHF's and Rewarded Soups'
fronts at growing RL budgets, on two tasks, under rules fixed before any run (``benchmarks/README.md``).

Every arm composes a shipped config (``configs/steer_hh_cpu.yaml``, ``configs/steer_tldr_cpu.yaml``) with the
overrides below and runs through the library's own commands (``ric fit``, ``ric test``, ``ric baseline``):

- RiC: the offline stage, then K online rounds with MORS in one run, a checkpoint at the end of each; every
  checkpoint is swept with the p = inf mapping (chosen in advance: the paper's), the linear one, and p = inf
  with reward guidance.
- MORLHF (one GRPO policy per preference) and Rewarded Soups (one GRPO expert per reward), started from the
  plain SFT model as in the paper, swept at 4 budgets of GRPO steps from the checkpoints of one run.

Each point is a sweep of the same held-out prompts with the same sampling, with its cost: training seconds,
generations and reward calls (the training's, and the training's plus the sweep's).

    .venv/bin/python -m benchmarks.comparison --task hh --seeds 0            # one seed; resumable in parts
    .venv/bin/python -m benchmarks.comparison --task hh --seeds 0 --arms ric
    .venv/bin/python -m benchmarks.comparison --task tldr --seeds 0
    .venv/bin/python -m benchmarks.comparison --task hh --report             # table and plots of what is done

Finished runs and sweeps are kept under ``runs/comparison/<task>/seed<N>`` and not rerun; every finished
point is also recorded in ``benchmarks/results/comparison_<task>.json``, so a fresh checkout adds to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment import (
    PREFERENCES,
    RESULTS,
    ROOT,
    build_data_module,
    checkpoints,
    command,
    export_once,
    fit,
    flatten,
    get,
    load_config,
    override,
    pyplot,
    rooted,
    save_figure,
    sweep_callback,
    write_config,
    write_results,
)

#: the paper's Table 3 settings each arm's are derived from
PAPER = {"offline_lr": 1.41e-4, "online_lr": 1.0e-5, "rl_lr": 1.0e-5, "rl_kl": 0.2}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the comparison: its shipped config and the sizes of every arm.

    Args:
        config: the shipped config RiC and SFT compose (the baselines take its policy, data and space).
        rounds: RiC's online rounds K (a checkpoint and a sweep after each, and before the first).
        online_steps, online_generations: training steps and generations of each round.
        rl_steps: GRPO steps per policy, per method; swept at ``budgets`` evenly spaced checkpoints.
        prompts, samples: held-out prompts and answers per prompt and preference of every sweep.
        seeds: the seeds planned (``--seeds`` runs some of them).
        guidance: reward guidance's strength and reference for the guided RiC sweep.
        overrides: the task's own settings of its config (token limits that keep the data's long answers).
    """

    config: str
    rounds: int
    online_steps: int
    online_generations: int
    rl_steps: dict[str, int]
    prompts: int
    samples: int
    seeds: tuple[int, ...]
    budgets: int = 4
    guidance: tuple[float, str] = (1.0, "neutral")
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, steps in self.rl_steps.items():
            if steps % self.budgets:
                raise ValueError(f"{name}: {steps} GRPO steps do not split into {self.budgets} equal budgets")


TASKS = {
    "hh": Task(
        config="steer_hh_cpu",
        rounds=4,
        online_steps=60,
        online_generations=256,
        rl_steps={"morlhf": 16, "soups": 24},
        prompts=32,
        samples=1,
        seeds=(0, 1, 2),
        # the recipe's 192 tokens keep 63% of the training examples and drop the longest answers (verbosity's
        # 95th percentile falls from about 101 words to 64); 384 keep 92%, and room for 128 new tokens after
        # 87% of the prompts
        overrides={"model.init_args.max_tokens": 384, "model.init_args.max_length": 384},
    ),
    "tldr": Task(
        config="steer_tldr_cpu",
        rounds=2,
        online_steps=60,
        online_generations=256,
        rl_steps={"morlhf": 16, "soups": 24},
        prompts=48,
        samples=1,
        seeds=(0, 1),
    ),
    "smoke": Task(
        config="steer_hh_cpu",
        rounds=2,
        online_steps=2,
        online_generations=8,
        rl_steps={"morlhf": 2, "soups": 2},
        prompts=3,
        samples=1,
        seeds=(0,),
        budgets=2,
    ),
}

#: the split into training, validation and held-out prompts, the same for every arm and seed: a seed no study
#: read results on, so no setting of any arm was chosen on these held-out prompts
SPLIT_SEED = 2026
#: validation prompts (from the training side of the split): where a setting may be chosen
VAL_FRACTION = 0.04
#: the reference point: this quantile of each reward over the training split's responses (normalized); the
#: clipped hypervolume clips every obtained mean to [REFERENCE_QUANTILE, CLIP_QUANTILE] of the same
REFERENCE_QUANTILE, CLIP_QUANTILE = 0.01, 0.99
#: sampling of every generation of every arm (online rounds, GRPO, sweeps): the paper's online settings
SAMPLING = {"temperature": 0.7, "top_p": 0.9}
#: the ranges online targets and sweeps may ask within: the paper's (+-4.23 normalized, past the data), and the
#: training data's 5-95% quantiles (what the recipe ships); one is chosen on validation prompts after the offline
#: stage of the first seed, before any online round, and kept for every seed
RANGES = {
    "normal": {"data.reward_range": "normal"},
    "data 5-95%": {"data.reward_range": "data", "data.range_quantiles": [0.05, 0.95]},
}
#: the training runs' progress bar: refreshed every few steps, so a log file gets a line per refresh, not per step
PROGRESS = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 10}}
#: where the run folder keeps that choice, so a later part never measures it again
RANGE_CHOICE = "range_choice.json"
MAPPINGS = ("p_inf", "linear")
GUIDED = "p_inf+guidance"
BASELINES = ("morlhf", "soups")
ARMS = ("ric", "morlhf", "soups")
LABELS = {
    "p_inf": "RiC (p = inf)",
    "linear": "RiC (linear)",
    GUIDED: "RiC (p = inf, guidance 1)",
    "morlhf": "MORLHF",
    "soups": "Rewarded Soups",
}


def lr_factor(config: dict) -> float:
    """The one scaling rule of every learning rate: the recipe's offline rate over the paper's (the recipe's
    shorter training with a smaller adapter needs larger steps; every arm's rate scales by the same factor)."""
    return get(config, "model.init_args.learning_rate") / PAPER["offline_lr"]


def new_tokens(config: dict) -> int:
    return int(get(config, "model.init_args.max_new_tokens"))


def base_config(task: Task, smoke: bool = False) -> dict:
    """The task's shipped config with the comparison's rules: the fixed split, its validation share and the
    reward range (the recipe's own steps and learning rate stay)."""
    overrides = {
        **task.overrides,
        "data.seed": SPLIT_SEED,
        "data.val_fraction": VAL_FRACTION,
        "data.max_test_prompts": task.prompts,
        "data.method": MAPPINGS[0],
        "trainer.limit_val_batches": 0,
    }
    if smoke:
        overrides.update(
            {"trainer.max_steps": 4, "model.init_args.warmup_steps": 1, "model.init_args.max_new_tokens": 8}
        )
    return load_config(task.config, overrides)


def run_config(base: dict, folder: Path, seed: int, overrides: dict, callbacks: list[dict] = ()) -> dict:
    """``base`` with an arm's overrides, run in ``folder``: everything seeded takes ``seed`` but the split."""
    run = {
        "seed_everything": seed,
        "data.shuffle_seed": seed,
        "trainer.default_root_dir": str(folder),
        "data.output_dir": str(folder),
        "data.progress": False,
        # the training's cost in every checkpoint: what reaching each point of a curve took; and a step count
        # in the log every few steps (PROGRESS), so a half-hour fit is not silent
        "trainer.callbacks": [*callbacks, {"class_path": "ric.cost.TrainingCost"}, PROGRESS],
    }
    return rooted(override(base, {**overrides, **run}))


def sweep(dest: Path, task: Task, base: dict, seed: int, method: str, extra: dict | None = None) -> dict:
    """The sweep every point gets: the rules' sampling, ``task.samples`` answers per prompt, mapping ``method``."""
    sampling = {**SAMPLING, "max_new_tokens": new_tokens(base), "batch_size": 32, **(extra or {})}
    return sweep_callback(dest, seed, task.samples, sampling, marker_responses=0, method=method)


def run_cli(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "ric.cli", *args], check=True, cwd=ROOT)


def ric_runs(out: Path, task: Task, base: dict, seed: int) -> dict[str, Path]:
    """RiC: the offline stage, then K online rounds in one resumable run; returns point -> sweep folder.
    ``base`` holds the chosen reward range (:func:`choose_range`)."""
    steps = int(get(base, "trainer.max_steps"))
    offline = out / "ric"
    offline_stage(out, base, seed)
    online = out / "ric-online"
    loop = {
        "class_path": "ric.online.OnlineLoop",
        "init_args": {
            "iterations": task.rounds,
            "offline_steps": steps,
            "steps_per_iteration": task.online_steps,
            "prompts_per_iteration": task.online_generations,
            "learning_rate": PAPER["online_lr"] * lr_factor(base),
            "chunk_size": 32,
            "buffer_dir": str(online / "online"),
            "seed": seed,
            "sampling": {**SAMPLING, "max_new_tokens": new_tokens(base), "batch_size": 32},
        },
    }
    # a checkpoint at the end of every round: every step that divides both stages' lengths
    every = int(np.gcd(steps, task.online_steps))
    config = run_config(base, online, seed, {}, [checkpoints(online, every), loop])
    if task.rounds:
        fit(online, config, ckpt_path=offline / "ckpt" / "last.ckpt")
    points = {}
    guidance, reference = task.guidance
    offline_cut = left_out_cut(offline / "ckpt" / "last.ckpt")
    for k in range(task.rounds + 1):
        ckpt = (
            offline / "ckpt" / "last.ckpt" if k == 0 else online / "ckpt" / f"step{steps + k * task.online_steps}.ckpt"
        )
        for name, method, extra in (
            *((m, m, None) for m in MAPPINGS),
            (GUIDED, "p_inf", {"guidance": guidance, "guidance_reference": reference}),
        ):
            dest = out / "sweeps" / f"{name}-k{k}"
            if not (dest / "metrics.json").is_file():
                cfg = run_config(base, dest, seed, {}, [sweep(dest, task, base, seed, method, extra)])
                run_cli(["test", "--config", str(write_config(dest / "test.yaml", cfg)), "--ckpt_path", str(ckpt)])
            if not (dest / "point.json").is_file():
                info = {"arm": "ric", "curve": name, "k": k, "ckpt": str(ckpt), "ledger": checkpoint_ledger(ckpt),
                        "offline_left_out_cut": offline_cut}  # fmt: skip
                write_point(dest, {**info, **ric_generations(online, k), "scored": scored(offline)})
            points[f"{name}-k{k}"] = dest
    return points


def offline_stage(out: Path, base: dict, seed: int) -> Path:
    """RiC's offline stage (its length is the recipe's); returns its final checkpoint."""
    steps = int(get(base, "trainer.max_steps"))
    folder = out / "ric"
    fit(folder, run_config(base, folder, seed, {}, [checkpoints(folder, steps)]))
    return folder / "ckpt" / "last.ckpt"


def choose_range(out: Path, task: Task, base: dict, seed: int, ref: dict, z: np.ndarray) -> dict:
    """The reward range of the online targets and the sweeps, chosen once on validation prompts (the training
    side of the split): the offline checkpoint swept at p = inf within each of :data:`RANGES`; the larger
    hypervolume from the fixed reference point wins. ``z``: the training scores in the reward space's units
    (:func:`normalized_train_scores`), which a data-quantile range is read from. Kept in ``out/`` as
    :data:`RANGE_CHOICE`, which :func:`main` reads instead of calling this again."""
    from benchmarks import steering
    from ric.mapping import RewardRange
    from ric.pareto import hypervolume

    ckpt = offline_stage(out / f"seed{seed}", base, seed)
    dm = build_data_module(rooted(base)["data"])
    val = list(dict.fromkeys(json.dumps(r["prompt"]) for r in dm.split(dm.dataset.load())[1]))[: task.prompts]
    steering.EVAL["max_new_tokens"] = new_tokens(base)
    measured = {}
    for name, overrides in RANGES.items():
        bounds = RewardRange(overrides["data.reward_range"], tuple(overrides.get("data.range_quantiles", (0, 1))))
        lo, hi = bounds.bounds(z.shape[1], z)
        e = steering.evaluate(
            ckpt, [json.loads(p) for p in val], task.samples, seed, {"method": "p_inf", "r_min": lo, "r_max": hi}
        )
        measured[name] = {
            "hypervolume": hypervolume(np.array(e["obtained"]), np.array(ref["reference_point"])),
            "steering": e["steering"],
            "obtained": e["obtained"],
            "desired": e["desired"],
        }
    chosen = max(measured, key=lambda n: measured[n]["hypervolume"])
    choice = {"chosen": chosen, "seed": seed, "validation_prompts": len(val), "measured": measured}
    (out / RANGE_CHOICE).write_text(json.dumps(choice, indent=2, default=float))
    return choice


def checkpoint_entry(ckpt: Path, key: str) -> dict:
    """One top-level entry of a checkpoint (memory-mapped: the weights are not read)."""
    import torch

    return dict(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get(key, {}))


def checkpoint_ledger(ckpt: Path) -> dict:
    """The training's cost a checkpoint carries (seconds, steps, tokens): what reaching it cost."""
    from ric.cost import LEDGER_KEY

    return checkpoint_entry(ckpt, LEDGER_KEY)


def left_out_cut(ckpt: Path) -> int | None:
    """The examples the training set of a checkpoint left out as longer than a row (``None``: not recorded)."""
    from ric.data import RelabelDataModule

    return checkpoint_entry(ckpt, RelabelDataModule.__qualname__).get("cut_examples", {}).get("train")


def write_point(dest: Path, info: dict) -> None:
    """What a swept point cost and where it sits on its curve, written whole or not at all."""
    tmp = dest / "point.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(dest / "point.json")


def scored(folder: Path) -> int:
    """Training examples a run scored with every reward before training: RiC relabels them, the baselines
    normalize their rewards with their statistics (``fitted_on`` of the run's reward space)."""
    return int(json.loads((folder / "reward_space.json").read_text())["fitted_on"]["num_samples"])


def ric_generations(online: Path, k: int) -> dict:
    """Generations of RiC's training up to round k (its online rounds'), and the examples left out of each
    round's training for being longer than a training row."""
    made = sum(
        json.loads((online / "online" / f"round{i}" / "summary.json").read_text())["generated"] for i in range(k)
    )
    cut = [
        json.loads((online / "online" / f"round{i}" / "summary.json").read_text()).get("left_out_cut", 0)
        for i in range(k)
    ]
    return {"generated": made, "left_out_cut": cut}


def sft_model(out: Path, base: dict, seed: int) -> tuple[Path, dict]:
    """The plain SFT model the baselines start from (the same fine-tuning without markers), exported once;
    returns it with the ledger of its training."""
    folder = out / "sft"
    steps = int(get(base, "trainer.max_steps"))
    fit(folder, run_config(base, folder, seed, {"model.init_args.conditioned": False}, [checkpoints(folder, steps)]))
    export = export_once(folder / "ckpt" / "last.ckpt", folder / "merged")
    return export, checkpoint_ledger(folder / "ckpt" / "last.ckpt")


def baseline_runs(name: str, out: Path, task: Task, base: dict, seed: int) -> dict[str, Path]:
    """MORLHF or Rewarded Soups from the SFT model with RiC's policy settings, split, rewards and reward space,
    at ``task.budgets`` checkpoints of one GRPO run per policy; returns point -> sweep folder."""
    start, sft_ledger = sft_model(out, base, seed)
    steps = task.rl_steps[name]
    every = steps // task.budgets
    folder = out / name
    cfg = run_config(base, folder, seed, {})
    policy = {k: v for k, v in cfg["model"]["init_args"].items() if k not in ("reward_names", "conditioned")}
    policy["model"] = str(start)
    grpo = {
        "steps": steps,
        "learning_rate": PAPER["rl_lr"] * lr_factor(base),
        "beta": PAPER["rl_kl"],
        "max_new_tokens": new_tokens(base),
        **SAMPLING,
        "save_steps": every,
        "seed": seed,
    }
    points = {}
    for b in range(every, steps + 1, every):
        dest = out / "sweeps" / f"{name}-step{b}"
        if not (dest / "metrics.json").is_file():
            evaluation = sweep(out / "sweeps" / name, task, base, seed, MAPPINGS[0])
            spec = {
                "policy": policy,
                "data": {"class_path": "ric.data.RelabelDataModule", "init_args": cfg["data"]},
                "grpo": grpo,
                "sweep": evaluation,
                "output_dir": str(folder),
                "max_train_prompts": None,
                "at_step": b,
                **({"preferences": PREFERENCES} if name == "morlhf" else {}),
            }
            path = folder / f"baseline-step{b}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(spec))
            run_cli(["baseline", name, "--config", str(path)])
        if not (dest / "point.json").is_file():
            info = {"arm": name, "curve": name, "step": b, "sft_ledger": sft_ledger, "scored": scored(folder)}
            write_point(dest, info)
        points[f"{name}-step{b}"] = dest
    return points


# ---- measuring ----------------------------------------------------------------------------------------
def train_scores(base: dict) -> np.ndarray:
    """Every reward of each training example the policy accepts (within its token budget), from the score
    cache the runs fill: what every arm's reward space is fitted on."""
    import importlib

    config = rooted(base)
    module, _, name = config["model"]["class_path"].rpartition(".")
    policy = getattr(importlib.import_module(module), name)(**config["model"]["init_args"])
    dm = build_data_module(config["data"])
    train = [r for r in dm.split(dm.dataset.load())[0] if policy.accepts(r["prompt"], r["response"])]
    return dm.cache.scores(dm.rewards, train)


def normalized_train_scores(base: dict) -> np.ndarray:
    """:func:`train_scores` in the reward space's units (normalized by their own mean and sd, as the space is)."""
    raw = train_scores(base)
    return (raw - raw.mean(axis=0)) / raw.std(axis=0)


def reference(z: np.ndarray) -> dict[str, Any]:
    """The fixed reference point and clipping range, before any run: quantiles of each reward over the
    training examples ``z``, in the reward space's units (:func:`normalized_train_scores`)."""
    return {
        "reference_point": np.quantile(z, REFERENCE_QUANTILE, axis=0).tolist(),
        "clip_high": np.quantile(z, CLIP_QUANTILE, axis=0).tolist(),
        "responses": len(z),
    }


def point_record(folder: Path, names: list[str]) -> dict:
    """One swept point: its obtained means, steering measures and cost (training, and with the sweep)."""
    from ric.compare import read_front

    _, prefs, means = read_front(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    info = json.loads((folder / "point.json").read_text())
    sweep = metrics.get("cost", {})
    n = len(names)
    if info["arm"] == "ric":
        ledger = info["ledger"]
        train = {
            "seconds": ledger.get("train_seconds", 0.0),
            "generations": info["generated"],
            "reward_calls": n * (info["generated"] + info["scored"]),
            "steps": ledger.get("training_steps"),
        }
    else:
        sft = info["sft_ledger"]
        train = {
            "seconds": sweep["train_seconds"] + sft.get("train_seconds", 0.0),
            "generations": sweep["generated_samples_training"],
            "reward_calls": sweep["reward_calls_training"] + n * info["scored"],
            "steps": info["step"],
        }
    evaluation = {
        "seconds": sweep.get("sweep_seconds", 0.0),
        "generations": sweep.get("generated_samples_sweep", 0),
        "reward_calls": sweep.get("reward_calls_sweep", 0),
    }
    return {
        **{k: v for k, v in info.items() if k not in ("ledger", "sft_ledger", "ckpt")},
        "preferences": prefs.tolist(),
        "obtained": means.tolist(),
        "steering": metrics.get("steering", {}),
        "train": train,
        "with_evaluation": {k: train[k] + evaluation[k] for k in evaluation},
    }


def hypervolumes(obtained: list, ref: dict) -> tuple[float, float]:
    """Raw hypervolume, and with each reward clipped to the common range, from the fixed reference point."""
    from ric.pareto import hypervolume

    points, lo = np.array(obtained), np.array(ref["reference_point"])
    return hypervolume(points, lo), hypervolume(np.minimum(points, np.array(ref["clip_high"])), lo)


def summarize(records: dict[str, dict[str, dict]], ref: dict, names: list[str]) -> dict[str, dict]:
    """curve -> position (k or step) -> mean and sd over seeds of hypervolume (raw, clipped), Spearman and
    spread per reward, and cost."""
    curves: dict[str, dict[int, list[dict]]] = {}
    for seed_points in records.values():
        for point in seed_points.values():
            at = point["k"] if point["arm"] == "ric" else point["step"]
            hv, clipped = hypervolumes(point["obtained"], ref)
            curves.setdefault(point["curve"], {}).setdefault(at, []).append({**point, "hv": hv, "hv_clipped": clipped})
    out: dict[str, dict] = {}
    for curve, positions in curves.items():
        out[curve] = {}
        for at, runs in sorted(positions.items()):
            row: dict[str, Any] = {
                "seeds": len(runs),
                "obtained_mean": np.mean([r["obtained"] for r in runs], 0).tolist(),
                "preferences": runs[0]["preferences"],
            }
            for key in ("hv", "hv_clipped"):
                row[key], row[f"{key}_sd"] = mean_sd([r[key] for r in runs])
            for cost in ("train", "with_evaluation"):
                for field in ("seconds", "generations", "reward_calls"):
                    row[f"{cost}_{field}"] = float(np.mean([r[cost][field] for r in runs]))
            for name in names:
                for measure in ("spearman", "spread_ratio"):
                    values = [r["steering"][name][measure] for r in runs if name in r["steering"]]
                    if values:
                        row[f"{name}_{measure}"], row[f"{name}_{measure}_sd"] = mean_sd(values)
            out[curve][str(at)] = row
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def best_within(curve: dict[str, dict], seconds: float, key: str = "hv") -> dict | None:
    """A curve's best point reached within ``seconds`` of training (a method can stop at any of its
    checkpoints), ``None`` before its first."""
    reached = [row for row in curve.values() if row["train_seconds"] <= seconds * 1.0001]
    return max(reached, key=lambda row: row[key]) if reached else None


def interpolate(curve: dict[str, dict], seconds: float, key: str = "hv") -> float | None:
    """A curve's hypervolume at ``seconds`` of training: its best point's within them (:func:`best_within`)."""
    row = best_within(curve, seconds, key)
    return None if row is None else row[key]


def goals(summary: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """The issue's goals, decided on the seed means (``met`` None where a curve was not run, or where the
    budgets run cannot decide it)."""
    first = "RiC's hypervolume >= MORLHF's and Soups' at RiC's training seconds, Spearman >= 0.9"
    third = "MORLHF and Soups need >= 3x RiC's training seconds to reach RiC's best front"
    out: dict[str, dict] = {first: {"met": None}}
    ric = summary.get(MAPPINGS[0])
    if ric and len(ric) > 1:
        hv = [ric[k]["hv"] for k in sorted(ric, key=int)]
        out["RiC's hypervolume rises with each online round"] = {
            "met": all(b > a for a, b in zip(hv, hv[1:])),
            "hypervolume": hv,
        }
    if not ric or not all(b in summary for b in BASELINES):
        return {**out, third: {"met": None}}
    last = ric[max(ric, key=int)]
    at = last["train_seconds"]
    # a method with no point within RiC's seconds had no front yet: RiC's is the better one there
    values = {c: interpolate(summary[c], at) for c in (MAPPINGS[0], *BASELINES)}
    spearman = {n: last.get(f"{n}_spearman") for n in names}
    out[first] = {
        "met": values[MAPPINGS[0]] >= max(values[b] or 0.0 for b in BASELINES)
        and all(s is not None and s >= 0.9 for s in spearman.values()),
        "seconds": at,
        "hypervolume": values,
        "spearman": spearman,
    }
    best = max(row["hv"] for row in ric.values())
    cost = min(row["train_seconds"] for row in ric.values() if row["hv"] >= best)
    ratios, largest, verdicts = {}, {}, []
    for b in BASELINES:
        reach = [row["train_seconds"] for row in summary[b].values() if row["hv"] >= best]
        largest[b] = max(row["train_seconds"] for row in summary[b].values()) / cost
        ratios[b] = min(reach) / cost if reach else None
        # never reached within its budgets: at least its largest budget's ratio, which decides only above 3
        verdicts.append(ratios[b] >= 3 if ratios[b] is not None else (True if largest[b] >= 3 else None))
    out[third] = {
        "met": None if None in verdicts else all(verdicts),
        "ratio_to_reach_ric_best": ratios,
        "ratio_of_largest_budget": largest,
        "ric_best": best,
        "ric_seconds": cost,
    }
    return out


def complete_seeds(records: dict[str, dict[str, dict]]) -> list[str]:
    """The seeds that have every point any seed has: goals compare positions over the same seeds."""
    every = set().union(*(points.keys() for points in records.values())) if records else set()
    return [seed for seed, points in records.items() if set(points) == every]


# ---- output -------------------------------------------------------------------------------------------
def plot(summary: dict, names: list[str], ref: dict, stem: Path) -> list[Path]:
    """Hypervolume against training seconds, generations and reward calls; the fronts at a matched budget (RiC's
    final training seconds) and at each method's largest."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for ax, field, label in zip(
        axes,
        ("seconds", "generations", "reward_calls"),
        ("training seconds", "generations in training", "reward calls in training"),
    ):
        for curve, rows in summary.items():
            xs = [row[f"train_{field}"] for row in rows.values()]
            ys = [row["hv"] for row in rows.values()]
            sds = [row["hv_sd"] for row in rows.values()]
            ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=LABELS.get(curve, curve))
        ax.set_xlabel(label)
        ax.set_ylabel("hypervolume (fixed reference)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("hypervolume against training cost, mean ± sd over seeds")
    paths = [save_figure(fig, stem.with_name(stem.name + "_cost.png"))]
    ric = summary.get(MAPPINGS[0])
    matched = ric[max(ric, key=int)]["train_seconds"] if ric else None
    panels = [("at each method's largest budget", lambda rows: rows[max(rows, key=int)])]
    if matched is not None:  # the matched budget: RiC's final training seconds, each method's best point within
        panels.insert(0, (f"within RiC's {matched:.0f} training seconds", lambda rows: best_within(rows, matched)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (title, pick) in zip(axes[0], panels):
        for curve, rows in summary.items():
            row = pick(rows)
            if row is None:  # no point within the budget: no front there
                continue
            pts = np.array(row["obtained_mean"])
            ax.plot(pts[:, 0], pts[:, 1], marker="o", label=f"{LABELS.get(curve, curve)}, {row['train_seconds']:.0f} s")
        ax.scatter(*ref["reference_point"], marker="x", color="k", label="reference point")
        ax.set_xlabel(f"{names[0]} (normalized)")
        ax.set_ylabel(f"{names[1]} (normalized)")
        ax.set_title(f"fronts {title} (seed means)")
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, stem.with_suffix(".png")))
    return paths


def print_table(summary: dict, names: list[str]) -> None:
    head = f"{'curve':<28}{'at':>6}{'seeds':>6}{'hypervolume':>18}{'clipped':>18}{'train s':>9}{'gens':>7}{'calls':>8}"
    print("\n" + head + "".join(f"{'rho ' + n[:10]:>16}" for n in names))
    for curve, rows in summary.items():
        for at, row in rows.items():
            rho = "".join(f"{row.get(f'{n}_spearman', float('nan')):>+16.2f}" for n in names)
            print(
                f"{LABELS.get(curve, curve):<28}{at:>6}{row['seeds']:>6}{row['hv']:>11.3f} ± {row['hv_sd']:.3f}"
                f"{row['hv_clipped']:>11.3f} ± {row['hv_clipped_sd']:.3f}{row['train_seconds']:>9.0f}"
                f"{row['train_generations']:>7.0f}{row['train_reward_calls']:>8.0f}" + rho
            )


def rules(task: Task, base: dict) -> dict:
    """The rules this task's runs follow, recorded with the results."""
    return {
        "config": f"configs/{task.config}.yaml",
        "task": dataclasses.asdict(task),
        "split_seed": SPLIT_SEED,
        "val_fraction": VAL_FRACTION,
        "sampling": {**SAMPLING, "max_new_tokens": new_tokens(base)},
        "max_tokens": get(base, "model.init_args.max_tokens"),
        "max_length": get(base, "model.init_args.max_length"),
        "reward_ranges": RANGES,
        "lr_factor": lr_factor(base),
        "paper": PAPER,
        "learning_rates": {
            "ric_offline": get(base, "model.init_args.learning_rate"),
            "ric_online": PAPER["online_lr"] * lr_factor(base),
            "grpo": PAPER["rl_lr"] * lr_factor(base),
        },
        "grpo_kl": PAPER["rl_kl"],
        "reference_quantile": REFERENCE_QUANTILE,
        "clip_quantile": CLIP_QUANTILE,
        "recipe": {
            k: v for k, v in flatten(base).items() if not k.startswith(("trainer.callbacks", "data.output_dir"))
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="hh")
    parser.add_argument("--seeds", help="comma-separated (default: the task's)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--out", type=Path, help="default runs/comparison/<task>")
    parser.add_argument("--report", action="store_true", help="only summarize what is recorded and done")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm(s) {unknown} in --arms; choose from {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(task.seeds)
    out = (args.out or ROOT / "runs" / "comparison" / args.task).resolve()
    base = base_config(task, smoke=args.task == "smoke")
    results_path = RESULTS / f"comparison_{args.task}.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    now = rules(task, base)
    if previous and previous.get("rules") != json.loads(json.dumps(now)):
        changed = sorted(k for k in flatten(now) if flatten(previous.get("rules", {})).get(k) != flatten(now)[k])
        raise SystemExit(f"{results_path.name} was measured under other rules ({changed}); move it aside first")
    # the runs' folder holds the rules it was run under: finished runs of other rules are never reused
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "rules.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != json.loads(json.dumps(now)):
        raise SystemExit(f"{out} holds runs made under other rules ({recorded}); choose another --out")
    recorded.write_text(json.dumps(now, indent=2, default=float))
    kept = out / RANGE_CHOICE
    choice = previous.get("range_choice") or (json.loads(kept.read_text()) if kept.is_file() else None)
    # the training scores are read once, and only where the reference point or the range is still to be fixed
    z = None if previous.get("reference") and (choice or args.report) else normalized_train_scores(base)
    ref = previous.get("reference") or reference(z)
    names = list(get(base, "model.init_args.reward_names"))
    started = time.perf_counter()
    if not args.report:
        choice = choice or choose_range(out, task, base, task.seeds[0], ref, z)
        base = override(base, RANGES[choice["chosen"]])
        for seed in seeds:
            folder = out / f"seed{seed}"
            if "ric" in arms:
                ric_runs(folder, task, base, seed)
            for name in BASELINES:
                if name in arms:
                    baseline_runs(name, folder, task, base, seed)
    records: dict[str, dict[str, dict]] = previous.get("points", {})
    for folder in sorted(out.glob("seed*")):
        for point in sorted((folder / "sweeps").glob("*/point.json")):
            records.setdefault(folder.name, {})[point.parent.name] = point_record(point.parent, names)
    summary = summarize(records, ref, names)
    complete = complete_seeds(records)
    checks = goals(summarize({k: records[k] for k in complete}, ref, names), names)
    print(f"goals decided on seeds {complete} (of {sorted(records)}: those with every point)")
    print_table(summary, names)
    for name, check in checks.items():
        print(f"goal: {name}: {({True: 'met', False: 'not met', None: 'not measured'})[check['met']]}")
    result = {
        "task": args.task,
        "rules": now,
        "reference": ref,
        "range_choice": choice,
        "goal_seeds": complete,
        "reward_names": names,
        "points": records,
        "summary": summary,
        "goals": checks,
        "command": command(),
        "wall_seconds_this_run": time.perf_counter() - started,
    }
    write_results(results_path.stem, result)
    for path in plot(summary, names, ref, RESULTS / f"comparison_{args.task}"):
        print(path)


if __name__ == "__main__":
    main()

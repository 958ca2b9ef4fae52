"""Generation speed, static vs continuous batching, side by side in one command on this machine: the hh
recipe's preference sweep (``configs/steer_hh_cpu.yaml``: 64 held-out prompts x 2 answers x 5 preferences)
and the generation of one online round (prompts at desired rewards drawn uniformly in the reward range).

    .venv/bin/python benchmarks/generation.py runs/steer_hh_cpu/ckpt/last.ckpt

Each sweep is ``ric test`` of the shipped config with overrides (the generation mode, the sweep's rows at
once, an output folder), so it runs exactly as a user's sweep does, same seed, same sampling; the online
round calls the policy's ``generate`` on the same prompts and targets for each mode. Writes
``benchmarks/results/generation_cpu.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "steer_hh_cpu.yaml"


def sweep_config(mode: str, rows: int, out: Path, prompts: int | None = None) -> dict:
    """The shipped recipe, testing a checkpoint: only its sweep, in ``mode`` with ``rows`` decoding at once
    (on its first ``prompts`` held-out prompts, if given: a quick check of this script)."""
    config = yaml.safe_load(CONFIG.read_text())
    if prompts:
        config["data"]["max_test_prompts"] = prompts
    config["model"]["init_args"]["generation_batching"] = mode
    sweep = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PreferenceSweep"))
    sweep["init_args"]["output_dir"] = str(out / "sweep")
    sweep["init_args"]["marker_responses"] = 0  # the same either way: not generation
    sweep["init_args"]["sampling"]["batch_size"] = rows
    config["trainer"]["callbacks"] = [sweep]
    config["trainer"]["default_root_dir"] = str(out)
    config["data"]["output_dir"] = str(out)
    return config


def with_mode(checkpoint: Path, mode: str, folder: Path) -> Path:
    """A copy of ``checkpoint`` whose recorded settings say ``mode``: ``ric test --ckpt_path`` takes the model's
    settings from the checkpoint (Lightning's rule), over the config's."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["generation_batching"] = mode
    path = folder / f"{mode}.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def run_sweep(checkpoint: Path, mode: str, rows: int, out: Path, prompts: int | None = None) -> dict:
    folder = out / f"sweep-{mode}"
    path = out / f"sweep-{mode}.yaml"
    path.write_text(yaml.safe_dump(sweep_config(mode, rows, folder, prompts)))
    ckpt = with_mode(checkpoint, mode, folder)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ric.cli", "test", "--config", str(path), "--ckpt_path", str(ckpt)],
                   cwd=ROOT, check=True)  # fmt: skip
    wall = time.perf_counter() - start
    metrics = json.loads((folder / "sweep" / "metrics.json").read_text())
    samples = [json.loads(line) for line in (folder / "sweep" / "samples.jsonl").read_text().splitlines() if line]
    return {"mode": mode, "rows": rows, "wall_s": wall, "sweep_s": metrics["cost"]["sweep_seconds"],
            "metrics": metrics, "samples": samples}  # fmt: skip


def answer_tokens(tokenizer, answers: list[str]) -> np.ndarray:
    return np.array([len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers])


def online_round(checkpoint: Path, prompts: list[str], modes: list[tuple[str, int]], n: int) -> list[dict]:
    """One online round's generation as the online loop runs it (a rollout in chunks of its default size, ``n``
    samples of ``prompts`` at the online temperature, targets uniform in the reward range), in each mode on the
    same prompts, targets and seed."""
    import inspect

    import torch

    import ric
    from ric.online import OnlineLoop
    from ric.rollout import rollout

    chunk = inspect.signature(OnlineLoop).parameters["chunk_size"].default

    policy = ric.load(checkpoint)
    prompts = [prompts[k % len(prompts)] for k in range(n)]
    space = policy.reward_space
    targets = np.random.default_rng(0).uniform(space.r_min, space.r_max, size=(n, len(space.reward_names)))
    out = []
    for mode, size in modes:
        policy.hparams.generation_batching = mode
        torch.manual_seed(0)
        start = time.perf_counter()
        answers = rollout(policy, prompts, targets, settings={"temperature": 0.7, "top_p": 0.9, "batch_size": size},
                          chunk_size=chunk).samples  # fmt: skip
        seconds = time.perf_counter() - start
        tokens = answer_tokens(policy.tokenizer, answers)
        out.append({"mode": mode, "rows": size, "samples": n, "chunk_size": chunk, "seconds": seconds,
                    "mean_answer_tokens": float(tokens.mean()),
                    "useful_tokens_per_s": float(tokens.sum() / seconds)})  # fmt: skip
        print(f"online round, {mode} ({size} rows): {n} samples in {seconds:.1f} s", flush=True)
    return out


def summarize(run: dict, tokenizer) -> dict:
    """Speed and answers of one sweep: useful tokens are the answers' own (what static rows pad is not)."""
    answers = [s["response"] for s in run["samples"]]
    tokens = answer_tokens(tokenizer, answers)
    m = run["metrics"]
    names = list(run["samples"][0]["scores"])
    prefs = sorted({tuple(s["preference"]) for s in run["samples"]})
    obtained = [[float(np.mean([s["scores"][n] for s in run["samples"] if tuple(s["preference"]) == w]))
                 for n in names] for w in prefs]  # fmt: skip
    return {
        "mode": run["mode"],
        "rows": run["rows"],
        "sweep_s": run["sweep_s"],
        "command_s": run["wall_s"],
        "answers": len(answers),
        "mean_answer_tokens": float(tokens.mean()),
        "useful_tokens_per_s": float(tokens.sum() / run["sweep_s"]),
        "reward_names": names,
        "preferences": [list(w) for w in prefs],
        "obtained": obtained,
        "steering": {n: {k: v[k] for k in ("spearman", "spread_ratio")} for n, v in m["steering"].items()},
        "hypervolume": m["hypervolume"],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = results["sweep"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [f"{s['mode']}\n({s['rows']} rows)" for s in sweeps]
    axes[0].bar(names, [s["sweep_s"] for s in sweeps], color=["tab:gray", "tab:blue"][: len(sweeps)])
    axes[0].set_ylabel("sweep seconds (640 answers)")
    axes[0].set_title("hh recipe sweep on 2 CPU cores")
    for s, style in zip(sweeps, ["o--", "s-"]):
        obtained = np.array(s["obtained"]) if s["obtained"] else None
        if obtained is None:
            continue
        w = np.array(s["preferences"])[:, 0]
        for d, color in enumerate(["tab:red", "tab:green"]):
            axes[1].plot(w, obtained[:, d], style, color=color, label=f"{s['mode']}: {results['reward_names'][d]}")
    axes[1].set_xlabel("weight on the first reward")
    axes[1].set_ylabel("obtained (normalized)")
    axes[1].set_title("the same steering either way")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--static-rows", type=int, default=8, help="the recipe's static batch (8: its fastest)")
    parser.add_argument("--continuous-rows", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=None, help="fewer held-out prompts (a quick check)")
    parser.add_argument("--online", type=int, default=256, help="samples in the online round (0: skip it)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "generation_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generation_cpu.json")
    args = parser.parse_args()
    import torch

    from ric.text.models import load_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    modes = [("static", args.static_rows), ("continuous", args.continuous_rows)]
    tokenizer = load_tokenizer("smollm2")
    runs = [run_sweep(args.checkpoint, mode, rows, args.work, args.prompts) for mode, rows in modes]
    sweeps = [summarize(r, tokenizer) for r in runs]
    for s in sweeps:
        print(f"sweep, {s['mode']} ({s['rows']} rows): {s['sweep_s']:.1f} s, {s['useful_tokens_per_s']:.1f} useful "
              f"tokens/s, answers {s['mean_answer_tokens']:.1f} tokens", flush=True)  # fmt: skip
    prompts = sorted({s["prompt"] for s in runs[0]["samples"]})
    online = online_round(args.checkpoint, prompts, modes, args.online) if args.online else []
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "config": str(CONFIG.relative_to(ROOT)),
        "reward_names": sweeps[0]["reward_names"],
        "sweep": sweeps,
        "sweep_speedup": sweeps[0]["sweep_s"] / sweeps[1]["sweep_s"],
        "online": online,
        "online_speedup": online[0]["seconds"] / online[1]["seconds"] if online else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"sweep {results['sweep_speedup']:.2f}x faster continuous; online round "
          f"{results['online_speedup'] or float('nan'):.2f}x; {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()

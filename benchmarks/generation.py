"""Generation speed, static vs continuous batching, side by side in one command on this machine: the hh
recipe's preference sweep (``configs/steer_hh_cpu.yaml``: 64 held-out prompts x 2 answers x 5 preferences)
and the generation of one online round (prompts at desired rewards drawn uniformly in the reward range).

    .venv/bin/python -m benchmarks.generation runs/steer_hh_cpu/ckpt/last.ckpt

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
        torch.manual_seed(0)
        start = time.perf_counter()
        if mode == "transformers":
            try:
                answers = transformers_batching(policy, prompts, targets, size)
            except Exception as err:  # noqa: BLE001 - recorded: the other modes still count
                out.append({"mode": mode, "rows": size, "error": f"{type(err).__name__}: {err}"})
                print(f"online round, {mode}: failed: {err}", flush=True)
                continue
        else:
            policy.hparams.generation_batching = mode
            settings = {"temperature": 0.7, "top_p": 0.9, "batch_size": size}
            answers = rollout(policy, prompts, targets, settings=settings, chunk_size=chunk).samples
        seconds = time.perf_counter() - start
        tokens = answer_tokens(policy.tokenizer, answers)
        out.append({"mode": mode, "rows": size, "samples": n, "chunk_size": chunk, "seconds": seconds,
                    "mean_answer_tokens": float(tokens.mean()),
                    "useful_tokens_per_s": float(tokens.sum() / seconds)})  # fmt: skip
        print(f"online round, {mode} ({size} rows): {n} samples in {seconds:.1f} s", flush=True)
    return out


def prefill_share(checkpoint: Path, work: Path, rows: int) -> dict:
    """Where a continuous sweep's time goes: one preference of the recorded continuous sweep generated again,
    with the engine's prefills timed apart from its decoding steps."""
    import torch

    import ric
    from ric.text.batching import ContinuousBatcher

    samples = [
        json.loads(line)
        for line in (work / "sweep-continuous" / "sweep" / "samples.jsonl").read_text().splitlines()
        if line
    ]
    w = samples[len(samples) // 2]["preference"]
    chosen = [s for s in samples if s["preference"] == w]
    policy = ric.load(checkpoint)
    spent = {"prefill_s": 0.0, "prefill_calls": 0, "prefill_tokens": 0}
    original = ContinuousBatcher._prefill

    def timed(engine: ContinuousBatcher, requests: list) -> list:
        start = time.perf_counter()
        try:
            return original(engine, requests)
        finally:
            spent["prefill_s"] += time.perf_counter() - start
            spent["prefill_calls"] += 1
            spent["prefill_tokens"] += sum(len(ids) for ids in {tuple(r.ids) for r in requests})

    ContinuousBatcher._prefill = timed
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        policy.generate([s["prompt"] for s in chosen], np.array([s["desired"] for s in chosen]), temperature=0.7,
                        top_p=0.9, batch_size=rows)  # fmt: skip
        total = time.perf_counter() - start
    finally:
        ContinuousBatcher._prefill = original
    print(f"one preference ({len(chosen)} answers): {total:.1f} s, prefills {spent['prefill_s']:.1f} s", flush=True)
    return {
        "preference": w,
        "answers": len(chosen),
        "seconds": total,
        **spent,
        "prefill_share": spent["prefill_s"] / total,
    }


def transformers_batching(policy, prompts: list[str], targets: np.ndarray, rows: int) -> list[str]:
    """transformers' own continuous batching (``generate_batch``, paged attention) on the merged model, with
    the settings that were its fastest on this CPU in a probe (pages of 32, 512 tokens a step)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    ids = policy.prompt_ids(prompts, targets)
    tok = policy.tokenizer
    config = GenerationConfig(max_new_tokens=policy.hparams.max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                              top_k=50, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    paged = ContinuousBatchingConfig(page_size=32, num_blocks=512, max_batch_tokens=512, max_requests_per_batch=rows)
    base = policy.lm.get_base_model() if hasattr(policy.lm, "get_base_model") else policy.lm
    policy.eval()
    with policy.generation_session():
        out = base.generate_batch(ids, generation_config=config, continuous_batching_config=paged)
    ordered = sorted(out.items(), key=lambda item: int(str(item[0]).rsplit("_", 1)[-1]))
    return [policy.decode_answer(list(result.generated_tokens)) for _, result in ordered]


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
    parser.add_argument("--static-rows", type=int, default=8, help="the static batch (8: the fastest before)")
    parser.add_argument("--continuous-rows", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=None, help="fewer held-out prompts (a quick check)")
    parser.add_argument("--online", type=int, default=256, help="samples in the online round (0: skip it)")
    parser.add_argument(
        "--online-modes",
        default="static,continuous",
        help="modes of the online round: static, continuous, transformers (its own batching)",
    )
    parser.add_argument("--online-only", action="store_true", help="keep the sweeps of --out, time the round again")
    parser.add_argument("--prefill-share", action="store_true", help="time one preference's prefills apart")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "generation_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generation_cpu.json")
    args = parser.parse_args()
    import torch

    from ric.text.models import load_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    modes = [("static", args.static_rows), ("continuous", args.continuous_rows)]
    tokenizer = load_tokenizer("smollm2")
    if args.online_only:  # the sweeps of an earlier run of this command, measured again: only the online round
        earlier = json.loads(args.out.read_text())
        sweeps = earlier["sweep"]
        samples = (args.work / "sweep-static" / "sweep" / "samples.jsonl").read_text().splitlines()
        prompts = sorted({json.loads(line)["prompt"] for line in samples if line})
    else:
        runs = [run_sweep(args.checkpoint, mode, rows, args.work, args.prompts) for mode, rows in modes]
        sweeps = [summarize(r, tokenizer) for r in runs]
        prompts = sorted({s["prompt"] for s in runs[0]["samples"]})
    for s in sweeps:
        print(f"sweep, {s['mode']} ({s['rows']} rows): {s['sweep_s']:.1f} s, {s['useful_tokens_per_s']:.1f} useful "
              f"tokens/s, answers {s['mean_answer_tokens']:.1f} tokens", flush=True)  # fmt: skip
    split = prefill_share(args.checkpoint, args.work, args.continuous_rows) if args.prefill_share else None
    rows = {"static": args.static_rows, "continuous": args.continuous_rows, "transformers": args.continuous_rows}
    online_modes = [(mode, rows[mode]) for mode in args.online_modes.split(",") if mode]
    online = online_round(args.checkpoint, prompts, online_modes, args.online) if args.online else []
    if args.online_only:  # the modes not measured again keep their earlier numbers
        again = {o["mode"] for o in online}
        online = [o for o in earlier["online"] if o["mode"] not in again] + online
        online.sort(key=lambda o: list(rows).index(o["mode"]))
        split = split or earlier.get("continuous_sweep_split")
    by_mode = {o["mode"]: o for o in online if "seconds" in o}
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results = {
        "command": f"{earlier['command']}; then {command}" if args.online_only else command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "config": str(CONFIG.relative_to(ROOT)),
        "reward_names": sweeps[0]["reward_names"],
        "transformers_batching": "ContinuousBatchingConfig(page_size=32, num_blocks=512, max_batch_tokens=512, "
        "max_requests_per_batch=rows)"
        if "transformers" in args.online_modes
        else None,
        "sweep": sweeps,
        "sweep_speedup": sweeps[0]["sweep_s"] / sweeps[1]["sweep_s"],
        "online": online,
        "continuous_sweep_split": split,
        "online_speedup": by_mode["static"]["seconds"] / by_mode["continuous"]["seconds"]
        if {"static", "continuous"} <= set(by_mode)
        else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"sweep {results['sweep_speedup']:.2f}x faster continuous; online round "
          f"{results['online_speedup'] or float('nan'):.2f}x; {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()

"""How many prompts a generation batch should hold in a preference sweep on this CPU, side by side.

A batch decodes until its longest answer ends, and hh-rlhf answers are short (about 40 tokens) while a few
run to the limit, so large batches spend most decoding steps on rows that are already finished. This times
one preference of a sweep (the held-out prompts of a trained run, as its ``samples.jsonl`` holds them) at
each batch size in one process, same model, same sampling.

    .venv/bin/python benchmarks/sweep_batch.py runs/front_quality-cpu/seed0/ric/ckpt/last.ckpt \\
        runs/front_quality-cpu/seed0/sweeps/ric_linear/samples.jsonl --batches 8,64,16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from steering import EVAL

import ric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("samples", type=Path, help="a sweep's samples.jsonl: its prompts and desired rewards")
    parser.add_argument("--batches", default="8,64,16")
    parser.add_argument("--preference", default="0.5,0.5")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep_batch_cpu.json"))
    args = parser.parse_args()
    pref = [float(v) for v in args.preference.split(",")]
    rows = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if np.allclose(r["preference"], pref)]
    if not rows:
        raise SystemExit(f"{args.samples} has no samples at preference {pref}")
    policy = ric.load(args.checkpoint)
    prompts, desired = [r["prompt"] for r in rows], np.array([r["desired"] for r in rows])
    results = []
    for batch in [int(v) for v in args.batches.split(",")]:
        torch.manual_seed(0)
        start = time.perf_counter()
        out = policy.generate(prompts, desired, **{**EVAL, "max_new_tokens": args.new_tokens}, batch_size=batch)
        seconds = time.perf_counter() - start
        tokens = [len(policy.tokenizer(o)["input_ids"]) for o in out]
        results.append({"batch": batch, "seconds": seconds, "mean_answer_tokens": float(np.mean(tokens))})
        print(f"batch {batch:3d}: {len(prompts)} prompts in {seconds:.1f} s, answers {np.mean(tokens):.1f} tokens")
    slowest = max(r["seconds"] for r in results)
    for r in results:
        r["speedup_over_slowest"] = slowest / r["seconds"]
    summary = {"command": " ".join(sys.argv), "prompts": len(prompts), "new_tokens": args.new_tokens,
               "cpu": platform.processor(), "threads": torch.get_num_threads(), "results": results}  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Batched vs batch-1 generation and batched vs per-sample reward scoring, side by side on this CPU.

Batch-1 is how the authors' scripts generate and score. Both arms produce exactly the same number of
tokens (``min_new_tokens = max_new_tokens``) so tokens/s compare like for like. ``throughput.py`` covers
training and GPU shapes.

    .venv/bin/python -m benchmarks.text_batching --batch-size 16 --out benchmarks/results/text_batching.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.measure import matmul_ceiling, scoring_speed, timed
from ric.text.datasets import Quickstart
from ric.text.policy import TextPolicy
from ric.text.rewards import Relevance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--score-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    records = Quickstart().load()
    prompts = list(dict.fromkeys(r["prompt"] for r in records))[: args.batch_size]
    policy = TextPolicy(
        model="smollm2",
        reward_names=["verbosity", "readability"],
        template="<|im_start|>user\n{prompt} {rewards}<|im_end|>\n<|im_start|>assistant\n",
        lora_r=0,
        conditioned=False,
    )
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True}
    policy.generate(prompts[:2], **settings)  # warm-up
    tokens = len(prompts) * args.new_tokens
    t_batched = timed(lambda: policy.generate(prompts, batch_size=args.batch_size, **settings), args.repeats)
    t_single = timed(lambda: policy.generate(prompts, batch_size=1, **settings), max(1, args.repeats - 1))

    # relabeling workload: every response of the first prompts (4 per prompt in the quickstart data)
    reward = Relevance()
    wanted = set(list(dict.fromkeys(r["prompt"] for r in records))[: max(1, args.score_samples // 4)])
    pairs = [r for r in records if r["prompt"] in wanted][: args.score_samples]
    p, s = [r["prompt"] for r in pairs], [r["response"] for r in pairs]
    speed = scoring_speed(reward, p, s, args.batch_size, args.repeats)
    s_batched = speed["batched_seconds"]

    # what bounds the scoring speed-up: achieved FLOP/s against a matmul ceiling measured now
    ceiling = matmul_ceiling("cpu", torch.float32, 2048, args.repeats)
    enc_params = sum(p.numel() for n, p in reward.encoder.named_parameters() if "embeddings" not in n)
    tokens_scored = sum(len(reward.tokenizer(x, truncation=True, max_length=256)["input_ids"]) for x in s)
    tokens_scored += sum(len(reward.tokenizer(x, truncation=True, max_length=256)["input_ids"]) for x in set(p))
    flop = 2 * enc_params * tokens_scored

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "batch_size": args.batch_size,
        "generation": {
            "new_tokens_per_prompt": args.new_tokens,
            "prompts": len(prompts),
            "batched_tokens_per_s": tokens / t_batched,
            "batch1_tokens_per_s": tokens / t_single,
            "speedup": t_single / t_batched,
        },
        "scoring": {
            "reward": "relevance (all-MiniLM-L6-v2)",
            "samples": len(pairs),
            "batched_samples_per_s": speed["batched_samples_per_s"],
            "per_sample_samples_per_s": speed["per_sample_samples_per_s"],
            "speedup": speed["speedup"],
            "matmul_ceiling_gflops": ceiling / 1e9,
            "batched_gflops": flop / s_batched / 1e9,
            "batched_share_of_ceiling": flop / s_batched / ceiling,
            "max_speedup_at_ceiling": speed["speedup"] * s_batched / (flop / ceiling),
        },
    }
    g, sc = result["generation"], result["scoring"]
    print(f"{'':28}{'batched':>12}{'batch 1':>12}{'speed-up':>10}")
    print(
        f"{'generation (tokens/s)':28}{g['batched_tokens_per_s']:12.1f}{g['batch1_tokens_per_s']:12.1f}"
        f"{g['speedup']:9.1f}x"
    )
    print(
        f"{'reward scoring (samples/s)':28}{sc['batched_samples_per_s']:12.1f}{sc['per_sample_samples_per_s']:12.1f}"
        f"{sc['speedup']:9.1f}x"
    )
    print(
        f"scoring: batched runs at {sc['batched_gflops']:.0f} GFLOP/s = {100 * sc['batched_share_of_ceiling']:.0f}% of "
        f"the {sc['matmul_ceiling_gflops']:.0f} GFLOP/s matmul ceiling; at the ceiling the speed-up would be "
        f"{sc['max_speedup_at_ceiling']:.1f}x"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(args.out)


if __name__ == "__main__":
    main()

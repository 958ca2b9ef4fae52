"""Rollout decoding on a GPU, static batches vs continuous batching (and vLLM where installed), side by side.

Random weights never end an answer, so each prompt gets its own answer length drawn like hh-rlhf's answers
(geometric, mean ``--mean-tokens``, at most ``--max-tokens``): the continuous engine stops each row at its
length, a static batch runs until its longest row's (what an end-of-sequence token does with real weights).
Useful tokens are the answers' own. Reports tokens/s and MFU against a bf16 matmul ceiling measured in the
same run.

    python3 -m benchmarks.gpu_generation --config .gpu/smollm2-shape/config.json --prompts 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def matmul_ceiling(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - start)


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ric.text.batching import ContinuousBatcher, Request, Sampling

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a model config.json (random weights)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--mean-tokens", type=float, default=38.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--static-rows", default="16,64")
    parser.add_argument("--continuous-rows", default="64,128")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/generation_cuda.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    config = AutoConfig.from_pretrained(Path(args.config).parent)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    params = sum(p.numel() for p in lm.parameters())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, config.vocab_size - 100, size=int(n)).tolist()
               for n in rng.integers(40, 400, size=args.prompts)]  # fmt: skip
    lengths = np.minimum(rng.geometric(1 / args.mean_tokens, size=args.prompts), args.max_tokens)
    useful = int(lengths.sum())
    ceiling = matmul_ceiling(device)
    results = {"device": torch.cuda.get_device_name(), "params": params, "prompts": args.prompts,
               "useful_tokens": useful, "matmul_ceiling_tflops": ceiling / 1e12, "runs": []}  # fmt: skip

    def record(name: str, rows: int, seconds: float) -> None:
        flops = 2 * params * useful
        results["runs"].append({"mode": name, "rows": rows, "seconds": seconds, "useful_tokens_per_s": useful / seconds,
                                "mfu": flops / seconds / ceiling})  # fmt: skip
        print(f"{name} ({rows} rows): {seconds:.1f} s, {useful / seconds:.0f} useful tokens/s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for rows in [int(v) for v in args.static_rows.split(",")]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for b in range(0, len(order), rows):
            batch = order[b : b + rows]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            n = int(lengths[batch].max())
            lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        record("static", rows, time.perf_counter() - start)
    for rows in [int(v) for v in args.continuous_rows.split(",")]:
        engine = ContinuousBatcher(lm, eos_token_id=-1, pad_token_id=0, max_batch_size=rows)
        requests = [Request(prompts[i], int(lengths[i]), Sampling(0.7, 0.9), seed=i) for i in order]
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.run(requests)
        torch.cuda.synchronize()
        record("continuous", rows, time.perf_counter() - start)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

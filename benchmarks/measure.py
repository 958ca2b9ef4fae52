"""Measurement helpers the benchmarks share: median wall times (synchronized on GPUs), the matmul ceiling
measured in the same run, and batched vs one-pair-at-a-time reward scoring."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done rather than when it was queued."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    runs = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def matmul_ceiling(device: torch.device | str, dtype: torch.dtype, n: int, repeats: int = 3, inner: int = 4) -> float:
    """FLOP/s of ``n x n`` matmuls in ``dtype``: what dense model math can reach on this device right now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, clocks)
    seconds = timed(lambda: [a @ b for _ in range(inner)], repeats, device)
    return inner * 2 * n**3 / seconds


def scoring_speed(reward: Any, prompts: Sequence[Any], samples: Sequence[Any], batch_size: int, repeats: int) -> dict:
    """Samples/s of ``reward.score`` in batches vs one (prompt, sample) pair per call (the authors' way)."""
    device = getattr(reward, "device", None)
    reward.score(prompts[:4], samples[:4], batch_size=batch_size)  # warm-up
    batched = timed(lambda: reward.score(prompts, samples, batch_size=batch_size), repeats, device)
    single = timed(lambda: [reward.score([p], [s]) for p, s in zip(prompts, samples)], max(1, repeats - 1), device)
    return {
        "samples": len(samples),
        "batch_size": batch_size,
        "batched_seconds": batched,
        "batched_samples_per_s": len(samples) / batched,
        "per_sample_samples_per_s": len(samples) / single,
        "speedup": single / batched,
    }

"""Measurement helpers the benchmarks share: median wall times (synchronized on GPUs), the matmul ceiling
measured in the same run, and batched vs one-pair-at-a-time reward scoring."""

from __future__ import annotations

import re
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


MATMUL_KERNELS = re.compile(r"gemm|xmma|nvjet|cublas|cutlass.*(mm|matmul)|^aten::(mm|addmm|bmm|baddbmm)$", re.I)
ATTENTION_KERNELS = re.compile(r"flash|fmha|attention|scaled_dot_product", re.I)


def profile_step(fn: Callable[[], Any], device: torch.device | str, steps: int = 3, top: int = 12) -> dict:
    """Where a step's time goes: torch.profiler over ``steps`` calls of ``fn``; GPU kernels on CUDA (their
    self time), operators on the CPU. ``busy_share`` below 1 means the device waits for the host (launch or
    Python overhead); ``groups`` splits the busy time into matmul, attention and everything else."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - start) / steps
    events = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        # on CUDA the kernels and copies themselves: operators also report their kernels' time as their own
        if us > 0 and (e.device_type == DeviceType.CUDA if cuda else e.key.startswith("aten::")):
            events.append((e.key, us / 1e3 / steps))
    busy = sum(ms for _, ms in events)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in events:
        group = "matmul" if MATMUL_KERNELS.search(name) else "attention" if ATTENTION_KERNELS.search(name) else "other"
        groups[group] += ms
    events.sort(key=lambda item: -item[1])
    return {
        "step_ms": 1e3 * wall,
        "busy_ms": busy,
        "busy_share": busy / (1e3 * wall),
        "groups_ms": groups,
        "top": [{"name": name[:120], "ms_per_step": ms, "share": ms / busy} for name, ms in events[:top]],
    }


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 28, repeats: int = 3) -> float:
    """Bytes/s that a large device-to-device copy reads plus writes: the memory bandwidth kernels that only
    stream data can reach."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    return 2 * nbytes / timed(lambda: dst.copy_(src), repeats, device)

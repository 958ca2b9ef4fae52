"""What generation needs to know about the other processes: rank and world size, whether the policy's
weights are sharded (then every rank must make the same forward calls), and gathering Python objects."""

from __future__ import annotations

from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def seed_for_rank(seed: int) -> int:
    """``seed`` made this rank's own: processes seeded alike would otherwise draw the same random numbers."""
    return int(seed) + 1_000_003 * rank_and_world()[0]


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (a policy loaded for inference has none)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def sharded_weights(trainer: Any) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3 with several processes: a forward pass gathers weight shards
    from every rank, so generation must run in lockstep on all of them (``synced_gpus``, equal batch counts)."""
    from ric.strategies import is_fsdp, resolve_strategy, zero_stage

    if trainer is None or rank_and_world()[1] < 2:
        return False
    cls, init_args = resolve_strategy(trainer.strategy)
    return is_fsdp(cls) or zero_stage(cls, init_args) == 3


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (just ``[obj]`` in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 only (``None`` elsewhere): results that only rank 0
    writes need not travel to every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def contiguous_share(n: int, rank: int, world: int) -> list[int]:
    """This rank's contiguous block of ``range(n)`` (blocks of ``ceil(n / world)``; the last ones may be
    shorter or empty). Contiguous, so the copies of a repeated prompt stay in one rank's call rather than
    meeting the same random stream on two ranks."""
    size = -(-n // world)
    start = min(n, rank * size)
    return list(range(start, min(n, start + size)))

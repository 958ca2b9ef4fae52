"""One way to generate for a list of (prompt, target rewards) pairs, shared by the online loop, the preference
sweep and inference (``steer``, ``ric generate``, ``ric serve``).

A rollout streams every prompt through one generation session (a LoRA adapter is merged once, and a
continuous batch stays full from the first prompt to the last), scores the samples in chunks as they finish,
and hands each chunk to a callback as soon as it is scored (the online loop appends it to its buffer file),
in the order the samples finished; the result is in the prompts' order. When the policy's weights are
sharded across processes (FSDP, ZeRO-3) every rank must make the same generate calls with the same number of
prompts: the rollout then generates chunk by chunk, pads the ranks' chunks into lockstep and drops the
padding from the results.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ric.distributed import attached_trainer, gather_objects, rank_and_world, seed_for_rank, sharded_weights
from ric.rewards import RewardModel, score_all
from ric.signals import check_stop, graceful_stop

if TYPE_CHECKING:  # (the policy interface imports this module to steer)
    from ric.interfaces import ConditionalPolicy

#: ``(indices, samples, raw scores or None)`` of a finished chunk
ChunkCallback = Callable[[list[int], list[Any], "np.ndarray | None"], None]


@dataclass
class Rollout:
    """What a rollout produced for its indices, in their order (``raw``: ``[n, N]`` scores, if scored)."""

    indices: list[int]
    samples: list[Any]
    raw: np.ndarray | None


@contextlib.contextmanager
def random_stream(seed: int | None) -> Iterator[None]:
    """Sampling from a stream of its own: ``seed`` (made this rank's own) when given, restoring the global
    generators afterwards, so one seed gives the same samples every time; without a seed a single process
    keeps its global stream and several processes each fork one from their start seed."""
    world = rank_and_world()[1]
    if seed is None and world == 1:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_for_rank(torch.initial_seed() if seed is None else seed))
        yield


def rollout(
    policy: ConditionalPolicy,
    prompts: Sequence[Any],
    targets: np.ndarray | None = None,
    *,
    indices: Sequence[int] | None = None,
    settings: dict[str, Any] | None = None,
    rewards: Sequence[RewardModel] | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
    on_chunk: ChunkCallback | None = None,
    progress: str | None = None,
    lockstep: bool | None = None,
) -> Rollout:
    """Generate (and score, with ``rewards``) ``prompts[i]`` at ``targets[i]`` for each ``i`` in ``indices``
    (default: all), scored and handed on ``chunk_size`` at a time (default: one chunk); ``targets=None``
    generates without reward markers. ``progress`` labels a progress bar (shown on rank 0). Between chunks a
    stop request (SIGTERM, SIGINT) ends the rollout with :class:`ric.signals.StopRequested` after the
    finished chunks were handed to ``on_chunk``."""
    todo = list(range(len(prompts))) if indices is None else list(indices)
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
    size = chunk_size or max(len(todo), 1)
    chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
    trainer = attached_trainer(policy)
    if lockstep is None:
        lockstep = sharded_weights(trainer)
    if lockstep:  # every rank: as many generate calls, each of as many prompts
        counts = gather_objects((len(chunks), size))
        size = max(width for _, width in counts)
        chunks += [[]] * (max(count for count, _ in counts) - len(chunks))
    rank = rank_and_world()[0]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=progress, unit="sample", disable=progress is None or rank != 0, leave=False)
    done: dict[int, tuple[Any, np.ndarray | None]] = {}

    def finish(chunk: list[int], out: list[Any]) -> None:
        scores = score_all(rewards, [prompts[i] for i in chunk], out) if rewards else None
        if on_chunk is not None:
            on_chunk(chunk, out, scores)
        for j, i in enumerate(chunk):
            done[i] = (out[j], None if scores is None else scores[j])
        bar.update(len(chunk))

    # inside a fit or test, Ctrl-C also stops at a chunk boundary (Lightning already defers SIGTERM)
    stops = graceful_stop((signal.SIGINT,)) if trainer is not None else contextlib.nullcontext()
    with stops, policy.generation_session(), random_stream(seed):
        if lockstep or not policy.streams(settings or {}):
            for chunk in chunks:
                check_stop(trainer)
                filler = (chunk or todo or [0])[-1:] * (size - len(chunk)) if lockstep else []
                if not chunk and not filler:
                    continue
                calls = chunk + filler
                chunk_targets = None if targets is None else np.asarray(targets)[calls]
                out = policy.generate([prompts[i] for i in calls], chunk_targets, **(settings or {}))[: len(chunk)]
                if chunk:
                    finish(chunk, out)
        elif todo:
            # one stream over every prompt: a chunk is handed on as soon as that many samples have finished
            check_stop(trainer)
            all_targets = None if targets is None else np.asarray(targets)[todo]
            stream = policy.generate_stream([prompts[i] for i in todo], all_targets, **(settings or {}))
            pending: list[tuple[int, Any]] = []
            try:
                for position, sample in stream:
                    pending.append((todo[position], sample))
                    if len(pending) == size or len(done) + len(pending) == len(todo):
                        finish([i for i, _ in pending], [x for _, x in pending])
                        pending = []
                        if len(done) < len(todo):
                            check_stop(trainer)
            finally:
                stream.close()
    bar.close()
    samples = [done[i][0] for i in todo]
    n_rewards = len(rewards) if rewards else 0
    scores_all = None
    if rewards:
        scores_all = np.vstack([done[i][1] for i in todo]) if todo else np.zeros((0, n_rewards))
    return Rollout(todo, samples, scores_all)

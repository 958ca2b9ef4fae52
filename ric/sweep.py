"""A preference sweep: map each preference to desired rewards, generate for every held-out prompt, score.

:func:`run_sweep` is the sweep itself, for any policy with a reward space: the RiC callback
(:class:`ric.evaluation.PreferenceSweep`), the RL baselines and studies all call it, and
:mod:`ric.report` writes what it returns. It is resumable (each finished preference is kept) and sharded
(every process generates a contiguous share of the prompts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ric.distributed import contiguous_share, gather_to_first, rank_and_world
from ric.rewards import RewardModel
from ric.rollout import rollout

if TYPE_CHECKING:
    from ric.interfaces import ConditionalPolicy

#: The 13 preference triples of the paper's three-objective front (Appendix B); 0.33 read as 1/3.
PAPER_TRIPLES = [
    [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.2, 0.4, 0.4],
    [0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.4, 0.2, 0.4], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2], [0.8, 0.1, 0.1],
    [1.0, 0.0, 0.0],
]  # fmt: skip


def default_preferences(num_rewards: int, num_points: int | None = None) -> list[list[float]]:
    """2 objectives: ``num_points`` (default 11) values of ``w_1`` from 0 to 1; 3 objectives: the paper's
    13 triples; more: the simplex lattice with step 1/2 plus the centre. One objective: ``[1]``."""
    if num_rewards == 1:
        return [[1.0]]
    if num_rewards == 2:
        return [[float(t), float(1 - t)] for t in np.linspace(0.0, 1.0, num_points or 11).round(10)]
    if num_rewards == 3 and num_points is None:
        return [list(p) for p in PAPER_TRIPLES]
    steps = 2 if num_points is None else max(1, num_points - 1)
    out = []

    def rec(prefix: list[int], left: int) -> None:
        if len(prefix) == num_rewards - 1:
            out.append([*prefix, left])
            return
        for k in range(left + 1):
            rec([*prefix, k], left - k)

    rec([], steps)
    points = [[k / steps for k in p] for p in out]
    centre = [1.0 / num_rewards] * num_rewards
    return points + ([centre] if centre not in points else [])


@dataclass
class SweepResult:
    """What a sweep produced, one entry per preference ``k`` (row ``k`` of ``preferences``; one NaN row for a
    policy evaluated without markers): the stored samples in prompt order, their raw scores and the same in
    the reward space's normalized units."""

    reward_names: list[str]
    prompts: list[Any]
    preferences: np.ndarray
    desired: np.ndarray
    samples: list[list[Any]]
    raw: list[np.ndarray]
    obtained: list[np.ndarray]
    #: generation and scoring seconds, those of preferences finished by an earlier, stopped run included
    seconds: float
    settings: dict[str, Any]
    method: str | None
    p: float | None

    @property
    def unconditioned(self) -> bool:
        return not np.all(np.isfinite(self.preferences))

    @property
    def means(self) -> np.ndarray:
        """Mean obtained rewards ``[P, N]`` (normalized units)."""
        return np.array([o.mean(axis=0) for o in self.obtained])

    def records(self) -> list[dict[str, Any]]:
        """One ``samples.jsonl`` row per sample: preference by preference, prompts in order."""
        out = []
        for k, (stored, z, raw) in enumerate(zip(self.samples, self.obtained, self.raw)):
            for i, (prompt, response) in enumerate(zip(self.prompts, stored)):
                out.append(
                    {
                        "prompt": prompt,
                        "preference": None if self.unconditioned else self.preferences[k].tolist(),
                        "desired": None if self.unconditioned else self.desired[k].tolist(),
                        "response": response if isinstance(response, str) else str(response),
                        "scores": dict(zip(self.reward_names, z[i].tolist())),
                        "raw_scores": dict(zip(self.reward_names, raw[i].tolist())),
                    }
                )
        return out


def run_sweep(
    policy: ConditionalPolicy,
    rewards: Sequence[RewardModel],
    prompts: Sequence[Any],
    preferences: Sequence[Sequence[float]] | np.ndarray | None,
    output_dir: str | Path,
    *,
    method: str | None = None,
    p: float | None = None,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    fingerprint: str = "",
) -> SweepResult | None:
    """Generate and score a sample for every prompt at every preference (``None``: one row without reward
    markers, for the base model and plain SFT) and return them on rank 0 (``None`` on the other ranks).

    Desired rewards come from the policy's reward space (``method`` / ``p`` override its mapping; a
    calibrated space writes the values that achieve them). Every
    preference samples from ``seed``'s stream, so the rows differ by their conditioning alone, and each row
    runs inside ``policy.preference_context`` (the weights a baseline trained or mixed for it). Each finished
    preference is kept in ``output_dir/.partial`` (image samples stored under their final names), so a sweep
    stopped by a signal or a crash continues where it stopped; ``fingerprint`` (the model's state) makes a
    changed model start afresh."""
    from tqdm.auto import tqdm

    space = policy.reward_space
    if space is None:
        raise RuntimeError("the policy has no reward space; run the DataModule setup first")
    names = list(space.reward_names)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no held-out prompts to evaluate: set test_fraction > 0 or test_dataset")
    method = method or space.method
    p = space.p if p is None else p
    if preferences is None:
        prefs = np.full((1, len(names)), np.nan)
        desired = np.full((1, len(names)), np.nan)
    else:
        prefs = np.array([space.check_preference(w) for w in preferences])
        desired = space.desired(prefs, method, p)
    settings = {**policy.sampling_defaults("evaluation"), **(settings or {})}
    out = Path(output_dir)
    rank, world = rank_and_world()
    share = contiguous_share(len(prompts), rank, world)
    partial = out / ".partial"
    started, reused, local = time.perf_counter(), 0.0, []
    rows = [None] if preferences is None else list(policy.marker_values(desired))
    for k, row in enumerate(tqdm(rows, desc="preference sweep", unit="pref", disable=rank != 0)):
        key = hashlib.sha256(
            json.dumps(
                [fingerprint, world, seed, settings, None if row is None else row.tolist(), [str(x) for x in prompts]],
                default=str,
            ).encode()
        ).hexdigest()[:16]
        path = partial / f"pref{k:02d}-{key}.rank{rank}.json"
        if path.is_file():
            if rank == 0:
                print(f"preference sweep: preference {k + 1} of {len(rows)} was finished before, reusing it")
            done = json.loads(path.read_text())
            reused += float(done.get("seconds", 0.0))  # the cost stays the first run's
            local.append((done["indices"], done["samples"], np.array(done["raw"], dtype=float).reshape(-1, len(names))))
            continue
        targets = None if row is None else np.broadcast_to(row, (len(prompts), len(names)))
        context = contextlib.nullcontext() if preferences is None else policy.preference_context(prefs[k])
        begun = time.perf_counter()
        with context:  # the rollout holds its own generation session (an adapter merged once per row)
            result = rollout(policy, prompts, targets, indices=share, settings=settings, rewards=rewards, seed=seed)
        stored = policy.store_samples(result.samples, out / "samples", [f"pref{k:02d}-{i:04d}" for i in share])
        partial.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        record = {
            "indices": share,
            "samples": stored,
            "raw": result.raw.tolist(),
            "seconds": time.perf_counter() - begun,
        }
        tmp.write_text(json.dumps(record, default=str))
        tmp.replace(path)
        local.append((share, stored, result.raw))
    gathered = gather_to_first(local)
    if gathered is None:
        return None
    parts = [assemble([g[k] for g in gathered], len(prompts), len(names)) for k in range(len(rows))]
    return SweepResult(
        reward_names=names,
        prompts=prompts,
        preferences=prefs,
        desired=desired,
        samples=[stored for stored, _ in parts],
        raw=[raw for _, raw in parts],
        obtained=[space.normalize(raw) for _, raw in parts],
        seconds=time.perf_counter() - started + reused,
        settings=settings,
        method=None if preferences is None else method,
        p=p if method in ("p_norm", "solver") else None,
    )


def assemble(
    parts: Sequence[tuple[list[int], list[Any], np.ndarray]], n: int, num_rewards: int
) -> tuple[list, np.ndarray]:
    """Ranks' ``(indices, samples, raw scores)`` -> all ``n`` samples and scores in prompt order."""
    samples: list[Any] = [None] * n
    raw = np.full((n, num_rewards), np.nan)
    for indices, their_samples, their_raw in parts:
        for j, i in enumerate(indices):
            samples[i], raw[i] = their_samples[j], their_raw[j]
    missing = [i for i in range(n) if samples[i] is None]
    if missing:
        raise RuntimeError(f"the sweep lost samples {missing[:10]} while gathering them from the ranks")
    return samples, raw

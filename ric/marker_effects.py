"""Does a trained policy read each reward's marker? A check without generation: per reward, the
log-likelihood a response loses when only that reward's marker is moved away from the value the response
earned. Steering measures (Spearman of obtained reward vs weight) cannot tell a reward that is followed from
one that moves only because it correlates with another; this can."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ric.interfaces import ConditionalPolicy
from ric.rewards import score_all


def marker_effects(
    policy: ConditionalPolicy,
    prompts: Sequence[Any],
    responses: Sequence[Any],
    rewards: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Per reward: the mean (and standard error) of the nats each response loses when that reward's marker
    alone moves from the response's own normalized reward to the far end of the reward space's range, the
    share of responses made less likely, and how far the marker moved on average. Near zero: the marker is
    ignored. ``rewards`` are the responses' normalized rewards ``[n, N]``; by default they are scored with
    the reward space's own reward models."""
    space = policy.reward_space
    if space is None or not policy.conditioned:
        raise ValueError(f"{type(policy).__name__} has no reward markers to read (unconditioned or no reward space)")
    if len(prompts) != len(responses) or len(prompts) < 2:
        raise ValueError(f"need the same number (>= 2) of prompts and responses, got {len(prompts)} / {len(responses)}")
    if rewards is None:
        rewards = space.normalize(score_all(space.build_rewards(), prompts, responses))
    z = np.asarray(rewards, dtype=float)
    if z.shape != (len(prompts), len(space.reward_names)):
        raise ValueError(f"rewards have shape {z.shape}, expected {(len(prompts), len(space.reward_names))}")
    own = policy.log_likelihood(prompts, responses, z)
    middle = (space.r_min + space.r_max) / 2
    out = {}
    for k, name in enumerate(space.reward_names):
        moved = z.copy()
        moved[:, k] = np.where(z[:, k] < middle[k], space.r_max[k], space.r_min[k])
        lost = own - policy.log_likelihood(prompts, responses, moved)
        out[name] = {
            "nats_mean": float(lost.mean()),
            "nats_sem": float(lost.std(ddof=1) / np.sqrt(len(lost))),
            "share_less_likely": float((lost > 0).mean()),
            "moved_by_mean": float(np.abs(moved[:, k] - z[:, k]).mean()),
        }
    return out

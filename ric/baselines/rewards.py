"""RiC's reward models as TRL reward functions, in the reward space's normalized units."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ric.rewards import RewardModel
from ric.space import RewardSpace


class NormalizedReward:
    """One reward model as a TRL reward function: the completions' scores, normalized with the reward
    space's statistics (those of the RiC run compared with), so that MORLHF's ``sum_i w_i r_i`` weighs the
    rewards in the units RiC's preferences use. TRL logs each function under its ``__name__``; the
    function counts its calls and time for the cost ledger.

    The reward models see the raw prompt (the dataset's ``raw_prompt`` column, as RiC's rollouts score it);
    the policy sees it through the prompt template."""

    def __init__(self, reward: RewardModel, space: RewardSpace) -> None:
        if reward.name not in space.reward_names:
            raise ValueError(f"reward {reward.name!r} is not in the reward space {list(space.reward_names)}")
        i = list(space.reward_names).index(reward.name)
        self.reward = reward
        self.mean, self.std = float(space.mean[i]), float(space.std[i])
        self.__name__ = reward.name
        self.calls = 0
        self.samples = 0
        self.seconds = 0.0

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], raw_prompt: Sequence[Any] | None = None, **_: Any
    ) -> list[float]:
        start = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or chat format
        raw = self.reward.score(list(raw_prompt if raw_prompt is not None else prompts), texts)
        values = (np.asarray(raw, dtype=float) - self.mean) / self.std
        self.calls += 1
        self.samples += len(texts)
        self.seconds += time.perf_counter() - start
        return values.tolist()


def weighted_reward(functions: Sequence[NormalizedReward], weights: Sequence[float], **batch: Any) -> np.ndarray:
    """``sum_i w_i r_i`` over a batch, as GRPO forms it from the functions and ``reward_weights`` before its
    group normalization (TRL's ``sum_then_normalize``)."""
    if len(functions) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(functions)} reward functions")
    return sum(w * np.asarray(f(**batch)) for f, w in zip(functions, weights))

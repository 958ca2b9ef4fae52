"""Rewards-in-Context: multi-objective alignment by reward-conditioned supervised fine-tuning."""

from ric.conditioning import RewardConditioning
from ric.mapping import desired_rewards
from ric.normalization import RewardNormalizer

__all__ = ["RewardConditioning", "RewardNormalizer", "desired_rewards"]
__version__ = "0.1.0"

"""Rewards-in-Context: multi-objective alignment by reward-conditioned supervised fine-tuning."""

import logging
from typing import Any

from ric.conditioning import RewardConditioning
from ric.mapping import desired_rewards
from ric.space import RewardSpace

# bitsandbytes, which peft imports whenever it is installed, looks for an optional CPU kernel on the hub as it
# is imported and warns when it cannot have it; nobody asked for quantization, so that one logger is quieted
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["RewardConditioning", "RewardSpace", "desired_rewards", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ric.load pulls in torch and Lightning: imported on first use, so ``import ric`` stays light
    if name == "load":
        from ric.loading import load

        return load
    raise AttributeError(f"module 'ric' has no attribute {name!r}")

"""Small policies the tests share (imported by test modules, after conftest has set the offline environment)."""

import torch

from ric.conditioning import RewardConditioning
from ric.interfaces import ConditionalPolicy


class EchoPolicy(ConditionalPolicy):
    """The smallest conditioned policy: its answer is its conditioned prompt."""

    def __init__(self):
        super().__init__()
        self.conditioning = RewardConditioning(["a", "b"], template="{prompt} {rewards} =>")
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def generate(self, prompts, desired_rewards=None, **sampling):
        return self.condition(prompts, desired_rewards)

import numpy as np
import pytest
import torch
from policies import EchoPolicy

from ric.interfaces import ConditionalPolicy
from ric.rewards import FunctionReward, RewardModel


class WordCount(RewardModel):
    def __init__(self):
        super().__init__("verbosity", batch_size=2)
        self.calls = 0

    def score_batch(self, prompts, samples):
        self.calls += 1
        return torch.tensor([len(s.split()) for s in samples], dtype=torch.float64)


def test_reward_model_batches_and_returns_float_cpu():
    r = WordCount()
    out = r.score(["p"] * 5, ["a", "a b", "a b c", "", "x y"])
    assert out.dtype == torch.float32 and out.tolist() == [1, 2, 3, 0, 2]
    assert r.calls == 3
    assert r.score([], []).shape == (0,)


def test_reward_model_rejects_bad_output():
    nan = FunctionReward("bad", lambda p, s: [0.0 if x else float("nan") for x in s])
    with pytest.raises(ValueError, match=r"reward 'bad' returned nan for sample 2"):
        nan.score(["p"] * 3, ["a", "b", ""])
    short = FunctionReward("short", lambda p, s: [0.0])
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
        short.score(["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts for 1 samples"):
        short.score(["p", "q"], ["a"])
    with pytest.raises(ValueError, match="batch_size"):
        FunctionReward("x", lambda p, s: s, batch_size=0)


def test_policy_interface_is_abstract_and_conditions():
    with pytest.raises(TypeError):
        ConditionalPolicy()
    policy = EchoPolicy()
    assert policy.generate(["q"], np.array([1.0, -2.0])) == ["q <R1> 1.0 <R2> -2.0 =>"]
    assert policy.generate(["q1", "q2"], None) == ["q1 =>", "q2 =>"]
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*\['a', 'b'\]"):
        policy.generate(["q"], np.array([[1.0, 2.0, 3.0]]))

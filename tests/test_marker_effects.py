"""The marker-effect check: a marker the training data ties to the response is read, a random one is not."""

import numpy as np
import pytest
import torch

from ric.mapping import RewardRange
from ric.marker_effects import marker_effects
from ric.space import RewardSpace
from ric.text.policy import TextPolicy

TEMPLATE = "Q: {prompt} {rewards}\nA:"
SHORT, LONG = "Yes.", "No, not today, and not tomorrow either."


@pytest.fixture(scope="module")
def trained(tiny_llama):
    """The tiny Llama fine-tuned where reward ``a`` says which answer follows and reward ``b`` is noise."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    policy = TextPolicy(model=tiny_llama, reward_names=["a", "b"], template=TEMPLATE, lora_r=0)
    prompts = [f"question {i}" for i in range(8) for _ in range(2)]
    responses = [SHORT, LONG] * 8
    z = np.stack([np.tile([1.0, -1.0], 8), rng.choice([-1.0, 1.0], 16)], axis=1)
    policy.set_reward_space(RewardSpace.fit(["a", "b"], z, RewardRange(kind="data")))
    examples = [{"prompt": policy.training_prompt(p, v), "response": r} for p, v, r in zip(prompts, z, responses)]
    optimizer = torch.optim.AdamW(policy.lm.parameters(), lr=1e-2)
    policy.train()
    for _ in range(45):
        loss = policy(**policy.collate(examples))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return policy, prompts, responses, z


def test_the_marker_that_decides_the_answer_is_read_and_the_random_one_is_not(trained):
    policy, prompts, responses, z = trained
    effects = marker_effects(policy, prompts, responses, z)
    assert set(effects) == {"a", "b"}
    assert effects["a"]["share_less_likely"] == 1.0 and effects["a"]["nats_mean"] > 1.0
    assert abs(effects["b"]["nats_mean"]) < 0.1 * effects["a"]["nats_mean"]
    assert effects["a"]["moved_by_mean"] == pytest.approx(2.0)  # +-1 moved to the other end of the data range
    assert policy.training  # the check leaves the mode it found


def test_log_likelihood_is_the_sum_over_the_response_tokens(trained):
    policy, prompts, responses, z = trained
    ll = policy.log_likelihood(prompts[:2], responses[:2], z[:2])
    policy.eval()
    rows = policy.training_rows(
        [{"prompt": policy.training_prompt(p, v), "response": r} for p, v, r in zip(prompts[:2], z[:2], responses[:2])]
    )
    for (ids, labels), value in zip(rows, ll):
        with torch.no_grad():
            logp = torch.log_softmax(policy.lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
        assert value == pytest.approx(expected, rel=1e-2)  # padded batch vs one row: kernel rounding
    policy.train()


def test_bad_inputs_are_refused(trained):
    policy, prompts, responses, z = trained
    with pytest.raises(ValueError, match="same number"):
        marker_effects(policy, prompts[:3], responses[:2], z[:2])
    with pytest.raises(ValueError, match="shape"):
        marker_effects(policy, prompts[:2], responses[:2], z[:2, :1])

"""MORLHF and Rewarded Soups on TRL's GRPO: rewards, weight interpolation, the sweep, resuming, costs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ric.space import RewardSpace

TEMPLATE = "Q: {prompt} {rewards}\nA:"
POLICY = {"template": TEMPLATE, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "max_new_tokens": 6}


def _space(names, mean, std):
    return RewardSpace.fit(names, np.random.default_rng(0).normal(size=(50, len(names)))).with_statistics(
        np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    )


def test_grpo_reward_is_the_weighted_sum_of_normalized_rewards():
    from ric.baselines.rewards import NormalizedReward, weighted_reward
    from ric.text.rewards import Readability, Verbosity

    rewards = [Verbosity(), Readability()]
    space = _space(["verbosity", "readability"], [0.5, -1.0], [2.0, 4.0])
    functions = [NormalizedReward(r, space) for r in rewards]
    assert [f.__name__ for f in functions] == ["verbosity", "readability"]
    prompts = ["Q: how? \nA:", "Q: why? \nA:"]
    raw_prompts = ["how?", "why?"]
    completions = ["Short.", "A much longer answer that goes on and on about the question it was asked."]
    raw = np.stack([r.score(raw_prompts, completions).numpy() for r in rewards], axis=1)
    by_hand = 0.3 * (raw[:, 0] - 0.5) / 2.0 + 0.7 * (raw[:, 1] + 1.0) / 4.0
    got = weighted_reward(functions, [0.3, 0.7], prompts=prompts, completions=completions, raw_prompt=raw_prompts)
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    # TRL's conversational completions carry the text in the last message
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    np.testing.assert_allclose(functions[0](prompts, chat, raw_prompt=raw_prompts), (raw[:, 0] - 0.5) / 2.0)
    assert functions[0].calls == 2 and functions[0].samples == 4
    with pytest.raises(ValueError, match="2 weights for 1"):
        weighted_reward(functions[:1], [0.5, 0.5], prompts=prompts, completions=completions)


def test_a_resumed_rl_run_counts_the_cost_of_the_killed_one(tiny_llama, tmp_path):
    """The TRL checkpoint a killed run leaves carries its seconds and reward calls into the resumed run."""
    import time

    from ric.baselines.grpo import CostLedger, GRPOSettings, train_adapter
    from ric.baselines.policy import MORLHFPolicy
    from ric.baselines.rewards import NormalizedReward
    from ric.text.rewards import Readability, Verbosity

    space = _space(["verbosity", "readability"], [0.0, 0.0], [1.0, 1.0])
    rewards = [NormalizedReward(Verbosity(), space), NormalizedReward(Readability(), space)]
    prompts, folder = ["how do I water a plant?", "why is the sky blue?"], tmp_path / "policy0"
    grpo = {"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 6, "save_steps": 1}

    def policy():
        return MORLHFPolicy([], [], model=tiny_llama, reward_names=["verbosity", "readability"], **POLICY)

    first = train_adapter(policy(), "rl0", rewards, [0.5, 0.5], prompts, GRPOSettings(steps=1, **grpo), folder)
    kept = folder / "trl" / "checkpoint-1" / CostLedger.FILE
    per_step = 2 * 2 * len(rewards)  # prompts x generations, scored by each reward
    assert first["reward_calls"] == per_step and json.loads(kept.read_text())["reward_calls"] == per_step
    (folder / "cost.json").unlink()  # as if killed after the checkpoint at step 1
    kept.write_text(json.dumps({"seconds": 1000.0, "reward_calls": 50, "reward_seconds": 3.0}))
    started = time.perf_counter()
    again = train_adapter(policy(), "rl0", rewards, [0.5, 0.5], prompts, GRPOSettings(steps=2, **grpo), folder)
    assert again["steps"] == 2 and again["resumed_from"].endswith("checkpoint-1")
    assert 1000.0 < again["train_seconds"] < 1000.0 + time.perf_counter() - started
    assert again["reward_calls"] == 50 + per_step and again["reward_seconds"] > 3.0


def _experts(tiny_llama, tmp_path, n=2):
    """``n`` LoRA adapters with non-zero random weights, saved as peft folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ric.text.policy import LLAMA_PROJECTIONS

    folders = []
    for i in range(n):
        torch.manual_seed(10 + i)
        lm = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama),
            LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"),
        )
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
        lm.save_pretrained(tmp_path / f"expert{i}")
        folders.append(str(tmp_path / f"expert{i}"))
    return folders


def _delta(policy, adapter):
    """The merged weight change ``B A * scale`` of one projection, for ``adapter``."""
    layer = policy.lm.base_model.model.model.layers[0].self_attn.q_proj
    return layer.get_delta_weight(adapter).detach().clone()


def test_soup_interpolates_the_merged_expert_weights(tiny_llama, tmp_path):
    from ric.baselines.policy import SoupPolicy

    policy = SoupPolicy(_experts(tiny_llama, tmp_path), model=tiny_llama, reward_names=["a", "b"], **POLICY)
    d0, d1 = _delta(policy, "policy0"), _delta(policy, "policy1")
    base = policy.lm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.detach().clone()
    for w, expected in (
        ([1.0, 0.0], d0),
        ([0.0, 1.0], d1),
        ([0.5, 0.5], (d0 + d1) / 2),
        ([0.2, 0.8], 0.2 * d0 + 0.8 * d1),
    ):
        with policy.preference_context(w):
            torch.testing.assert_close(_delta(policy, "soup"), expected, rtol=1e-5, atol=1e-6)
            with policy.generation_session():  # merged into the base for generation
                merged = policy.lm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
                torch.testing.assert_close(merged, base + expected, rtol=1e-5, atol=1e-6)
        assert "soup" not in policy.lm.peft_config  # mixed per call, not kept
    # the authors' script averages A and B separately: a different model
    layer = policy.lm.base_model.model.model.layers[0].self_attn.q_proj
    a = (layer.lora_A["policy0"].weight + layer.lora_A["policy1"].weight) / 2
    b = (layer.lora_B["policy0"].weight + layer.lora_B["policy1"].weight) / 2
    assert not torch.allclose(b @ a * layer.scaling["policy0"], (d0 + d1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        policy.preference_context([0.2, 0.3, 0.5])


def test_morlhf_runs_the_policy_trained_for_the_preference(tiny_llama, tmp_path):
    from ric.baselines.policy import MORLHFPolicy

    folders = _experts(tiny_llama, tmp_path)
    policy = MORLHFPolicy(folders, [[1.0, 0.0], [0.0, 1.0]], model=tiny_llama, reward_names=["a", "b"], **POLICY)
    with policy.preference_context([0.0, 1.0]):
        assert policy.lm.active_adapters == ["policy1"]
    assert policy.lm.active_adapters == ["default"]
    with pytest.raises(ValueError, match=r"no policy trained for preference \[0.5, 0.5\]"):
        policy.preference_context([0.5, 0.5])
    steered = policy.steer(["how do I water a plant?"], [1.0, 0.0], seed=0, max_new_tokens=4)
    assert steered[0].preference == [1.0, 0.0] and steered[0].desired_rewards is None


def _config(tiny_llama, text_data, tmp_path, preferences=None):
    cfg = {
        "policy": {"model": tiny_llama, **POLICY},
        "data": {"class_path": "ric.data.RelabelDataModule", "init_args": {
            "dataset": {"class_path": "ric.data.JsonlExamples", "init_args": {"path": str(text_data)}},
            "rewards": [{"class_path": "ric.text.rewards.Verbosity"}, {"class_path": "ric.text.rewards.Readability"}],
            "test_fraction": 0.2, "max_test_prompts": 3, "cache_dir": str(tmp_path / "cache"), "progress": False}},
        "grpo": {"steps": 2, "num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 6, "save_steps": 1},
        "sweep": {"class_path": "ric.evaluation.PreferenceSweep", "init_args": {
            "preferences": [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], "sampling": {"max_new_tokens": 6}}},
        "output_dir": str(tmp_path / "out"),
        "max_train_prompts": 8,
    }  # fmt: skip
    if preferences is not None:
        cfg["preferences"] = preferences
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(cfg))
    return path


def test_morlhf_command_trains_one_policy_per_preference_and_writes_a_front(tiny_llama, text_data, tmp_path):
    from ric.cli import main

    config = _config(tiny_llama, text_data, tmp_path, preferences=[[1.0, 0.0], [0.0, 1.0]])
    assert main(["baseline", "morlhf", "--config", str(config)]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "sweep" / "metrics.json").read_text())
    assert metrics["label"] == "MORLHF" and metrics["num_preferences"] == 2
    cost = metrics["cost"]
    assert cost["rl_runs"] == 2 and cost["train_seconds"] > 0 and cost["sweep_seconds"] > 0
    assert cost["generated_samples_training"] == 2 * 2 * 4 and cost["reward_calls_training"] > 0
    assert cost["training_tokens"] > 0
    assert [c["weights"] for c in cost["per_run"]] == [[1.0, 0.0], [0.0, 1.0]]
    rows = [json.loads(line) for line in (out / "sweep" / "samples.jsonl").read_text().splitlines()]
    assert {tuple(r["preference"]) for r in rows} == {(1.0, 0.0), (0.0, 1.0)}
    assert all("<R" not in r["prompt"] for r in rows)  # no reward markers: the weights carry the preference
    # the same policies swept as they were after their first GRPO step: a point of the cost curve, no retraining
    stamp = (out / "policy0" / "cost.json").stat().st_mtime_ns
    assert main(["baseline", "morlhf", "--config", str(config), "--at_step", "1"]) == 0
    early = json.loads((out / "sweep-step1" / "metrics.json").read_text())["cost"]
    assert (out / "policy0" / "cost.json").stat().st_mtime_ns == stamp
    assert early["at_step"] == 1 and [c["steps"] for c in early["per_run"]] == [1, 1]
    assert 0 < early["train_seconds"] < cost["train_seconds"]
    assert early["generated_samples_training"] == cost["generated_samples_training"] // 2
    assert main(["baseline", "morlhf", "--config", str(config), "--at_step", "3"]) == 2  # not a saved step


def test_soups_sweep_mixes_per_row_and_a_killed_run_keeps_finished_experts(
    tiny_llama, text_data, tmp_path, monkeypatch
):
    import ric.baselines.grpo as grpo
    from ric.baselines.methods import main
    from ric.baselines.policy import SoupPolicy

    config = _config(tiny_llama, text_data, tmp_path)
    calls = []
    real = grpo.train_adapter

    def crash_on_second(policy, name, rewards, weights, *args):
        calls.append(list(weights))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training the second expert
        return real(policy, name, rewards, weights, *args)

    monkeypatch.setattr("ric.baselines.methods.train_adapter", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        main(["soups", "--config", str(config)])
    first = tmp_path / "out" / "policy0" / "cost.json"
    assert first.is_file() and not (tmp_path / "out" / "policy1" / "cost.json").exists()
    stamp = first.stat().st_mtime_ns
    mixed = []
    context = SoupPolicy.preference_context

    def spy(self, preference):
        mixed.append(list(preference))
        return context(self, preference)

    monkeypatch.setattr(SoupPolicy, "preference_context", spy)
    monkeypatch.setattr("ric.baselines.methods.train_adapter", real)
    assert main(["soups", "--config", str(config)]) == 0
    assert first.stat().st_mtime_ns == stamp  # the finished expert was not retrained
    assert mixed == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]  # one mixture per sweep row, in order
    metrics = json.loads((tmp_path / "out" / "sweep" / "metrics.json").read_text())
    assert metrics["label"] == "Rewarded Soups" and metrics["cost"]["rl_runs"] == 2
    assert [c["weights"] for c in metrics["cost"]["per_run"]] == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).parents[1] / "configs" / "baselines").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_baseline_config_parses(config):
    import yaml

    from ric.baselines.methods import MORLHF, RewardedSoups, from_args

    kind = "morlhf" if config.name.startswith("morlhf") else "soups"
    method = from_args([kind, "--config", str(config)])
    assert isinstance(method, {"morlhf": MORLHF, "soups": RewardedSoups}[kind])
    quickstart = yaml.safe_load((config.parents[1] / "quickstart_text.yaml").read_text())
    same = ("model", "template", "lora_r", "lora_alpha", "max_new_tokens")
    assert {k: method.policy_args[k] for k in same} == {k: quickstart["model"]["init_args"][k] for k in same}
    assert method.data.reward_names == quickstart["model"]["init_args"]["reward_names"]
    assert method.training_preferences()  # the RL runs it will train
    assert method.grpo.steps > 0
    # the method hands its label, preferences and folder to the sweep when it runs, leaving the settings as given
    assert method.sweep.output_dir is None and method.sweep.preferences is None and method.sweep.label == "RiC"


def test_baseline_command_errors_name_the_value(tmp_path, capsys):
    from ric.cli import main

    assert main(["baseline", "ppo"]) == 2
    assert "ric baseline {morlhf|soups}" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text((Path(__file__).parents[1] / "configs" / "baselines" / "morlhf_quickstart.yaml").read_text())
    assert main(["baseline", "morlhf", "--config", str(config), "--preferences", "[[0.5, 0.6]]"]) == 2
    assert "0.5, 0.6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # jsonargparse's own message and exit status
        main(["baseline", "soups", "--config", str(config).replace("bad", "missing")])
    assert exit_.value.code == 2 and "missing.yaml" in capsys.readouterr().err

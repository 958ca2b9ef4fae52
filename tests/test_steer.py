"""Steering a trained model: ric.load, policy.steer, export, and the ric generate / chat / export commands."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ric
from ric.cli import main
from ric.loading import ModelFileError, read_model_info

ROOT = Path(__file__).resolve().parents[1]
SWEEP_SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}


def ric_here(capsys, *args):
    """The ric command in this process (bad input is refused before any model loads)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_ric(*args, input=None):
    """The ric command in a fresh process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "ric.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=300, cwd=ROOT)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_steer_gives_the_sweeps_samples_for_its_seed(trained):
    rows = [json.loads(line) for line in (trained["sweep"] / "samples.jsonl").read_text().splitlines()]
    policy = ric.load(trained["ckpt"])
    assert policy.reward_space.method == "linear" and policy.reward_space.range_source["kind"] == "data"
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    for w in ([0.0, 1.0], [1.0, 0.0]):
        expected = [r for r in rows if r["preference"] == w]
        steered = policy.steer(prompts, w, num_samples=2, seed=5, **SWEEP_SAMPLING)
        assert [s.sample for s in steered] == [r["response"] for r in expected]
        assert [s.prompt for s in steered] == [r["prompt"] for r in expected]
        np.testing.assert_allclose(steered[0].desired_rewards, expected[0]["desired"])
        assert steered[0].preference == w
    again = policy.steer(prompts, [1.0, 0.0], num_samples=2, seed=5, **SWEEP_SAMPLING)
    assert [s.sample for s in again] == [s.sample for s in steered]  # the same seed, the same samples


def test_run_sweep_is_a_plain_function_with_a_result_and_a_report(trained, tmp_path, capsys):
    """The sweep without a Trainer: a result object in prompt order (what steer gives for the seed), resumable
    from its kept preferences, and the report written from it."""
    from ric.report import print_report, write_front
    from ric.sweep import run_sweep

    policy = ric.load(trained["ckpt"])
    rewards = policy.reward_space.build_rewards()
    prompts = ["how do I water a fern?", "how do I water a cactus?"]
    prefs = [[1.0, 0.0], [0.0, 1.0]]
    result = run_sweep(policy, rewards, prompts, prefs, tmp_path / "sweep", settings=SWEEP_SAMPLING, seed=5)
    assert result.means.shape == (2, 2) and not result.unconditioned and result.method == "linear"
    assert result.samples[0] == [s.sample for s in policy.steer(prompts, [1.0, 0.0], seed=5, **SWEEP_SAMPLING)]
    np.testing.assert_allclose(result.obtained[1], policy.reward_space.normalize(result.raw[1]))
    again = run_sweep(policy, rewards, prompts, prefs, tmp_path / "sweep", settings=SWEEP_SAMPLING, seed=5)
    assert "preference 2 of 2 was finished before, reusing it" in capsys.readouterr().out
    assert again.samples == result.samples and again.seconds >= result.seconds * 0.5
    metrics = write_front(tmp_path / "report", result.reward_names, result.preferences, result.desired,
                          result.obtained, result.records(), {"label": "mine"})  # fmt: skip
    print_report(metrics, result.reward_names, result.preferences, result.desired, result.means)
    assert "hypervolume" in capsys.readouterr().out and metrics["num_preferences"] == 2
    rows = [json.loads(line) for line in (tmp_path / "report" / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == result.samples[0] + result.samples[1]
    plain = run_sweep(policy, rewards, prompts, None, tmp_path / "plain", settings=SWEEP_SAMPLING, seed=5)
    assert plain.unconditioned and plain.method is None and len(plain.samples) == 1


def test_the_sweep_records_the_cost_of_training_and_evaluation(trained):
    cost = json.loads((trained["sweep"] / "metrics.json").read_text())["cost"]
    assert cost["training_steps"] == 3 and cost["train_seconds"] > 0
    assert cost["training_examples"] == 3 * 4 and cost["training_tokens"] > cost["training_examples"]
    rows = (trained["sweep"] / "samples.jsonl").read_text().count("\n")
    assert cost["generated_samples_sweep"] == rows and cost["reward_calls_sweep"] == 2 * rows
    assert cost["sweep_seconds"] > 0


def test_the_training_ledger_survives_a_checkpoint():
    """A fit killed after its last checkpoint and resumed counts the seconds, steps and tokens of both; a
    checkpoint written without a ledger starts the count at its step; a test from a checkpoint carries none."""
    from types import SimpleNamespace as At

    from ric.cost import TrainingCost
    from ric.text.policy import TextPolicy

    def trainer(step, fn="fit"):
        return At(global_step=step, state=At(fn=fn))

    policy = At(training_cost=lambda batch: TextPolicy.training_cost(None, batch))  # counts as a TextPolicy does
    # two packed rows of 5 positions, 3 examples in all, one padding position
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1] * 4 + [0]]),
             "position_ids": torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]])}  # fmt: skip
    first = TrainingCost()
    first.on_load_checkpoint(trainer(10), policy, {})  # started from step 10 of a run that kept no ledger
    first.on_train_start(trainer(10), policy)
    first.on_train_batch_end(trainer(11), policy, None, batch, 0)
    saved = {}
    first.on_save_checkpoint(trainer(11), policy, saved)  # a checkpoint at step 11
    assert saved["ric_training_ledger"]["training_steps"] == 1 and saved["ric_training_ledger"]["training_tokens"] == 9
    resumed = TrainingCost()
    resumed.on_load_checkpoint(trainer(11), policy, saved)
    resumed.on_train_start(trainer(11), policy)
    for step in (12, 13):
        resumed.on_train_batch_end(trainer(step), policy, None, batch, 0)
    ledger = resumed.finish(trainer(13))
    assert ledger["training_steps"] == 3 and ledger["training_tokens"] == 27 and ledger["training_examples"] == 3 * 4
    assert ledger["train_seconds"] >= saved["ric_training_ledger"]["train_seconds"] > 0
    assert ledger["counted_from_step"] == 10
    assert resumed.finish(trainer(13)) == ledger  # the clock stopped at the first finish
    final = {}
    resumed.on_save_checkpoint(trainer(13), policy, final)
    finished = TrainingCost()  # resumed from the final checkpoint: nothing trains, all of it is carried
    finished.on_load_checkpoint(trainer(13), policy, final)
    assert finished.finish(trainer(13)) == ledger
    tested = TrainingCost()
    tested.on_load_checkpoint(trainer(13, fn="test"), policy, final)
    assert tested.finish(trainer(13)) == {}


def test_steer_per_prompt_preferences_and_explicit_rewards(trained):
    policy = ric.load(trained["ckpt"])
    mixed = policy.steer(["q one", "q two"], [[1.0, 0.0], [0.0, 1.0]], do_sample=False)
    alone = [policy.steer([p], w, do_sample=False)[0] for p, w in (("q one", [1.0, 0.0]), ("q two", [0.0, 1.0]))]
    assert [s.sample for s in mixed] == [s.sample for s in alone]
    assert [s.desired_rewards for s in mixed] == [s.desired_rewards for s in alone]
    explicit = policy.steer("q one", desired_rewards=[0.5, -0.5], do_sample=False)[0]
    assert explicit.preference is None and explicit.desired_rewards == [0.5, -0.5]
    with pytest.raises(ValueError, match="sums to 1.1"):
        policy.steer("q", [0.5, 0.6])
    with pytest.raises(ValueError, match="not both"):
        policy.steer("q", [1.0, 0.0], desired_rewards=[0.0, 0.0])
    with pytest.raises(ValueError, match="needs a preference"):
        policy.steer("q")
    with pytest.raises(ValueError, match="empty"):
        policy.steer(["  "], [1.0, 0.0])
    with pytest.raises(ValueError, match="3 preference rows for 2 prompts"):
        policy.steer(["a", "b"], [[1.0, 0.0]] * 3)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_export_then_load_steers_like_the_checkpoint(trained, tmp_path, merge):
    policy = ric.load(trained["ckpt"])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    folder = policy.export(tmp_path / "export", merge=merge)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the live model is unchanged
    meta = json.loads((folder / "ric.json").read_text())
    assert meta["schema_version"] == 2 and meta["export"]["merged"] is merge
    card = (folder / "README.md").read_text()
    assert "verbosity" in card and "ric generate" in card and "linear" in card
    loaded = ric.load(folder)
    prompts = ["how do I water a fern?", "why is the sky blue?"]
    for w in ([1.0, 0.0], [0.3, 0.7]):
        ours = [s.sample for s in policy.steer(prompts, w, do_sample=False, max_new_tokens=8)]
        theirs = [s.sample for s in loaded.steer(prompts, w, do_sample=False, max_new_tokens=8)]
        assert ours == theirs
    np.testing.assert_allclose(loaded.reward_space.desired([0.3, 0.7]), policy.reward_space.desired([0.3, 0.7]))


def test_schema_1_exports_and_checkpoints_still_load(trained, tmp_path):
    policy = ric.load(trained["ckpt"])
    space = policy.reward_space
    old_meta = {
        "conditioning": policy.ric_metadata()["conditioning"],
        "conditioned": True,
        "normalization": {"schema_version": 1, "reward_names": space.reward_names, "mean": space.mean.tolist(),
                          "std": space.std.tolist(), "fitted_on": {}},
    }  # fmt: skip
    folder = policy.export(tmp_path / "old")
    (folder / "ric.json").write_text(json.dumps(old_meta))
    old = ric.load(folder)
    np.testing.assert_allclose(old.reward_space.mean, space.mean)
    assert old.reward_space.method == "p_inf"  # schema 1 recorded no mapping: the paper's default
    assert (
        old.steer("q", [1.0, 0.0], do_sample=False, max_new_tokens=4)[0].sample
        == policy.steer("q", desired_rewards=old.reward_space.desired([1.0, 0.0]), do_sample=False, max_new_tokens=4)[
            0
        ].sample
    )
    ckpt = torch.load(trained["ckpt"], weights_only=False)
    ckpt["ric"] = old_meta  # as written before the reward space: no policy class, statistics only
    old_ckpt = tmp_path / "ckpt" / "old.ckpt"
    old_ckpt.parent.mkdir()
    torch.save(ckpt, old_ckpt)
    (tmp_path / "config.yaml").write_text((trained["root"] / "config.yaml").read_text())  # the run's config beside it
    restored = ric.load(old_ckpt)
    np.testing.assert_allclose(restored.reward_space.std, space.std)


def test_loading_refuses_what_is_not_a_model(trained, tmp_path):
    with pytest.raises(ModelFileError, match="no model at"):
        ric.load(tmp_path / "missing")
    with pytest.raises(ModelFileError, match="has no ric.json"):
        ric.load(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ric.json").write_text(json.dumps({"schema_version": 7}))
    with pytest.raises(ModelFileError, match="schema_version 7"):
        ric.load(tmp_path / "bad")
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(trained["ckpt"].read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"cut.ckpt cannot be read \(truncated or corrupt\)"):
        ric.load(truncated)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.ckpt is empty"):
        ric.load(tmp_path / "empty.ckpt")
    ckpt = torch.load(trained["ckpt"], weights_only=False)
    del ckpt["ric"]
    torch.save(ckpt, tmp_path / "plain.ckpt")
    with pytest.raises(ModelFileError, match="lacks the ric metadata"):
        ric.load(tmp_path / "plain.ckpt")
    ckpt = torch.load(trained["ckpt"], weights_only=False)
    (tmp_path / "mismatch").mkdir()
    torch.save(ckpt, tmp_path / "mismatch" / "last.ckpt")
    config = json.loads((trained["root"] / "config.yaml").read_text())
    config["model"]["init_args"]["reward_names"] = ["verbosity", "humor"]
    (tmp_path / "mismatch" / "config.yaml").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"trained on rewards \['verbosity', 'readability'\].*humor"):
        read_model_info(tmp_path / "mismatch" / "last.ckpt")


def test_ric_generate_scores_and_writes_jsonl(trained, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("how do I cook rice?", "what is rain?")))
    code, stdout, stderr = run_ric("generate", trained["ckpt"], "--preference", "1,0", "--prompts", prompts,
                                   "--num-samples", "2", "--seed", "3", "--score", "--out", out,
                                   "--max-new-tokens", "6")  # fmt: skip
    assert code == 0, stderr
    assert "desired rewards for w = (1.00, 0.00) [linear mapping]: verbosity" in stdout and "obtained:" in stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and [r["prompt"] for r in lines] == ["how do I cook rice?"] * 2 + ["what is rain?"] * 2
    assert set(lines[0]) == {"prompt", "preference", "desired_rewards", "response", "obtained_rewards"}
    assert lines[0]["preference"] == [1.0, 0.0] and set(lines[0]["obtained_rewards"]) == {"verbosity", "readability"}
    # the obtained rewards are the responses' own scores, normalized by the model's reward space
    policy = ric.load(trained["ckpt"])
    rewards = policy.reward_space.build_rewards()
    from ric.rewards import score_all

    raw = score_all(rewards, [r["prompt"] for r in lines], [r["response"] for r in lines])
    np.testing.assert_allclose(
        policy.reward_space.normalize(raw), [list(r["obtained_rewards"].values()) for r in lines]
    )
    # the same seed in Python gives the same responses
    steered = policy.steer(
        ["how do I cook rice?", "what is rain?"], [1.0, 0.0], num_samples=2, seed=3, max_new_tokens=6
    )
    assert [s.sample for s in steered] == [r["response"] for r in lines]


def test_ric_generate_with_reward_guidance(trained, capsys):
    """--guidance reaches the engine: the same seed gives the same answers as steer with the same guidance."""
    args = ("generate", trained["ckpt"], "--prompt", "how do I cook rice?", "--preference", "1,0", "--seed", "3",
            "--max-new-tokens", "6", "--guidance", "1.5", "--guidance-reference", "mirror")  # fmt: skip
    code, stdout, stderr = ric_here(capsys, *args)
    assert code == 0, stderr
    assert "[linear mapping, reward guidance g = 1.5]" in stdout
    policy = ric.load(trained["ckpt"])
    guided = policy.steer("how do I cook rice?", [1.0, 0.0], seed=3, max_new_tokens=6, guidance=1.5,
                          guidance_reference="mirror")[0].sample  # fmt: skip
    assert guided in stdout
    with pytest.raises(SystemExit) as exited:  # argparse's refusal of a choice it does not offer
        ric_here(capsys, *args[:-2], "--guidance-reference", "opposite")
    assert exited.value.code == 2 and "invalid choice: 'opposite'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preference", "0.5,0.6"], "sums to 1.1"),
        (["--preference", "1.0"], "has 1 entries, expected 2"),
        (["--preference", "a,b"], "'a,b' is not a list of numbers"),
        (["--preference", "1.5,-0.5"], "negative entries"),
        (["--desired-rewards", "1,nan"], "need 2 finite values"),
        (["--preference", "1,0", "--method", "p_two"], "invalid choice: 'p_two'"),
        (["--preference", "1,0", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--preference", "1,0", "--temperature", "-1"], "temperature must be a number > 0, got -1.0"),
        (["--preference", "1,0", "--guidance", "-1"], "guidance must be a number >= 0"),
        ([], "give --preference"),
    ],
)
def test_ric_generate_bad_input_is_one_line_with_exit_code_2(trained, tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) if "invalid choice" in message else _nothing() as exited:
        code, stdout, stderr = ric_here(capsys, "generate", trained["ckpt"], "--prompt", "hi", "--out", out, *args)
    if exited is not None:  # argparse's own refusal: exit code 2 as well
        code, stderr = exited.value.code, capsys.readouterr().err
    assert code == 2 and message in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()


@contextlib.contextmanager
def _nothing():
    yield None


def test_ric_generate_bad_paths(trained, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ((tmp_path / "nope.ckpt", "--prompt", "hi"), "no model at"),
        ((tmp_path, "--prompt", "hi"), "is not a ric model folder: it has no ric.json"),
        ((trained["ckpt"], "--prompts", empty), "holds no prompts"),
        ((trained["ckpt"], "--prompts", tmp_path / "none.jsonl"), "prompts file not found"),
    ]
    for args, message in cases:
        code, _, stderr = ric_here(capsys, "generate", *args, "--preference", "1,0")
        assert code == 2 and message in stderr and "Traceback" not in stderr, stderr


def test_ric_export_command_and_chat_through_stdin(trained, tmp_path, capsys):
    code, stdout, stderr = run_ric("export", trained["ckpt"], tmp_path / "model")
    assert code == 0, stderr
    assert (tmp_path / "model" / "ric.json").is_file() and (tmp_path / "model" / "README.md").is_file()
    code, _, stderr = ric_here(capsys, "export", trained["ckpt"], tmp_path / "model")
    assert code == 2 and "already exists" in stderr
    chat_input = "how do I sleep well?\n/w 1 0\nwhat is tea?\n/rewards 1.0 -0.5\nany tips?\n/w 0.5\n/quit\n"
    code, stdout, stderr = run_ric("chat", tmp_path / "model", "--max-new-tokens", "5", "--seed", "0", input=chat_input)
    assert code == 0, stderr
    desired = [line for line in stdout.splitlines() if line.startswith("[desired:")]
    assert len(desired) == 3 and len(set(desired)) == 3
    assert "[desired: verbosity +1.00, readability -0.50]" in desired[2]
    assert stdout.count("ric> ") == 3 and "error: preference [0.5] has 1 entries, expected 2" in stdout


def test_diffusion_loads_steers_and_generates(trained_sd, tmp_path):
    policy = ric.load(trained_sd)
    steered = policy.steer(["a red circle on a grey background"], [1.0, 0.0], num_samples=2, seed=1)
    assert len(steered) == 2 and all(isinstance(s.sample, Image.Image) for s in steered)
    again = policy.steer(["a red circle on a grey background"], [1.0, 0.0], num_samples=2, seed=1)
    assert all(np.array_equal(np.asarray(a.sample), np.asarray(b.sample)) for a, b in zip(steered, again))
    folder = policy.export(tmp_path / "sd_export")
    exported = ric.load(folder).steer(["a red circle on a grey background"], [1.0, 0.0], num_samples=2, seed=1)
    assert all(np.array_equal(np.asarray(a.sample), np.asarray(b.sample)) for a, b in zip(steered, exported))
    code, stdout, stderr = run_ric("generate", folder, "--preference", "0,1", "--prompt", "a blue square",
                                   "--image-dir", tmp_path / "images", "--out", tmp_path / "images.jsonl")  # fmt: skip
    assert code == 0, stderr
    row = json.loads((tmp_path / "images.jsonl").read_text())
    assert Path(row["response"]).is_file() and row["response"] in stdout
    assert Image.open(row["response"]).size == (16, 16)


def test_main_dispatches_lightning_and_user_commands(capsys):
    assert main([]) == 2  # no command: the overview
    assert "export" in capsys.readouterr().out


def test_a_gguf_loaded_model_exports_and_loads_back(tmp_path):
    """transformers keeps its GGUF marker on a model whose weights it dequantized, and refuses to save it."""
    from ric.space import RewardSpace
    from ric.text.policy import TextPolicy

    lora = {"lora_r": 2, "lora_alpha": 4, "lora_target_modules": ["q_proj"], "lora_layers": [0]}
    policy = TextPolicy(model="smollm2", reward_names=["a", "b"], max_new_tokens=4, **lora)
    assert policy.lm.get_base_model().hf_quantizer is not None
    policy.set_reward_space(RewardSpace.fit(["a", "b"], np.random.default_rng(0).normal(size=(10, 2))))
    folder = policy.export(tmp_path / "gguf-export")
    assert policy.lm.get_base_model().hf_quantizer is not None  # the live model keeps what it had
    loaded = ric.load(folder)
    prompt = ["Why is the sky blue?"]
    theirs = loaded.steer(prompt, [0.5, 0.5], do_sample=False)[0].sample
    assert theirs == policy.steer(prompt, [0.5, 0.5], do_sample=False)[0].sample
    # and transformers' Trainer (TRL's GRPO for the baselines) accepts it once the marker is dropped
    from transformers.trainer_utils import validate_quantization_for_training

    from ric.text.models import drop_gguf_marker

    with pytest.raises(ValueError, match="GGUF"):
        validate_quantization_for_training(policy.lm)
    assert drop_gguf_marker(policy.lm.get_base_model())
    validate_quantization_for_training(policy.lm)

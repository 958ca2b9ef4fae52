"""Mistakes a user makes, each refused with an error that names the offending value, before any training step
(and, for settings that need no model, before any weights load)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cli_config

import ric
from ric.cli import main
from ric.data import read_jsonl
from ric.loading import ModelFileError
from ric.space import RewardSpace

SWEEP = "ric.evaluation.PreferenceSweep"
ONLINE = "ric.online.OnlineLoop"


@pytest.fixture()
def base_config(tmp_path, tiny_llama, text_data):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
        {"class_path": SWEEP, "init_args": {"num_points": 3, "after_fit": True}},
    ]  # fmt: skip
    path = tiny_cli_config(tmp_path, tiny_llama, text_data, {"verbosity": "Verbosity", "readability": "Readability"},
                           callbacks, limit_val_batches=0)  # fmt: skip
    return json.loads(path.read_text())


def run_fit(tmp_path, config, capsys, monkeypatch, *extra, loads_model=False):
    """``ric fit`` in this process; returns the one-line error. Nothing may train or score, and where the
    setting needs no model, the model's weights may not even load."""
    import ric.text.policy

    if not loads_model:

        def refuse(*args, **kwargs):
            raise AssertionError("the model was loaded before the bad setting was found")

        monkeypatch.setattr(ric.text.policy, "load_causal_lm", refuse)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config))
    code = main(["fit", "--config", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "cache").exists()  # no step, no scoring
    lines = [line for line in err.strip().splitlines() if line.startswith("ric fit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def callback(config, class_path):
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"] == class_path)["init_args"]


def with_online(config, **settings):
    config["trainer"]["callbacks"].append({"class_path": ONLINE, "init_args": settings})
    return config


SWEEP_CASES = [
    ({"preferences": [[0.5, 0.6]]}, "sums to 1.1"),
    ({"preferences": [[1.0]]}, "has 1 entries, expected 2"),
    ({"preferences": [[1.5, -0.5]]}, "negative entries"),
    ({"preferences": []}, "preferences is empty"),
    ({"method": "p_norm", "p": 1.0}, "p must be > 1, got 1.0"),
    ({"num_points": 1}, "num_points must be >= 2, got 1"),
    ({"reference": [0.0]}, "reference [0.0] has 1 values for 2 rewards"),
    ({"samples_per_prompt": 0}, "samples_per_prompt must be >= 1, got 0"),
    ({"marker_responses": -1}, "marker_responses must be >= 0 (0 = not measured), got -1"),
    ({"reward_range": "data"}, "PreferenceSweep.reward_range moved to the reward space"),
]


@pytest.mark.parametrize("settings, message", SWEEP_CASES, ids=[m for _, m in SWEEP_CASES])
def test_sweep_settings(tmp_path, base_config, capsys, monkeypatch, settings, message):
    callback(base_config, SWEEP).update(settings)
    line = run_fit(tmp_path, base_config, capsys, monkeypatch)
    assert message in line and "trainer.callbacks[1] (PreferenceSweep)" in line


ONLINE_CASES = [
    ({"original_ratio": -0.5}, "original_ratio must be >= 0 (a share of the online buffer), got -0.5"),
    ({"quantile": 1.5}, "quantile must be in [0, 1], got 1.5"),
    ({"prompts_per_iteration": 0}, "prompts_per_iteration must be an integer >= 1, got 0"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
    ({"r_min": -1.0}, "OnlineLoop.r_min moved to the reward space"),
]


@pytest.mark.parametrize("settings, message", ONLINE_CASES, ids=[m[:40] for _, m in ONLINE_CASES])
def test_online_settings(tmp_path, base_config, capsys, monkeypatch, settings, message):
    line = run_fit(tmp_path, with_online(base_config, **settings), capsys, monkeypatch)
    assert message in line and "(OnlineLoop)" in line


DATA_CASES = [
    ({"range_quantiles": [0.9, 0.1]}, "range_quantiles must satisfy 0 <= low < high <= 1"),
    ({"r_min": [-1.0, -1.0, -1.0]}, "r_min [-1.0, -1.0, -1.0] has shape (3,), expected a scalar or 2 values"),
    ({"method": "p_norm", "p": 0.5}, "p must be > 1, got 0.5"),
    ({"lam": [1.0, 2.0], "method": "linear"}, "lam has no meaning for the linear mapping"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"val_fraction": 0.5, "test_fraction": 0.6}, "leaves no training data"),
]


@pytest.mark.parametrize("settings, message", DATA_CASES, ids=[m[:40] for _, m in DATA_CASES])
def test_data_settings(tmp_path, base_config, capsys, monkeypatch, settings, message):
    base_config["data"].update(settings)
    assert message in run_fit(tmp_path, base_config, capsys, monkeypatch, loads_model=True)


MODEL_CASES = [
    ({"lora_r": -4}, "lora_r=-4"),
    ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
    ({"template": "Q: {prompt}\nA:"}, "template must contain {rewards} exactly once: 'Q: {prompt}\\nA:'"),
    ({"temperature": -1.0}, "TextPolicy.temperature must be a number > 0, got -1.0"),
    ({"top_p": 1.5}, "TextPolicy.top_p must be a number in (0, 1], got 1.5"),
    ({"min_tokens": 300, "max_tokens": 100}, "min_tokens=300, max_tokens=100"),
    ({"packing_width": 1024}, "packing_width (1024) needs packing: true"),
    ({"compile_mode": "max-autotune"}, "compile_mode 'max-autotune' needs compile: true"),
    ({"generation_batch_size": 0}, "generation_batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("settings, message", MODEL_CASES, ids=[m[:40] for _, m in MODEL_CASES])
def test_model_settings_before_the_weights_load(tmp_path, base_config, capsys, monkeypatch, settings, message):
    base_config["model"]["init_args"].update(settings)
    line = run_fit(tmp_path, base_config, capsys, monkeypatch)
    assert message in line and line.startswith("ric fit: error: model (TextPolicy):")


def test_settings_that_contradict_each_other(tmp_path, base_config, capsys, monkeypatch):
    config = json.loads(json.dumps(base_config))
    config["model"]["init_args"]["reward_names"] = ["verbosity", "humor"]
    assert "reward_names ['verbosity', 'humor'] and the data's rewards ['verbosity', 'readability']" in run_fit(
        tmp_path, config, capsys, monkeypatch
    )
    config = json.loads(json.dumps(base_config))
    config["model"]["init_args"]["quantization"] = "8bit"
    config["trainer"]["strategy"] = "fsdp"
    assert "quantization='8bit' with trainer.strategy='fsdp'" in run_fit(tmp_path, config, capsys, monkeypatch)
    config = json.loads(json.dumps(base_config))
    config["trainer"]["strategy"] = "deepspeed_stage_2"
    assert "pip install 'ric[deepspeed]'" in run_fit(tmp_path, config, capsys, monkeypatch)


def test_files_that_cannot_be_read(tmp_path, base_config, capsys, monkeypatch, trained, trained_sd):
    config = json.loads(json.dumps(base_config))
    config["data"]["dataset"]["init_args"]["path"] = str(tmp_path / "nope.jsonl")
    assert "data.dataset (JsonlExamples): data file not found:" in run_fit(tmp_path, config, capsys, monkeypatch)
    good = trained["ckpt"].read_bytes()
    cases = {
        "cut.ckpt": (good[: len(good) // 2], "cut.ckpt cannot be read (truncated or corrupt)"),
        "empty.ckpt": (b"", "empty.ckpt is empty"),
        "notes.ckpt": (b"these are my notes, not weights", "notes.ckpt cannot be read"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        line = run_fit(tmp_path, base_config, capsys, monkeypatch, "--ckpt_path", str(tmp_path / name))
        assert message in line, line
    line = run_fit(tmp_path, base_config, capsys, monkeypatch, "--ckpt_path", str(trained_sd))
    assert "was written by a ric.diffusion.policy.DiffusionPolicy, but model.class_path is ric.text" in line
    plain = torch.load(trained["ckpt"], weights_only=False)
    del plain["ric"]
    torch.save(plain, tmp_path / "plain.ckpt")
    line = run_fit(tmp_path, base_config, capsys, monkeypatch, "--ckpt_path", str(tmp_path / "plain.ckpt"))
    assert "lacks the ric metadata" in line


def test_unknown_model_name_is_one_line(tmp_path, base_config, capsys, monkeypatch):
    base_config["model"]["init_args"]["model"] = str(tmp_path / "no-such-model")
    line = run_fit(tmp_path, base_config, capsys, monkeypatch, loads_model=True)
    assert "model (TextPolicy)" in line and "no-such-model" in line
    assert "is neither a local folder nor reachable from here" in line and "'smollm2'" in line


def test_a_hub_name_that_cannot_be_reached_says_what_works_offline():
    from ric.text.models import load_causal_lm, load_tokenizer

    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(OSError, match=r"model 'no-such-org/no-such-model' is neither a local folder nor reachable"):
            load("no-such-org/no-such-model")


def test_wrong_types_are_refused_by_the_parser(tmp_path, base_config, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(base_config))
    for override, value in (("--model.init_args.lora_r", "four"), ("--data.reward_range", "wide"),
                            ("--data.method", "p_two")):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(["fit", "--config", str(path), override, value])
        assert exited.value.code == 2 and value in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_python_api_inputs(tmp_path, trained):
    space = RewardSpace.fit(["a", "b"], np.random.default_rng(0).normal(size=(10, 2)))
    with pytest.raises(ValueError, match=r"preference \[0.3, 0.3\] sums to 0.6"):
        space.desired([0.3, 0.3])
    with pytest.raises(ValueError, match=r"preference 'ab' is not a vector of numbers"):
        space.desired("ab")
    with pytest.raises(ValueError, match="scores must have shape"):
        space.normalize([[1.0, 2.0, 3.0]])
    policy = ric.load(trained["ckpt"])
    with pytest.raises(ValueError, match=r"desired rewards \[1.0\] need 2 finite values, one per reward"):
        policy.steer("q", desired_rewards=[1.0])
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        policy.steer("q", [1.0, 0.0], num_samples=0)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        policy.check_sampling({"temperature": 0.0})
    with pytest.raises(ModelFileError, match="has no ric.json"):
        ric.load(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": broken\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_jsonl(bad)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list.jsonl:1 holds list"):
        read_jsonl(tmp_path / "list.jsonl")
    (tmp_path / "gz.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"gz.jsonl.gz cannot be read as gzipped text"):
        read_jsonl(Path(tmp_path / "gz.jsonl.gz"))


def test_serve_settings(trained, capsys):
    assert main(["serve", str(trained["ckpt"]), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", str(trained["ckpt"]), "--batch-timeout", "-1"]) == 2
    assert "--batch-timeout must be >= 0 seconds, got -1.0" in capsys.readouterr().err
    assert main(["serve", str(trained["ckpt"]), "--front", "/no/front.csv"]) == 2
    assert "--front /no/front.csv not found" in capsys.readouterr().err

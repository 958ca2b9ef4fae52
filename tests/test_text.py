import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEMPLATE as TEMPLATE
from conftest import shared_file, tiny_cli_config
from hypothesis import given, settings
from hypothesis import strategies as st

from ric.cli import ConfigError, RiCCLI
from ric.data import JsonlExamples, RelabelDataModule, ScoreCache
from ric.evaluation import PreferenceSweep
from ric.interfaces import ConditionalPolicy
from ric.online import OnlineLoop
from ric.sweep import default_preferences
from ric.text.datasets import HHRLHF, RedditTLDR, split_dialogue
from ric.text.policy import TextPolicy
from ric.text.rewards import HFRewardModel, PaperRewardModel, Readability, Relevance, Sentiment, Verbosity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return TextPolicy(
        model=tiny_llama,
        reward_names=["verbosity", "sentiment"],
        template=TEMPLATE,
        lora_r=4,
        lora_alpha=8,
        max_new_tokens=6,
    )


def test_pad_differs_from_eos(policy):
    assert policy.tokenizer.pad_token_id != policy.tokenizer.eos_token_id


def test_collate_masks_prompt_and_learns_eos(policy):
    batch = policy.collate(
        [
            {"prompt": "Q: hi <R1> 0.1 <R2> 0.2\nA:", "response": "hello there"},
            {"prompt": "Q: a much longer question here <R1> 1.0 <R2> 2.0\nA:", "response": "ok"},
        ]
    )
    tok = policy.tokenizer
    for i, (prompt, response) in enumerate(
        [("Q: hi <R1> 0.1 <R2> 0.2\nA:", "hello there"), ("Q: a much longer question here <R1> 1.0 <R2> 2.0\nA:", "ok")]
    ):
        n_prompt = len(tok(prompt)["input_ids"])
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        kept = labels[labels != -100].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]).strip() == response
        n = int(batch["attention_mask"][i].sum())
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    loss = policy(**batch)
    assert torch.isfinite(loss)


def test_left_padded_batch_equals_batch1_greedy(policy):
    prompts = ["short", "a considerably longer prompt with many more words in it", "mid length prompt"]
    desired = np.array([[0.5, -1.0], [1.5, 0.0], [-2.0, 3.0]])
    batched = policy.generate(prompts, desired, do_sample=False, batch_size=3)
    single = [policy.generate([p], d[None], do_sample=False, batch_size=1)[0] for p, d in zip(prompts, desired)]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)


def test_generation_checks_reward_shape(policy):
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        policy.generate(["q"], np.zeros((1, 3)))


def test_hf_reward_input_formats(tiny_reward_models):
    prompts, responses = ["\n\nHuman: hi there", "\n\nHuman: why?"], ["hello", "because it is so"]
    pair = HFRewardModel("harmless", tiny_reward_models["gpt2"], "pair")
    first, second = pair.texts(prompts, responses)
    assert first == ["\n\nHuman: hi there\n\nAssistant:", "\n\nHuman: why?\n\nAssistant:"] and second == responses
    humor = HFRewardModel("humor", tiny_reward_models["deberta"], "response")
    assert humor.texts(prompts, responses) == (responses, None)
    summary = HFRewardModel("pref1", tiny_reward_models["gpt2"], "summary")
    bos = summary.tokenizer.bos_token
    assert summary.texts(["the post"], ["the summary"]) == ([f"the summary {bos} the post"], None)
    faithful = HFRewardModel("faithful", tiny_reward_models["bart"], "faithful", logit_index=1)
    assert faithful.texts(["the post"], ["the summary"]) == (["the summary"], ["the post"])
    for reward in (pair, humor, summary, faithful):
        scores = reward.score(prompts * 3, responses * 3, batch_size=4)
        assert scores.shape == (6,) and torch.isfinite(scores).all()
        # length-sorted batching returns scores in input order
        single = torch.cat([reward.score([p], [r]) for p, r in zip(prompts * 3, responses * 3)])
        torch.testing.assert_close(scores, single, atol=1e-4, rtol=1e-4)
    logits = faithful.model(**faithful.tokenizer(["the summary"], ["the post"], return_tensors="pt")).logits
    assert faithful.score(["the post"], ["the summary"]).item() == pytest.approx(logits[0, 1].item(), abs=1e-5)
    with pytest.raises(ValueError, match="logit_index 2"):
        HFRewardModel("x", tiny_reward_models["bart"], "faithful", logit_index=2)


def test_long_inputs_truncated_to_max_length(tiny_reward_models):
    reward = HFRewardModel("harmless", tiny_reward_models["gpt2"], "pair", max_length=64)
    assert torch.isfinite(reward.score(["word " * 2000], ["answer " * 2000]))


def test_unknown_paper_reward_name():
    with pytest.raises(ValueError, match=r"unknown reward name 'helpfull'.*'helpful'"):
        PaperRewardModel("helpfull")


def test_offline_rewards():
    p = ["How do I water a plant?"] * 2
    v = Verbosity().score(p, ["one two three", "one"])
    assert v.tolist() == [3.0, 1.0]
    easy, hard = (
        "The cat sat. It was fun.",
        "Photosynthetic organisms metabolize electromagnetic radiation continuously.",
    )
    r = Readability().score(p, [easy, hard])
    assert r[0] > r[1]
    g = Readability(metric="grade").score(p, [easy, hard])
    assert g[0] < g[1]
    s = Sentiment().score(p, ["I love this, it is wonderful!", "This is terrible and I hate it."])
    assert s[0] > 0 > s[1]
    rel = Relevance().score(p, ["Water the plant once a week and keep the soil moist.", "The stock market fell."])
    assert rel[0] > rel[1]


def test_datasets_read_shared_files():
    hh = HHRLHF(str(shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")), limit=10)
    rows = hh.load()
    assert len(rows) == 20
    assert all(not r["prompt"].endswith("Assistant:") and r["prompt"].startswith("\n\nHuman:") for r in rows)
    assert len(HHRLHF(hh.path, responses="chosen", every_nth=4, limit=5).load()) == 5
    tldr = RedditTLDR(str(shared_file("tldr", "oai1b.csv")), limit=5).load()
    assert len(tldr) == 10 and "POST:" not in tldr[0]["prompt"] and "TL;DR" not in tldr[0]["prompt"]
    assert split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d") == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
        "d",
    )


def test_missing_and_corrupt_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlExamples(str(tmp_path / "nope.jsonl")).load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{broken\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        JsonlExamples(str(bad)).load()
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        RedditTLDR(str(tmp_path / "missing.csv")).load()


class CountingVerbosity(Verbosity):
    calls = 0

    def score_batch(self, prompts, samples):
        CountingVerbosity.calls += 1
        return super().score_batch(prompts, samples)


def test_score_cache(tmp_path):
    records = [{"prompt": "q", "response": "a b"}, {"prompt": "q2", "response": "c"}]
    cache = ScoreCache(tmp_path / "cache")
    reward = CountingVerbosity()
    first = cache.scores([reward], records, progress=False)
    calls = CountingVerbosity.calls
    again = cache.scores([reward], records, progress=False)
    assert CountingVerbosity.calls == calls
    np.testing.assert_array_equal(first, again)
    cache.scores([reward], records + [{"prompt": "q3", "response": "d"}], progress=False)
    assert CountingVerbosity.calls > calls


class ParseOnly(RiCCLI):
    """Parses a config and runs every check that needs no model (callbacks and data sources built, reward names
    compared), but builds nothing heavy."""

    def instantiate_classes(self):
        pass


@pytest.fixture()
def without_gpu_packages(monkeypatch):
    """The paper configs name DeepSpeed, which this CPU machine does not install; the check itself is tested
    in test_bad_inputs."""
    import ric.cli

    monkeypatch.setattr(ric.cli, "check_packages", lambda strategy: None)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, without_gpu_packages, tmp_path):
    import importlib

    import yaml

    dataset = yaml.safe_load(config.read_text())["data"]["dataset"]
    extra = []
    if dataset["class_path"].endswith("ImageFolder"):  # the paper's SD config reads the user's own pictures
        extra = ["--data.dataset.init_args.path", str(tmp_path)]
    cli = ParseOnly(args=["--config", str(config), *extra], run=False)
    model = cli.config["model"]
    module, _, name = model["class_path"].rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), ConditionalPolicy)
    names = [r["init_args"]["name"] for r in cli.config["data"]["rewards"]]
    assert names == list(model["init_args"]["reward_names"]) and len(names) >= 2
    sweeps = [c for c in cli.config["trainer"]["callbacks"] if c["class_path"] == "ric.evaluation.PreferenceSweep"]
    assert len(sweeps) == 1  # every shipped config evaluates itself


def _config(tmp_path, tiny_llama, data_path):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
        {"class_path": "ric.evaluation.PreferenceSweep",
         "init_args": {"num_points": 3, "output_dir": str(tmp_path / "sweep"), "sampling": {"max_new_tokens": 5}}},
    ]  # fmt: skip
    rewards = {"verbosity": "Verbosity", "sentiment": "Sentiment"}
    return tiny_cli_config(tmp_path, tiny_llama, data_path, rewards, callbacks)


def test_fit_resume_and_sweep(tmp_path, tiny_llama, text_data):
    config = _config(tmp_path, tiny_llama, text_data)
    cli = RiCCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 3
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    meta = ckpt["ric"]
    assert meta["schema_version"] == 2 and meta["policy"]["class_path"] == "ric.text.policy.TextPolicy"
    assert meta["reward_space"]["reward_names"] == ["verbosity", "sentiment"]
    assert [r["class_path"] for r in meta["reward_space"]["rewards"]] == [
        "ric.text.rewards.Verbosity", "ric.text.rewards.Sentiment"
    ]  # fmt: skip
    assert meta["conditioning"]["template"] == TEMPLATE
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    space = json.loads((tmp_path / "run" / "reward_space.json").read_text())
    assert space == meta["reward_space"]

    resumed = RiCCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "5",
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
        ]
    )
    assert resumed.trainer.global_step == 5
    lora = {k: v for k, v in resumed.model.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in lora.values())

    RiCCLI(args=["test", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "front.csv").open()))
    assert len(rows) == 3
    assert set(rows[0]) == {f"{k}_{n}" for k in ("w", "desired", "obtained") for n in ("verbosity", "sentiment")} | {
        f"obtained_{n}_sem" for n in ("verbosity", "sentiment")
    }
    assert [float(r["w_verbosity"]) for r in rows] == [0.0, 0.5, 1.0]
    n_prompts = len(resumed.datamodule.test_prompts)
    samples = [json.loads(line) for line in (sweep / "samples.jsonl").open()]
    assert len(samples) == 3 * n_prompts and set(samples[0]) >= {
        "prompt",
        "preference",
        "desired",
        "response",
        "scores",
    }
    metrics = json.loads((sweep / "metrics.json").read_text())
    assert metrics["mapping_method"] == "p_inf" and len(metrics["reference_point"]) == 2
    # every held-out response fits the tiny model: each reward's marker effect is measured on all of them
    held_out = resumed.datamodule.test_records
    assert held_out and {r["prompt"] for r in held_out} == set(resumed.datamodule.test_prompts)
    effects = metrics["marker_effects"]
    assert effects["responses"] == len(held_out) and set(effects["rewards"]) == {"verbosity", "sentiment"}
    assert all(np.isfinite(e["nats_mean"]) and e["moved_by_mean"] > 0 for e in effects["rewards"].values())
    assert metrics["hypervolume"] >= 0 and (sweep / "front.png").stat().st_size > 1000

    # a sweep asking past the training's range: the checkpoint's statistics (its labels' units), this run's range
    wide = RiCCLI(args=["test", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                        "--data.reward_range", "data", "--data.range_quantiles", "[0.25, 0.75]",
                        "--data.method", "linear"])  # fmt: skip
    trained_space = meta["reward_space"]
    used = wide.model.reward_space
    np.testing.assert_allclose(used.mean, trained_space["mean"])
    z = used.normalize(wide.datamodule.train_scores)
    np.testing.assert_allclose(used.r_max, np.quantile(z, 0.75, axis=0))
    assert used.method == "linear" and not np.allclose(used.r_max, trained_space["r_max"])


def test_a_failed_marker_check_keeps_the_sweep(tmp_path, tiny_llama, text_data, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("ric.marker_effects.marker_effects", broken)
    RiCCLI(args=["fit", "--config", str(_config(tmp_path, tiny_llama, text_data)), "--trainer.max_steps", "1",
                 "--trainer.callbacks.after_fit", "true"])  # fmt: skip
    metrics = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert "marker_effects" not in metrics and metrics["steering"]
    assert "marker effects not measured: RuntimeError: out of memory" in caplog.text


def test_unconditioned_base_model_sweep(tmp_path, tiny_llama, text_data):
    config = _config(tmp_path, tiny_llama, text_data)
    cli = RiCCLI(
        args=[
            "test",
            "--config",
            str(config),
            "--model.init_args.conditioned",
            "false",
            "--trainer.callbacks+=ric.evaluation.PreferenceSweep",
            "--trainer.callbacks.unconditioned",
            "true",
            "--trainer.callbacks.output_dir",
            str(tmp_path / "base"),
        ]
    )
    rows = list(csv.DictReader((tmp_path / "base" / "front.csv").open()))
    assert len(rows) == 1 and rows[0]["w_verbosity"] == "nan"
    assert not cli.model.conditioned


def test_export_merged(tmp_path, policy):
    from transformers import AutoModelForCausalLM

    out = policy.export(tmp_path / "export")
    meta = json.loads((out / "ric.json").read_text())
    assert meta["conditioning"]["reward_names"] == ["verbosity", "sentiment"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())


def test_clear_errors(tmp_path, tiny_llama, text_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="data set is empty"):
        RiCCLI(args=["fit", "--config", str(_config(tmp_path, tiny_llama, empty))])
    with pytest.raises(ConfigError, match=r"data.dataset \(JsonlExamples\): data file not found: .*absent.jsonl"):
        RiCCLI(args=["fit", "--config", str(_config(tmp_path, tiny_llama, tmp_path / "absent.jsonl"))])
    with pytest.raises(ConfigError, match=r"reward_names \['verbosity', 'humor'\] and the data's rewards"):
        RiCCLI(
            args=[
                "fit",
                "--config",
                str(_config(tmp_path, tiny_llama, text_data)),
                "--model.init_args.reward_names",
                "[verbosity, humor]",
            ]
        )
    with pytest.raises(ValueError, match=r"3 entries, expected 2"):
        PreferenceSweep(preferences=[[0.2, 0.3, 0.5]]).resolve_preferences(["verbosity", "sentiment"])
    assert len(default_preferences(2)) == 11 and len(default_preferences(3)) == 13


def test_sweep_range_settings_moved_to_the_reward_space():
    with pytest.raises(ValueError, match=r"PreferenceSweep.reward_range moved to the reward space: set data.init_args"):
        PreferenceSweep(reward_range="data")
    with pytest.raises(ValueError, match=r"OnlineLoop.r_min moved"):
        OnlineLoop(r_min=-1.0)


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "speed").glob("*.yaml")), ids=lambda p: p.name)
def test_speed_overlays_apply_on_the_paper_configs(overlay, without_gpu_packages):
    for base in ("text_hh.yaml", "text_summary.yaml"):
        cli = ParseOnly(args=["--config", str(ROOT / "configs" / base), "--config", str(overlay)], run=False)
        args = cli.config["model"]["init_args"]
        assert args["quantization"] is None and args["compile"] and args["cache_implementation"] == "static"
        assert args["lora_r"] == 64  # the base config's other settings stay


@settings(max_examples=30, deadline=None)
@given(
    prompts=st.lists(st.integers(0, 30), min_size=4, max_size=80),
    val=st.sampled_from([0.0, 0.1, 0.3]),
    test=st.sampled_from([0.0, 0.2, 0.4]),
    seed=st.integers(0, 5),
)
def test_split_never_puts_one_prompt_in_two_splits(prompts, val, test, seed):
    records = [{"prompt": f"q{p}", "response": f"answer {k}"} for k, p in enumerate(prompts)]
    dm = RelabelDataModule(JsonlExamples.__new__(JsonlExamples), [Verbosity()], val_fraction=val, test_fraction=test,
                           seed=seed)  # fmt: skip
    train, valid, held_out = dm.split(records)
    train_p, val_p = {r["prompt"] for r in train}, {r["prompt"] for r in valid}
    assert not (train_p & val_p) and not (train_p & set(held_out)) and not (val_p & set(held_out))
    assert len(train) + len(valid) + sum(r["prompt"] in held_out for r in records) == len(records)
    assert len(held_out) == len(set(held_out))


def test_marker_dropout_shows_a_share_of_examples_without_their_rewards(policy, tmp_path):
    from types import SimpleNamespace

    records = [{"prompt": f"question {i}", "response": "answer"} for i in range(400)]
    z = np.tile([[1.0, -1.0]], (400, 1))

    (tmp_path / "unused.jsonl").write_text("")

    def data(**settings):
        dm = RelabelDataModule(JsonlExamples(str(tmp_path / "unused.jsonl")), [Verbosity(), Readability()],
                               cache_dir=None, seed=3, **settings)  # fmt: skip
        dm.trainer = SimpleNamespace(lightning_module=policy)
        return [e["prompt"] for e in dm.examples(records, z, normalized=True)]

    plain = data()
    assert all("<R1> 1.0" in p for p in plain)  # 0: every example conditioned, as the paper trains
    dropped = data(marker_dropout=0.25)
    bare = [i for i, p in enumerate(dropped) if "<R1>" not in p]
    assert 60 < len(bare) < 140  # about a quarter of 400
    assert all(dropped[i] == policy.format_prompt(records[i]["prompt"], None) for i in bare)
    assert all(dropped[i] == plain[i] for i in set(range(400)) - set(bare))
    assert dropped == data(marker_dropout=0.25)  # drawn from the seed: the same examples every time
    neutral = data(marker_dropout=0.25, marker_dropout_reference="neutral")
    assert [p for p in neutral if "<R1> 0.0 <R2> 0.0" in p] and not [p for p in neutral if "<R1>" not in p]
    with pytest.raises(ValueError, match=r"marker_dropout must be in \[0, 1\), got 1.0"):
        data(marker_dropout=1.0)
    # another order seed draws other examples on the same split; the split's seed stays the default
    other = data(marker_dropout=0.25, shuffle_seed=4)
    assert other != dropped and 60 < sum("<R1>" not in p for p in other) < 140


def test_examples_whose_training_row_would_be_cut_are_left_out(policy, tmp_path):
    """A response longer than a training row keeps the rewards of all of it: it is left out and counted,
    never trained on cut short."""
    from types import SimpleNamespace

    (tmp_path / "unused.jsonl").write_text("")
    dm = RelabelDataModule(JsonlExamples(str(tmp_path / "unused.jsonl")), [Verbosity(), Sentiment()], cache_dir=None)
    dm.trainer = SimpleNamespace(lightning_module=policy)
    records = [{"prompt": "a question", "response": "word " * n} for n in (2, 1500, 5, 900)]
    kept = dm.examples(records, np.zeros((4, 2)), normalized=True)
    assert [len(ex["response"].split()) for ex in kept] == [2, 5] and dm.cut_examples == {"train": 2}
    dm.examples(records[:2], np.zeros((2, 2)), normalized=True, split="val")
    # validation rows are counted apart: the training count an online round reports stays the training set's
    assert dm.cut_examples == {"train": 2, "val": 1} and dm.state_dict()["cut_examples"] == dm.cut_examples
    rows = policy.training_rows(kept)
    assert all(labels[-1] == policy.tokenizer.eos_token_id for _, labels in rows)  # every end is seen
    with pytest.raises(ValueError, match="every one of 1 training examples is longer than a training row"):
        dm.examples(records[1:2], np.zeros((1, 2)), normalized=True)


def test_summary_rewards_trade_length_for_coverage():
    from ric.text.rewards import Conciseness, Coverage

    post = "My landlord kept the deposit after the lease ended, and the apartment was spotless when we moved out."
    short, long = "Landlord kept my deposit.", "Landlord kept my deposit after the lease ended; apartment was spotless."
    conciseness = Conciseness().score([post, post], [short, long])
    coverage = Coverage().score([post, post], [short, long])
    assert conciseness.tolist() == [-4.0, -11.0]  # higher is shorter
    content = {"landlord", "kept", "deposit", "after", "lease", "ended", "apartment", "spotless", "when", "moved"}
    assert coverage.tolist() == pytest.approx([3 / len(content), 8 / len(content)])
    assert Coverage().score(["a an of"], ["anything"]).tolist() == [0.0]  # a prompt without content words

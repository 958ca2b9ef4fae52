import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's real tokenizer (from the offline GGUF), saved as a plain folder for fast reuse."""
    from ric.text.models import load_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer("smollm2").save_pretrained(path)
    return path


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, tmp_path_factory):
    """A random-initialized LlamaForCausalLM with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return _save(LlamaForCausalLM(config), tok, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_reward_models(tokenizer_dir, tmp_path_factory):
    """Random-initialized GPT-2, DeBERTa-v2 and BART sequence classifiers (the paper's reward classes)."""
    import torch
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    v, pad = len(tok), tok.pad_token_id
    out = {}
    gpt2 = GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=1024, num_labels=1, pad_token_id=pad)
    out["gpt2"] = _save(GPT2ForSequenceClassification(gpt2), tok, tmp_path_factory.mktemp("gpt2"))
    deb = DebertaV2Config(
        vocab_size=v,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=1024,
        num_labels=1,
        pad_token_id=pad,
    )
    out["deberta"] = _save(DebertaV2ForSequenceClassification(deb), tok, tmp_path_factory.mktemp("deberta"))
    bart = BartConfig(
        vocab_size=v,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=1024,
        id2label={0: "unfaithful", 1: "faithful"},
        pad_token_id=pad,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    # BART's classification head reads the hidden state at EOS: its tokenizer appends one, as BART's does
    from tokenizers.processors import TemplateProcessing

    bart_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = (bart_tok.eos_token, bart_tok.eos_token_id)
    bart_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B:1 {eos[0]}:1", special_tokens=[eos]
    )
    out["bart"] = _save(BartForSequenceClassification(bart), bart_tok, tmp_path_factory.mktemp("bart"))
    return out


@pytest.fixture()
def text_data(tmp_path):
    """A small JSONL data set: prompts with short and long answers."""
    rows = []
    for i in range(24):
        q = f"Question number {i}: how do I water plant {i}?"
        rows.append({"prompt": q, "response": "Water it."})
        rows.append({"prompt": q, "response": "Water it every morning with a cup of fresh water and keep it sunny."})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TINY_TEMPLATE = "Q: {prompt} {rewards}\nA:"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file of ``../shared/data``; a clear failure naming it when the folder is not beside the checkout."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read the shared data in ../shared/data beside the checkout")
    return path


def tiny_cli_config(tmp_path, model_path, data_path, rewards, callbacks, **trainer):
    """Write a LightningCLI config for a few CPU steps of the tiny Llama on a JSONL data set.

    ``rewards`` maps reward names to their classes in ``ric.text.rewards``; ``trainer`` overrides trainer
    settings. Returns the config path."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"), "num_sanity_val_steps": 0,
            "callbacks": callbacks, **trainer,
        },
        "model": {"class_path": "ric.text.policy.TextPolicy",
                  "init_args": {"model": model_path, "reward_names": list(rewards), "template": TINY_TEMPLATE,
                                "lora_r": 4, "lora_alpha": 8, "max_new_tokens": 5, "learning_rate": 1e-3}},
        "data": {"dataset": {"class_path": "ric.data.JsonlExamples", "init_args": {"path": str(data_path)}},
                 "rewards": [{"class_path": f"ric.text.rewards.{cls}"} for cls in rewards.values()],
                 "batch_size": 4, "test_fraction": 0.2, "cache_dir": str(tmp_path / "cache"),
                 "output_dir": str(tmp_path / "run"), "progress": False},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def trained(tiny_llama, tmp_path_factory):
    """A tiny Llama trained 3 steps on two rewards, then swept at 3 preferences, 2 samples per prompt."""
    tmp_path = tmp_path_factory.mktemp("trained")
    rows = []
    for i in range(24):
        q = f"Question number {i}: how do I water plant {i}?"
        rows += [
            {"prompt": q, "response": "Water it."},
            {"prompt": q, "response": "Water it every morning with a cup of fresh water and keep it sunny."},
        ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
        {"class_path": "ric.evaluation.PreferenceSweep",
         "init_args": {"num_points": 3, "output_dir": str(tmp_path / "sweep"), "samples_per_prompt": 2,
                       "after_fit": True, "sampling": {"max_new_tokens": 6}, "seed": 5}},
    ]  # fmt: skip
    config = tiny_cli_config(tmp_path, tiny_llama, data, {"verbosity": "Verbosity", "readability": "Readability"},
                             callbacks, limit_val_batches=0)  # fmt: skip
    cfg = json.loads(config.read_text())
    cfg["data"].update(reward_range="data", method="linear")
    config.write_text(json.dumps(cfg))
    from ric.cli import RiCCLI

    RiCCLI(args=["fit", "--config", str(config)])
    return {"ckpt": tmp_path / "ckpt" / "last.ckpt", "sweep": tmp_path / "sweep", "root": tmp_path}


@pytest.fixture(scope="session")
def trained_sd(tmp_path_factory):
    from test_diffusion import _sd_config

    tmp_path = tmp_path_factory.mktemp("sd")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]  # fmt: skip
    from ric.cli import RiCCLI

    RiCCLI(args=["fit", "--config", str(_sd_config(tmp_path, callbacks, max_steps=2))])
    return tmp_path / "ckpt" / "last.ckpt"

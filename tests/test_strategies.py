from pathlib import Path

import pytest
from conftest import tiny_cli_config
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from ric.cli import RiCCLI
from ric.strategies import check_strategy, resolve_strategy, zero_stage

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = "lightning.pytorch.strategies.DeepSpeedStrategy"


class ParseOnly(RiCCLI):
    def instantiate_classes(self):
        pass


def test_quantized_zero3_refused_before_the_model_loads(tmp_path, text_data):
    # the model path does not exist: the strategy check must fail first, with both settings named
    config = tiny_cli_config(tmp_path, str(tmp_path / "no-model"), text_data, {"verbosity": "Verbosity"}, [])
    base = ["fit", "--config", str(config), "--model.init_args.quantization"]
    with pytest.raises(ValueError, match=r"quantization='8bit'.*strategy='deepspeed_stage_3'.*ZeRO stage 3"):
        RiCCLI(args=[*base, "8bit", "--trainer.strategy", "deepspeed_stage_3"])
    with pytest.raises(ValueError, match=r"quantization='4bit'.*strategy='fsdp'.*\(FSDP\)"):
        RiCCLI(args=[*base, "4bit", "--trainer.strategy", "fsdp"])


@pytest.mark.parametrize(
    "strategy",
    [
        "deepspeed_stage_3_offload",
        {"class_path": DEEPSPEED, "init_args": {"stage": 3}},
        {"class_path": DEEPSPEED, "init_args": {"config": {"zero_optimization": {"stage": 3}}}},
        {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {}},
    ],
    ids=["zero3-offload", "zero3-class", "zero3-config", "fsdp-class"],
)  # fmt: skip
def test_quantization_refused_with_sharded_strategies(strategy):
    with pytest.raises(ValueError, match=r"quantization='8bit' with trainer.strategy="):
        check_strategy(strategy, "8bit")
    check_strategy(strategy, None)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "auto", None])
def test_quantization_allowed_with_replicated_weights(strategy):
    check_strategy(strategy, "8bit")


def test_shipped_strategies_resolve(monkeypatch):
    import ric.cli

    monkeypatch.setattr(ric.cli, "check_packages", lambda strategy: None)  # DeepSpeed is not installed here
    cls, args = resolve_strategy(
        ParseOnly(args=["--config", str(ROOT / "configs/text_hh.yaml")], run=False).config.trainer.strategy
    )
    assert cls is DeepSpeedStrategy and zero_stage(cls, args) == 2
    config = ParseOnly(args=["--config", str(ROOT / "configs/text_hh_fsdp.yaml")], run=False).config
    cls, args = resolve_strategy(config.trainer.strategy)
    assert cls is FSDPStrategy and zero_stage(cls, args) is None
    assert {c.__name__ for c in args["auto_wrap_policy"]} == {"LlamaDecoderLayer"}
    assert config.model.init_args.quantization is None and config.model.init_args.dtype == "float32"

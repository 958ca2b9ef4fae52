"""Early checks of the Trainer strategy against the model's settings, before any weights load.

Some combinations start fine and fail hours later or, worse, train on wrong numbers: bitsandbytes 8/4-bit
base weights under DeepSpeed ZeRO-3 (its parameter partitioning does not know bitsandbytes' packed
weights and quantization state, and losses come out wrong) or under FSDP (bitsandbytes parameters cannot be
flattened and sharded). The CLI refuses them when the config is parsed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def resolve_strategy(strategy: Any) -> tuple[type | None, dict[str, Any]]:
    """``(strategy class, its init arguments)`` for a Trainer ``strategy`` value without building it:
    a registered name (``deepspeed_stage_2``, ``fsdp``, ...), a ``class_path``/``init_args`` mapping as
    parsed from YAML, or a Strategy instance. Unknown names (``auto``) give ``(None, {})``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    if strategy is None:
        return None, {}
    if isinstance(strategy, str):
        if strategy not in StrategyRegistry:
            return None, {}
        entry = StrategyRegistry[strategy]
        return entry["strategy"], dict(entry["init_params"])
    class_path = setting(strategy, "class_path")
    if isinstance(class_path, str):
        module, _, name = class_path.rpartition(".")
        init_args = setting(strategy, "init_args") or {}
        return getattr(importlib.import_module(module), name), {k: setting(init_args, k) for k in _keys(init_args)}
    if isinstance(strategy, DeepSpeedStrategy):
        return type(strategy), {"stage": strategy.config.get("zero_optimization", {}).get("stage")}
    return type(strategy), {}


def zero_stage(cls: type | None, init_args: Mapping[str, Any]) -> int | None:
    """The DeepSpeed ZeRO stage a strategy runs with (a ``config`` dict or JSON file wins over ``stage``);
    ``None`` when it is no DeepSpeed strategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if cls is None or not issubclass(cls, DeepSpeedStrategy):
        return None
    config = init_args.get("config")
    if isinstance(config, (str, Path)) and Path(config).is_file():
        config = json.loads(Path(config).read_text())
    stage = (setting(config, "zero_optimization") or {}).get("stage") if config is not None else None
    return int(stage if stage is not None else init_args.get("stage") or 2)


def is_fsdp(cls: type | None) -> bool:
    """FSDP (``fsdp``, ``fsdp_cpu_offload``, FSDPStrategy) or FSDP2 (ModelParallelStrategy)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return cls is not None and issubclass(cls, (FSDPStrategy, ModelParallelStrategy))


def check_strategy(strategy: Any, quantization: str | None) -> None:
    """Refuse quantized base weights with DeepSpeed ZeRO-3 or FSDP, naming both settings."""
    if quantization is None:
        return
    cls, init_args = resolve_strategy(strategy)
    stage = zero_stage(cls, init_args)
    shown = strategy if isinstance(strategy, str) else getattr(cls, "__name__", str(strategy))
    if stage is not None and not isinstance(strategy, str):
        shown += f"(stage={stage})"
    if stage == 3:
        raise ValueError(
            f"model.init_args.quantization={quantization!r} with trainer.strategy={shown!r} (DeepSpeed ZeRO stage 3) "
            "is refused: ZeRO-3 partitions bitsandbytes-quantized weights it does not understand and the losses "
            "come out wrong. Use deepspeed_stage_2 or ddp with quantization, or quantization: null with ZeRO-3."
        )
    if is_fsdp(cls):
        raise ValueError(
            f"model.init_args.quantization={quantization!r} with trainer.strategy={shown!r} (FSDP) is refused: "
            "FSDP cannot flatten and shard bitsandbytes parameters. Use quantization: null (bf16 or fp32 base, "
            "see configs/text_hh_fsdp.yaml) with FSDP, or ddp / deepspeed_stage_2 with quantization."
        )


def check_packages(strategy: Any) -> None:
    """A strategy whose package is not installed is named with the extra that brings it, before any model
    loads (Lightning would say so only once the Trainer is built)."""
    import importlib.util

    from lightning.pytorch.strategies import DeepSpeedStrategy

    cls, _ = resolve_strategy(strategy)
    if cls is not None and issubclass(cls, DeepSpeedStrategy) and importlib.util.find_spec("deepspeed") is None:
        shown = strategy if isinstance(strategy, str) else cls.__name__
        raise ImportError(
            f"trainer.strategy={shown!r} needs DeepSpeed, which is not installed: pip install 'ric[deepspeed]' "
            "(on a machine with CUDA), or use strategy: ddp"
        )


def setting(obj: Any, key: str) -> Any:
    """``key`` of a parsed config node, whether jsonargparse gives it as a mapping or a namespace."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _keys(obj: Any) -> list[str]:
    return list(obj.keys()) if isinstance(obj, Mapping) else list(vars(obj))

"""One LoRA adapter trained by TRL's GRPO on a weighted sum of normalized rewards, resumable."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ric.baselines.rewards import NormalizedReward

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GRPOSettings:
    """The RL run of every baseline policy (TRL's GRPO in place of the paper's PPO).

    Args:
        steps: optimizer steps per policy.
        learning_rate: AdamW learning rate of the LoRA adapter.
        beta: KL coefficient against the base model (the adapter switched off).
        num_generations: completions per prompt (GRPO's group; advantages are relative within it).
        prompts_per_step: prompts per optimizer step (each with ``num_generations`` completions).
        max_new_tokens, temperature, top_p: sampling of the completions (set them as RiC's online stage).
        save_steps: checkpoint interval, from which a killed run resumes.
        seed: the RL run's seed (prompt order, sampling).
    """

    steps: int = 100
    learning_rate: float = 1.0e-5
    beta: float = 0.04
    num_generations: int = 4
    prompts_per_step: int = 2
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    save_steps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "max_new_tokens", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(
                f"GRPOSettings.num_generations must be >= 2 (GRPO compares a group), got {self.num_generations}"
            )
        if not self.learning_rate > 0 or self.beta < 0:
            raise ValueError(
                f"GRPOSettings needs learning_rate > 0 and beta >= 0, got {self.learning_rate} / {self.beta}"
            )
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"GRPOSettings needs temperature > 0 and top_p in (0, 1], got {self.temperature} / {self.top_p}"
            )


def train_adapter(
    policy: Any,
    name: str,
    rewards: Sequence[NormalizedReward],
    weights: Sequence[float],
    prompts: Sequence[Any],
    settings: GRPOSettings,
    folder: Path,
) -> dict[str, Any]:
    """Train a new LoRA adapter ``name`` on ``policy``'s base (its LoRA settings) with GRPO on
    ``sum_i weights[i] * rewards[i]`` over ``prompts``; save it to ``folder / "adapter"``. A folder with a
    finished adapter is not trained again; a killed run resumes from its last TRL checkpoint. Returns the
    run's cost (wall seconds, generated samples, reward calls, training tokens)."""
    done = folder / "cost.json"
    if done.is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        return json.loads(done.read_text())
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    from ric.text.models import drop_gguf_marker

    h = policy.hparams
    # a GGUF-loaded base holds plain float weights, but transformers' Trainer refuses its "quantized" marker
    drop_gguf_marker(policy.lm.get_base_model())
    target = h.lora_target_modules if isinstance(h.lora_target_modules, str) else list(h.lora_target_modules)
    lm = policy.lm
    lm.add_adapter(name, LoraConfig(
        r=h.lora_r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout, target_modules=target,
        layers_to_transform=list(h.lora_layers) if h.lora_layers is not None else None, task_type="CAUSAL_LM",
    ))  # fmt: skip
    lm.set_adapter(name)
    batch = settings.prompts_per_step * settings.num_generations
    config = GRPOConfig(
        output_dir=str(folder / "trl"), max_steps=settings.steps, learning_rate=settings.learning_rate,
        beta=settings.beta, num_generations=settings.num_generations, per_device_train_batch_size=batch,
        max_completion_length=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        reward_weights=[float(w) for w in weights], save_steps=settings.save_steps, save_strategy="steps",
        logging_steps=1, report_to=[], seed=settings.seed, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, bf16=False, lr_scheduler_type="constant", warmup_steps=0,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": [policy.format_prompt(p, None) for p in prompts], "raw_prompt": list(prompts)})
    last = get_last_checkpoint(str(folder / "trl")) if (folder / "trl").is_dir() else None
    ledger = CostLedger(rewards, Path(last) / CostLedger.FILE if last else None)
    trainer = GRPOTrainer(model=lm, reward_funcs=list(rewards), args=config, train_dataset=data,
                          processing_class=policy.tokenizer, callbacks=[ledger])  # fmt: skip
    trainer.train(resume_from_checkpoint=last)
    so_far = ledger.so_far()
    lm.set_adapter(name)
    lm.save_pretrained(str(folder / "staging"), selected_adapters=[name])
    shutil.rmtree(folder / "adapter", ignore_errors=True)  # one left by a run killed before its cost.json
    (folder / "staging" / name).replace(folder / "adapter")  # peft saves a named adapter in a subfolder
    for extra in (name, "ref"):  # TRL adds "ref", its KL reference (a copy of the policy's unused, zero adapter)
        if extra in lm.peft_config:
            lm.delete_adapter(extra)
    lm.set_adapter("default")
    cost = run_cost(trainer.state.global_step, batch, so_far, trainer.state.log_history, weights)
    cost["resumed_from"] = last
    done.write_text(json.dumps(cost, indent=2))
    return cost


def run_cost(
    steps: int, batch: int, spent: dict[str, float], history: Sequence[dict[str, Any]], weights: Sequence[float]
) -> dict[str, Any]:
    """The cost record of one RL run after ``steps`` optimizer steps of ``batch`` completions each, from what its
    :class:`CostLedger` counted (``spent``) and TRL's log history (the tokens it trained on)."""
    return {
        "train_seconds": spent["seconds"],
        "steps": steps,
        "generated_samples": steps * batch,
        "reward_calls": spent["reward_calls"],
        "reward_seconds": spent["reward_seconds"],
        "training_tokens": max((float(e.get("num_tokens", 0)) for e in history), default=0.0),
        "weights": [float(w) for w in weights],
    }


class CostLedger(TrainerCallback):
    """Wall seconds and reward calls of one RL run, written into each TRL checkpoint, so a run resumed from
    one counts what the killed run spent before it (the reward counters live in the killed process)."""

    FILE = "ric_cost.json"

    def __init__(self, rewards: Sequence[NormalizedReward], carried: Path | None = None) -> None:
        self.rewards = list(rewards)
        self.carried = {"seconds": 0.0, "reward_calls": 0, "reward_seconds": 0.0}
        if carried is not None and carried.is_file():
            try:
                self.carried.update(json.loads(carried.read_text()))
            except ValueError:
                log.warning("%s is unreadable: the cost before this resume is not counted", carried)
        self.on_train_begin()

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.before = [(r.samples, r.seconds) for r in self.rewards]
        self.start = time.perf_counter()

    def so_far(self) -> dict[str, float]:
        """The run's cost up to now: what the checkpoint it resumed from carried, plus this process's part."""
        return {
            "seconds": self.carried["seconds"] + time.perf_counter() - self.start,
            "reward_calls": self.carried["reward_calls"]
            + sum(r.samples - b[0] for r, b in zip(self.rewards, self.before)),
            "reward_seconds": self.carried["reward_seconds"]
            + sum(r.seconds - b[1] for r, b in zip(self.rewards, self.before)),
        }

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / f"{self.FILE}.tmp"
            tmp.write_text(json.dumps(self.so_far()))
            tmp.replace(folder / self.FILE)

"""A RiC policy for any Hugging Face causal LM (Llama first): LoRA, optional 8/4-bit base, batched generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import get_scheduler

from ric.conditioning import RewardConditioning
from ric.interfaces import ConditionalPolicy
from ric.text.models import load_causal_lm

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TextPolicy(ConditionalPolicy):
    """Conditioned SFT of a causal LM: ``loss = -sum log pi(y | x', y_<t)`` over response tokens (and EOS).

    Args:
        model: hub name, local folder, path to a ``.gguf`` file, or ``smollm2`` (offline SmolLM2-135M).
        reward_names: the rewards written into prompts, in order; must match the DataModule's rewards.
        template: the task prompt with ``{prompt}`` and ``{rewards}`` slots.
        conditioned: ``False`` trains plain SFT on the same data without reward markers (a baseline).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA settings (paper: 64 / 128 / 0.05);
            ``lora_r: 0`` fine-tunes every weight instead.
        lora_layers: only these decoder layers get adapters (cheap CPU runs); ``None`` = all.
        quantization: ``"8bit"`` / ``"4bit"`` base weights through bitsandbytes (CUDA only).
        learning_rate, weight_decay, lr_scheduler, warmup_steps: optimizer (AdamW) and a transformers
            scheduler name (``linear`` for offline, ``constant`` for online).
        max_length: training sequences are cut to this many tokens.
        min_tokens, max_tokens: examples outside this token range are dropped (paper: 8..512).
        max_new_tokens, temperature, top_p, do_sample, generation_batch_size: sampling defaults.
    """

    def __init__(
        self,
        model: str = "smollm2",
        reward_names: Sequence[str] = ("harmless", "helpful"),
        template: str = "{prompt} {rewards}\n\nAssistant:",
        gguf_file: str | None = None,
        conditioned: bool = True,
        decimals: int = 1,
        markers: Sequence[str] | None = None,
        lora_r: int = 64,
        lora_alpha: int = 128,
        lora_dropout: float = 0.05,
        lora_target_modules: Sequence[str] | str = LLAMA_PROJECTIONS,
        lora_layers: Sequence[int] | None = None,
        quantization: Literal["8bit", "4bit"] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        learning_rate: float = 1.41e-4,
        weight_decay: float = 0.0,
        lr_scheduler: str = "linear",
        warmup_steps: int = 0,
        max_length: int = 512,
        min_tokens: int = 8,
        max_tokens: int = 512,
        response_separator: str = " ",
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.9,
        do_sample: bool = True,
        generation_batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conditioning = RewardConditioning(
            list(reward_names), template=template, markers=markers, decimals=decimals
        )
        self.conditioned = conditioned
        self.lm, self.tokenizer = load_causal_lm(model, gguf_file, DTYPES[dtype], quantization)
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            self.lm = prepare_model_for_kbit_training(self.lm, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            self.lm.gradient_checkpointing_enable()
            self.lm.config.use_cache = False
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model

            target = lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
            if isinstance(target, str) and lora_layers is not None:
                raise ValueError(f"lora_layers needs explicit lora_target_modules (a list), not {target!r}")
            config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=target,
                layers_to_transform=list(lora_layers) if lora_layers is not None else None,
                task_type="CAUSAL_LM",
            )
            self.lm = get_peft_model(self.lm, config)
        elif quantization is not None:
            raise ValueError("quantized base weights cannot be fine-tuned without LoRA: set lora_r > 0")
        self.lm.train()  # GGUF and hub loaders return eval-mode modules; Lightning keeps module modes as found
        # a checkpoint holds only the trained weights (the adapter), not the frozen base
        self.strict_loading = False

    # ---- data ---------------------------------------------------------------------------------
    def _encode(self, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if response is None:
            return prompt_ids, []
        response_ids = self.tokenizer(self.hparams.response_separator + response, add_special_tokens=False)["input_ids"]
        return prompt_ids, response_ids + [self.tokenizer.eos_token_id]

    def accepts(self, prompt: str, response: Any) -> bool:
        prompt_ids, response_ids = self._encode(prompt, response)
        n = len(prompt_ids) + len(response_ids)
        return self.hparams.min_tokens <= n <= self.hparams.max_tokens

    def collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Tokenize ``{"prompt": conditioned prompt, "response": text}`` examples; labels mask the prompt
        and keep EOS, so the model learns where to stop."""
        rows = []
        for ex in examples:
            p, r = self._encode(ex["prompt"], ex["response"])
            ids = (p + r)[: self.hparams.max_length]
            labels = ([-100] * len(p) + r)[: self.hparams.max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    # ---- training -----------------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.lm(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        scheduler = get_scheduler(
            self.hparams.lr_scheduler,
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=max(int(total), 1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        desired_rewards: np.ndarray | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Batched, left-padded sampling; prompts are sorted by length so batches waste little padding."""
        texts = self.condition(prompts, desired_rewards) if self.conditioned else self.condition(prompts, None)
        settings = {
            "max_new_tokens": self.hparams.max_new_tokens,
            "temperature": self.hparams.temperature,
            "top_p": self.hparams.top_p,
            "do_sample": self.hparams.do_sample,
        }
        settings.update(sampling)
        batch_size = int(settings.pop("batch_size", self.hparams.generation_batch_size))
        if not settings["do_sample"]:  # greedy: sampling knobs would only trigger warnings
            for key in ("temperature", "top_p"):
                settings.pop(key, None)
        encoded = [self._encode(t)[0] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out: list[str] = [""] * len(texts)
        was_training = self.lm.training
        self.lm.eval()
        pad = self.tokenizer.pad_token_id
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]) :] = 1
                generated = self.lm.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    pad_token_id=pad,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **settings,
                )
                for row, i in enumerate(idx):
                    new = generated[row, width:].tolist()
                    if self.tokenizer.eos_token_id in new:
                        new = new[: new.index(self.tokenizer.eos_token_id)]
                    out[i] = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        finally:
            self.lm.train(was_training)
        return out

    # ---- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        super().on_save_checkpoint(checkpoint)

    def export(self, path: str | Path, merge: bool = True) -> Path:
        """Save a standalone model folder: adapter merged into the base weights (``merge=True``) or the
        adapter alone, plus tokenizer, normalization statistics and the conditioning format."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = self.lm
        if merge and hasattr(lm, "merge_and_unload"):
            import copy

            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.save_ric_metadata(path)
        return path

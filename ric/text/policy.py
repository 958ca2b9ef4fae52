"""A RiC policy for any Hugging Face causal LM (Llama first): LoRA, optional 8/4-bit base, batched generation."""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from ric.adapters import fuse_adapters
from ric.conditioning import RewardConditioning
from ric.distributed import attached_trainer, sharded_weights
from ric.interfaces import DTYPES, ConditionalPolicy
from ric.optim import adamw_with_schedule
from ric.text.models import drop_gguf_marker, load_causal_lm

if TYPE_CHECKING:
    from ric.text.batching import ContinuousBatcher, Request

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: static-cache generation pads prompt widths to a multiple of this (fewer distinct cache lengths to compile)
STATIC_WIDTH_STEP = 64
#: training-only switches turned off when a policy is loaded for inference
INFERENCE_SETTINGS: dict[str, Any] = {
    "compile": False,
    "compile_mode": "default",
    "gradient_checkpointing": False,
    "liger_kernel": False,
    "packing": False,
    "packing_width": None,
    "generation_backend": "hf",
    "vllm_kwargs": None,
}


#: characters per token of context tokenized first: a prompt whose head alone is over the context is refused
#: without tokenizing the rest
HEAD_CHARS_PER_TOKEN = 16


class TextPolicy(ConditionalPolicy):
    """Conditioned SFT of a causal LM: ``loss = -sum log pi(y | x', y_<t)`` over response tokens (and EOS).

    Args:
        model: hub name, local folder, path to a ``.gguf`` file, or ``smollm2`` (offline SmolLM2-135M).
        reward_names: the rewards written into prompts, in order; must match the DataModule's rewards.
        template: the task prompt with ``{prompt}`` and ``{rewards}`` slots.
        conditioned: ``False`` trains plain SFT on the same data without reward markers (a baseline).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA settings (paper: 64 / 128 / 0.05);
            ``lora_r: 0`` fine-tunes every weight instead. Adapters go on every projection by default; the
            authors' code names no modules, so peft adapts ``[q_proj, v_proj]`` there (set that to match).
        lora_layers: only these decoder layers get adapters (cheap CPU runs); ``None`` = all.
        quantization: ``"8bit"`` / ``"4bit"`` base weights through bitsandbytes (CUDA only).
        learning_rate, weight_decay, lr_scheduler, warmup_steps: optimizer (AdamW) and a transformers
            scheduler name (``linear`` for offline, ``constant`` for online).
        max_length: training sequences are cut to this many tokens.
        min_tokens, max_tokens: examples outside this token range are dropped (paper: 8..512).
        max_new_tokens, temperature, top_p, do_sample, generation_batch_size: sampling defaults.

    Speed switches (defaults keep the plain behaviour; measurements in ``benchmarks/README.md``):
        attn_implementation: ``sdpa``, ``eager``, ``flex_attention`` (block masks for packed rows) or
            ``flash_attention_2`` (needs flash-attn).
        gradient_checkpointing: recompute activations in backward (non-reentrant, works with LoRA).
        liger_kernel: Liger's fused Triton kernels (CUDA, ``pip install liger-kernel``); it patches
            transformers' module for the model type, so it holds for the whole process.
        compile, compile_mode: ``torch.compile`` each decoder layer (regional: one layer's code serves them
            all, so large models compile in seconds); generation runs the layers uncompiled.
        packing, packing_width: pack a batch's examples into as few rows as fit the longest one (or rows of
            ``packing_width`` tokens), ``position_ids`` restarting per example: the same loss, less padding.
        cache_implementation: KV cache for generation (``static``: preallocated, compilable); ``None`` = dynamic.
        merge_lora_for_generation: generate with the adapter added into the base weights (restored bit for bit
            afterwards), which removes its extra matmuls from every decoding step.
        generation_batching: ``continuous`` (a finished answer's row goes to a waiting prompt at once,
            :mod:`ric.text.batching`) or ``static`` (transformers ``generate`` on left-padded batches);
            ``max_batch_tokens`` caps the continuous batch's cache. Settings the engine does not implement use
            the static path.
        generation_backend: ``hf`` (transformers) or ``vllm`` (needs vLLM and LoRA; ``vllm_kwargs`` go to
            ``vllm.LLM``).
    """

    inference_overrides: ClassVar[dict[str, Any]] = INFERENCE_SETTINGS

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
        attn_implementation: str = "sdpa",
        liger_kernel: bool = False,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        packing: bool = False,
        packing_width: int | None = None,
        cache_implementation: str | None = None,
        merge_lora_for_generation: bool = True,
        generation_batching: Literal["continuous", "static"] = "continuous",
        max_batch_tokens: int | None = None,
        generation_backend: Literal["hf", "vllm"] = "hf",
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lora_r < 0 or (lora_r > 0 and lora_alpha <= 0) or not 0 <= lora_dropout < 1:
            raise ValueError(
                f"LoRA needs lora_r >= 0 (0 fine-tunes every weight), lora_alpha > 0 and lora_dropout in [0, 1), got "
                f"lora_r={lora_r}, lora_alpha={lora_alpha}, lora_dropout={lora_dropout}"
            )
        if max_length < 1 or not 0 <= min_tokens <= max_tokens:
            raise ValueError(
                f"need max_length >= 1 and 0 <= min_tokens <= max_tokens, got max_length={max_length}, "
                f"min_tokens={min_tokens}, max_tokens={max_tokens}"
            )
        if not learning_rate > 0 or warmup_steps < 0:
            raise ValueError(f"need learning_rate > 0 and warmup_steps >= 0, got {learning_rate} / {warmup_steps}")
        self.check_sampling(
            {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "do_sample": do_sample,
             }, "TextPolicy",
        )  # fmt: skip
        if generation_batch_size < 1:
            raise ValueError(f"TextPolicy.generation_batch_size must be >= 1, got {generation_batch_size}")
        if generation_batching not in ("continuous", "static"):
            raise ValueError(f"generation_batching must be 'continuous' or 'static', got {generation_batching!r}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"TextPolicy.max_batch_tokens must be >= 1 or null, got {max_batch_tokens}")
        # optional packages are checked before minutes of model loading
        if liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("liger_kernel=True needs Liger kernels (liger-kernel): pip install 'ric[speed]'")
        if packing_width is not None and (packing_width < max_length or not packing):
            raise ValueError(
                f"packing_width ({packing_width}) needs packing: true and at least max_length ({max_length}) tokens:"
                " rows hold whole examples"
            )
        if compile_mode != "default" and not compile:
            raise ValueError(f"compile_mode {compile_mode!r} needs compile: true")
        if generation_backend not in ("hf", "vllm"):
            raise ValueError(f"generation_backend must be 'hf' or 'vllm', got {generation_backend!r}")
        if generation_backend == "vllm":
            from ric.text.vllm_backend import require_vllm

            require_vllm()
            if lora_r <= 0:
                raise ValueError("generation_backend='vllm' serves the base model plus a LoRA adapter: set lora_r > 0")
        self.conditioning = RewardConditioning(
            list(reward_names), template=template, markers=markers, decimals=decimals
        )
        self.conditioned = conditioned
        self.lm, self.tokenizer = load_causal_lm(
            model, gguf_file, DTYPES[dtype], quantization, attn_implementation=attn_implementation
        )
        if liger_kernel:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=self.lm)
        checkpointing = {"use_reentrant": False}
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            self.lm = prepare_model_for_kbit_training(
                self.lm, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
            )
        elif gradient_checkpointing:
            if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers 5.x's name
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
            else:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            self.lm.config.use_cache = False
            if lora_r > 0:  # frozen embeddings: make the checkpointed blocks' inputs carry gradients
                self.lm.enable_input_require_grads()
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
            with warnings.catch_warnings():  # peft asks transformers a deprecated property: harmless, ours to hide
                warnings.filterwarnings(
                    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
                )
                self.lm = get_peft_model(self.lm, config)
        elif quantization is not None:
            raise ValueError("quantized base weights cannot be fine-tuned without LoRA: set lora_r > 0")
        self.lm.train()  # GGUF and hub loaders return eval-mode modules; Lightning keeps module modes as found
        # a checkpoint holds only the trained weights (the adapter), not the frozen base
        self.strict_loading = False
        # adapters add their product inside the base output's matmul, without peft's float32 input copies
        self.fused_adapters = fuse_adapters(self.lm)
        if compile:  # in place: parameter names and checkpoints stay the same
            for layer in decoder_layers(self.lm):
                layer.compile(mode=None if compile_mode == "default" else compile_mode)
        self._vllm = None
        self._merged = False  # inside _merged_adapter: the adapter is in the base weights

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

    def fits(self, conditioned_prompt: str, response: Any) -> bool:
        prompt_ids, response_ids = self._encode(conditioned_prompt, response)
        return len(prompt_ids) + len(response_ids) <= self.hparams.max_length

    def training_rows(self, examples: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        """``(input ids, labels)`` of ``{"prompt": conditioned prompt, "response": text}`` examples; labels
        mask the prompt and keep EOS, so the model learns where to stop."""
        rows = []
        for ex in examples:
            p, r = self._encode(ex["prompt"], ex["response"])
            rows.append(((p + r)[: self.hparams.max_length], ([-100] * len(p) + r)[: self.hparams.max_length]))
        return rows

    def collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """A training batch: right-padded rows, or rows packed with several examples each (``packing``)."""
        rows = self.training_rows(examples)
        pad_id = self.tokenizer.pad_token_id
        if not self.hparams.packing:
            return pad(rows, pad_id)
        return pack(rows, pad_id, self.hparams.get("packing_width"))

    def log_likelihood(
        self, prompts: Sequence[str], responses: Sequence[str], desired_rewards: np.ndarray | None, batch_size: int = 16
    ) -> np.ndarray:
        """Summed log-probability of each response's tokens (with EOS, cut at ``max_length`` as in training)
        after its conditioned prompt, in eval mode."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        conditioned = self.condition(prompts, desired_rewards)
        rows = self.training_rows([{"prompt": p, "response": r} for p, r in zip(conditioned, responses)])
        was_training, out = self.training, []
        self.eval()
        try:
            for i in range(0, len(rows), batch_size):
                padded = pad(rows[i : i + batch_size], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in padded.items()}
                with torch.no_grad():
                    logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits.float()  # fmt: skip
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
                )
                out.append(-nll.sum(dim=1).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        # no KV cache in training; transformers also only detects packed rows when there is none
        return self.lm(**batch, use_cache=False).loss

    def training_cost(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        # every position of a row goes through the model (a packed row's too), padding aside
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        return {"training_examples": num_examples(batch), "training_tokens": int(tokens)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=num_examples(batch))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=num_examples(batch), sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        h = self.hparams
        return adamw_with_schedule(self, h.learning_rate, h.weight_decay, h.lr_scheduler, h.warmup_steps)

    def sampling_defaults(self, purpose: str) -> dict[str, Any]:
        """The paper's settings: online generation at temperature 0.7, evaluation at 1.0, both top_p 0.9."""
        return {"temperature": 0.7 if purpose == "online" else 1.0, "top_p": 0.9}

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        desired_rewards: np.ndarray | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Batched sampling, continuous or in static left-padded batches (``generation_batching``)."""
        out: list[str] = [""] * len(prompts)
        for i, answer in self.generate_stream(prompts, desired_rewards, **sampling):
            out[i] = answer
        return out

    @torch.no_grad()
    def generate_stream(
        self, prompts: Sequence[str], desired_rewards: np.ndarray | None = None, **sampling: Any
    ) -> Iterator[tuple[int, str]]:
        """Answers as they finish: on the continuous engine, each as soon as its row ends; on the static path
        (and vLLM), all at once. Prompts go in shortest first, so neighbours in a batch need little padding."""
        settings = self.sampling_settings(sampling)
        batch_size = int(settings.pop("batch_size", self.hparams.generation_batch_size))
        encoded = self.prompt_ids(prompts, desired_rewards)
        references = self.reference_ids(prompts, desired_rewards, settings)
        continuous = self._continuous(settings)
        if references is not None and not continuous:
            raise ValueError(
                "reward guidance decodes on the continuous engine, which these settings or this model do not use "
                f"(generation_batching {self.hparams.get('generation_batching')!r}, backend "
                f"{self.hparams.generation_backend!r}, settings {sorted(settings)})"
            )
        guidance = {key: settings.pop(key) for key in ("guidance", "guidance_reference") if key in settings}
        if self.hparams.generation_backend == "vllm":
            yield from enumerate(
                self.decode_answer(new) for new in self._vllm_engine().generate(encoded, self.lm, settings)
            )
            return
        device = self.lm.get_input_embeddings().weight.device
        order = order_by_length(encoded)
        compiled_decoding = False
        if not continuous:
            if self.hparams.cache_implementation is not None:
                settings.setdefault("cache_implementation", self.hparams.cache_implementation)
            if sharded_weights(attached_trainer(self)):  # each forward gathers shards from all ranks: keep in step
                settings.setdefault("synced_gpus", True)
            if settings.get("cache_implementation") is not None:  # transformers compiles static-cache decoding
                settings.setdefault("disable_compile", not self.hparams.compile)
                forced = getattr(settings.get("compile_config"), "_compile_all_devices", False)  # else accelerators
                compiled_decoding = not settings["disable_compile"] and (device.type in ("cuda", "xpu") or bool(forced))
        was_training = self.lm.training
        self.lm.eval()
        try:
            with self._merged_adapter(), self._eager_layers():
                if not continuous:
                    yield from enumerate(
                        self._generate_sorted(encoded, order, batch_size, device, settings, compiled_decoding)
                    )
                    return
                requests = self.batching_requests(encoded, {**settings, **guidance}, references)
                position = {id(r): i for i, r in enumerate(requests)}
                engine = self.batcher(batch_size)
                for i in order:
                    engine.submit(requests[i])
                while engine.busy():
                    for request in engine.step():
                        yield position[id(request)], self.decode_answer(request.tokens)
        finally:
            self.lm.train(was_training)

    def sampling_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The policy's sampling defaults with ``overrides`` on top (greedy drops temperature and top_p)."""
        h = self.hparams
        settings = {"max_new_tokens": h.max_new_tokens, "temperature": h.temperature, "top_p": h.top_p,
                    "do_sample": h.do_sample, **overrides}  # fmt: skip
        if not settings["do_sample"]:  # greedy: sampling knobs would only trigger warnings
            for key in ("temperature", "top_p"):
                settings.pop(key, None)
        return settings

    def prompt_ids(self, prompts: Sequence[str], desired_rewards: np.ndarray | None) -> list[list[int]]:
        """Token ids of the conditioned prompts, as generation feeds them."""
        return [self._encode(text)[0] for text in self.condition(prompts, desired_rewards)]

    def reference_ids(
        self, prompts: Sequence[str], desired_rewards: np.ndarray | None, settings: dict[str, Any]
    ) -> list[list[int]] | None:
        """Token ids of the prompts at reward guidance's reference condition (``guidance_reference``, default
        ``neutral``); ``None`` without guidance (``guidance`` 0 or unset)."""
        if not settings.get("guidance"):
            return None
        reference = settings.get("guidance_reference", "neutral")
        values = self.reference_rewards(desired_rewards, reference)
        if values is not None and values.ndim == 1:
            values = np.broadcast_to(values, (len(prompts), values.shape[0]))
        return self.prompt_ids(prompts, values)

    def _continuous(self, settings: dict[str, Any]) -> bool:
        """Whether these settings decode on the continuous engine (see ``generation_batching``)."""
        from ric.text.batching import ENGINE_SETTINGS, config_needs_static

        return (
            self.hparams.get("generation_batching", "continuous") == "continuous"
            and self.hparams.generation_backend == "hf"
            and set(settings) <= ENGINE_SETTINGS
            and self.hparams.cache_implementation is None
            and not config_needs_static(self.lm.generation_config)
            and not sharded_weights(attached_trainer(self))
        )

    def streams(self, sampling: dict[str, Any]) -> bool:
        settings = self.sampling_settings(sampling)
        settings.pop("batch_size", None)
        return self._continuous(settings)

    def batcher(self, batch_size: int | None = None) -> ContinuousBatcher:
        """A continuous-batching engine over this policy's model (``batch_size`` rows, default
        ``generation_batch_size``); the caller holds the model in eval mode, with the adapter merged if wanted."""
        from ric.text.batching import ContinuousBatcher

        return ContinuousBatcher(
            self.lm,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_batch_size=batch_size or self.hparams.generation_batch_size,
            max_batch_tokens=self.hparams.get("max_batch_tokens"),
        )

    def batching_requests(
        self, encoded: Sequence[list[int]], settings: dict[str, Any], references: Sequence[list[int]] | None = None
    ) -> list[Request]:
        """Engine requests for prompt ids at these sampling settings (unset ones from the model's generation
        config, as ``generate`` takes them), each seeded from the global random stream in prompt order;
        ``references`` (one per prompt) are their reward-guidance reference prompts at ``settings["guidance"]``."""
        from ric.text.batching import DEFAULT_TOP_K, Request, Sampling

        config = self.lm.generation_config
        do_sample = bool(settings.get("do_sample", True))
        sampling = Sampling(
            temperature=float(settings.get("temperature", config.temperature or 1.0)) if do_sample else 1.0,
            top_p=float(settings.get("top_p", config.top_p or 1.0)) if do_sample else 1.0,
            top_k=int(settings.get("top_k", DEFAULT_TOP_K if config.top_k is None else config.top_k))
            if do_sample
            else 0,
            do_sample=do_sample,
        )
        seeds = torch.randint(0, 2**62, (len(encoded),)).tolist()
        limit = int(settings["max_new_tokens"])
        if references is None:
            return [Request(list(ids), limit, sampling, seed) for ids, seed in zip(encoded, seeds)]
        guidance = float(settings["guidance"])
        return [Request(list(ids), limit, sampling, seed, reference_ids=list(ref), guidance=guidance)
                for ids, ref, seed in zip(encoded, references, seeds)]  # fmt: skip

    def _generate_sorted(
        self,
        encoded: list[list[int]],
        order: list[int],
        batch_size: int,
        device: torch.device,
        settings: dict,
        fixed_shapes: bool = False,
    ) -> list[str]:
        """Left-padded batches of ``batch_size`` prompts taken in ``order`` (shortest first).

        ``fixed_shapes`` (static KV cache): the compiled decoding step is specialized to the batch size and
        the cache length, and a new shape costs a recompilation (tens of seconds for a 7B model). So every
        batch is filled up to ``batch_size`` with copies of its last prompt, the longest prompts go first
        (transformers keeps a static cache's length at the largest seen so far), and prompt widths are
        rounded up to a multiple of ``STATIC_WIDTH_STEP`` tokens, so later calls rarely need a longer one.
        A call with fewer prompts than ``batch_size`` still computes a full batch: cheaper than a recompile."""
        pad = self.tokenizer.pad_token_id
        out: list[str] = [""] * len(encoded)
        if fixed_shapes:
            order = order[::-1]
        for start in range(0, len(order), batch_size):
            real = order[start : start + batch_size]
            idx = real + real[-1:] * (batch_size - len(real)) if fixed_shapes else real
            width = max(len(encoded[i]) for i in idx)
            if fixed_shapes:
                width = -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            with self._full_root_parameters():
                generated = self.lm.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    pad_token_id=pad,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **settings,
                )
            for row, i in enumerate(real):
                out[i] = self.decode_answer(generated[row, width:].tolist())
        return out

    def decode_answer(self, new_ids: list[int]) -> str:
        """An answer's text from its generated ids (cut at the end-of-sequence token)."""
        if self.tokenizer.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()

    def _vllm_engine(self) -> Any:
        if self._vllm is None:
            from ric.text.vllm_backend import VLLMGenerator

            h = self.hparams
            self._vllm = VLLMGenerator(h.model, h.lora_r, self.tokenizer.eos_token_id, **(h.vllm_kwargs or {}))
        return self._vllm

    def generation_session(self) -> contextlib.AbstractContextManager:
        """The adapter stays merged across the loop's ``generate`` calls (see ``merge_lora_for_generation``)."""
        return self._merged_adapter()

    @contextlib.contextmanager
    def _merged_adapter(self) -> Any:
        """The active LoRA adapter added into the base weights for the duration, adapters switched off.

        An unmerged adapter costs each adapted projection four more kernels per decoding step; merged, a step
        is the base model's. Subtracting the adapter again would leave rounding drift in bf16 weights after
        every call, so the originals are kept aside (on their device if it has room for them twice over,
        else in host memory) and copied back exactly into the same tensors, so compiled decoding and CUDA
        graphs keep their addresses. Re-entrant: inside a ``generation_session`` a call merges nothing."""
        layers = [] if self._merged else self._mergeable_lora_layers()
        if not layers:
            yield
            return
        weights = [layer.get_base_layer().weight for layer in layers]
        keep = backup_device(weights)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer, weight in zip(layers, weights):
                    saved.append((weight, weight.detach().to(keep, copy=True)))
                    names = [name for name in layer.active_adapters if name in layer.lora_A]
                    weight.copy_(weight.float() + sum(layer.get_delta_weight(name).float() for name in names))
            self._merged = True
            with trainable_flags_kept(self.lm), self.lm.disable_adapter():  # restored after peft re-enables
                yield
        finally:
            self._merged = False
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)

    def _mergeable_lora_layers(self) -> list[Any]:
        """The LoRA layers to merge, or none where merging would be wrong or lossy: quantized base weights,
        weights sharded by FSDP / ZeRO-3 (not full outside their forward), the vLLM backend, or switched off."""
        h = self.hparams
        if not h.merge_lora_for_generation or h.lora_r <= 0 or h.quantization is not None:
            return []
        if h.generation_backend != "hf" or sharded_weights(attached_trainer(self)):  # vLLM holds its own base weights
            return []
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.lm.modules() if isinstance(m, LoraLayer)]
        for layer in layers:
            base = layer.get_base_layer()
            weight = getattr(base, "weight", None)
            full = (getattr(base, "out_features", None), getattr(base, "in_features", None))
            if (
                not isinstance(base, torch.nn.Linear)
                or type(weight) not in (torch.Tensor, torch.nn.Parameter)
                or tuple(weight.shape) != full
                or not weight.is_floating_point()
                or weight.untyped_storage().nbytes() < weight.numel() * weight.element_size()  # a freed shard view
            ):
                return []
        return layers

    @contextlib.contextmanager
    def _eager_layers(self) -> Iterator[None]:
        """Decoder layers compiled for training run as plain modules in generation: each prompt width and
        growing cache would recompile them (past dynamo's limit: seen in a preference sweep on an H100), and
        transformers' compiled decoding step (static cache) traces the plain layers itself. Only the layers'
        compiled calls are set aside (``nn.Module.compile`` keeps them there), not compilation as a whole."""
        layers = decoder_layers(self.lm) if self.hparams.compile else []
        compiled = [layer._compiled_call_impl for layer in layers]
        for layer in layers:
            layer._compiled_call_impl = None
        try:
            yield
        finally:
            for layer, call in zip(layers, compiled):
                layer._compiled_call_impl = call

    def _full_root_parameters(self) -> contextlib.AbstractContextManager:
        """Under FSDP the root unit's own parameters (embeddings, head) are gathered only inside its forward;
        generation calls the model directly, so gather them for its duration (layer units gather themselves)."""
        trainer = attached_trainer(self)
        model = trainer.strategy.model if trainer is not None else None
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(model, FullyShardedDataParallel):
                return FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False)
        return contextlib.nullcontext()

    # ---- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.keep_trained_weights(checkpoint)
        super().on_save_checkpoint(checkpoint)

    def export(self, path: str | Path, merge: bool = True) -> Path:
        """A standalone model folder: the adapter merged into a copy of the base weights (``merge=True``) or
        the adapter alone (loaded onto the base model named in ``ric.json``), the tokenizer, ``ric.json``
        and a model card. The live policy is not changed."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        import copy

        adapter = hasattr(self.lm, "merge_and_unload")
        if merge and adapter:
            lm = copy.deepcopy(self.lm).merge_and_unload()
            drop_gguf_marker(lm)
        elif not adapter and getattr(self.lm, "hf_quantizer", None) is not None:
            lm = copy.deepcopy(self.lm)  # a full fine-tune of a GGUF-loaded model: the copy loses the marker
            drop_gguf_marker(lm)
        else:
            lm = self.lm
        with warnings.catch_warnings():
            # peft looks for the base model's config.json to see whether the vocabulary grew; a base model that
            # is not a transformers folder (the bundled GGUF) has none, and peft's note about it is not the
            # user's concern: the embedding rows are saved or not exactly as before
            warnings.filterwarnings("ignore", message="Could not find a config file")
            lm.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        merged = merge or not adapter
        base = None if merged else {"model": self.hparams.model, "gguf_file": self.hparams.gguf_file}
        self.save_ric_metadata(path, export={"merged": merged, "base": base})
        return path

    @classmethod
    def from_export(cls, folder: Path, meta: dict[str, Any], **overrides: Any) -> TextPolicy:
        """A merged export loads as a plain model (``lora_r: 0``); an adapter-only one rebuilds the base model
        with the recorded LoRA settings and loads the adapter into it. Training-only speed switches are off."""
        init = dict((meta.get("policy") or {}).get("init_args") or {})
        if not init:  # schema 1 recorded the conditioning only
            c = meta.get("conditioning") or {}
            init = {k: c[k] for k in ("reward_names", "template", "markers", "decimals") if k in c}
            init["conditioned"] = meta.get("conditioned", True)
        merged = (meta.get("export") or {}).get("merged", not (folder / "adapter_config.json").is_file())
        init.update(cls.inference_overrides, quantization=None)
        if merged:
            init.update(model=str(folder), gguf_file=None, lora_r=0)
        init.update(overrides)
        policy = cls(**init)
        if not merged:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = folder / "adapter_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{folder} is an adapter-only export but has no {weights.name}")
            result = set_peft_model_state_dict(policy.lm, load_file(str(weights)))
            if result.unexpected_keys:
                raise ValueError(f"{weights} holds weights the model does not have: {result.unexpected_keys[:5]}")
        return policy

    def check_prompt(self, prompt: Any) -> None:
        """Refuse an empty prompt, or one whose conditioned form leaves no room for ``max_new_tokens`` in the
        model's context."""
        super().check_prompt(prompt)
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit is None:
            return
        values = None if not self.conditioned else np.zeros(self.conditioning.num_rewards)
        text = self.format_prompt(prompt, values)
        room = limit - int(self.hparams.max_new_tokens)
        # a prompt far past the context is refused on its head: tokenizing megabytes would stall a server
        head = str(prompt)[: HEAD_CHARS_PER_TOKEN * (room + 2)]
        if len(head) < len(str(prompt)) and len(self._encode(head)[0]) > room + 1:
            raise ValueError(
                f"the prompt is over {room} tokens, what this model takes ({limit} tokens of context minus "
                f"max_new_tokens {self.hparams.max_new_tokens}): {str(prompt)[:80]!r}..."
            )
        n = len(self._encode(text)[0])
        if n > room:
            raise ValueError(
                f"the prompt is {n} tokens with its markers, over the {room} this model takes ({limit} tokens of "
                f"context minus max_new_tokens {self.hparams.max_new_tokens}): {str(prompt)[:80]!r}..."
            )


def order_by_length(encoded: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices, shortest first: neighbours in a batch then need little padding."""
    return sorted(range(len(encoded)), key=lambda i: len(encoded[i]))


def pad(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``(input ids, labels)`` rows -> a right-padded batch with an attention mask."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pack(
    rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """``(input ids, labels)`` rows -> as few rows as fit the longest example (first-fit decreasing), each
    holding several examples back to back. ``position_ids`` restart at 0 for every example, which
    transformers turns into attention within examples only (sdpa/eager: a block-causal mask, flash-attention:
    variable-length kernels, flex: a block mask); no attention mask is passed. Rows stay as long as the
    longest example, so attention never spans more than a padded batch would; a larger ``width`` packs wider
    rows instead, trimmed to the fullest row rounded up to a multiple of 8 (for flex attention, whose block
    mask skips the blocks between examples). A short row ends in pad tokens that continue the last example's
    positions: causal attention keeps them out of every real token. Each example's first label is dropped,
    since a padded row never predicts its first token either: the loss equals the padded batch's."""
    longest = max(len(ids) for ids, _ in rows)
    wide = width is not None and width > longest
    width = width if wide else longest
    bins: list[list[int]] = []
    fills: list[int] = []  # tokens in each bin
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        n = len(rows[i][0])
        fit = next((b for b, fill in enumerate(fills) if fill + n <= width), None)
        if fit is None:
            bins.append([i])
            fills.append(n)
        else:
            bins[fit].append(i)
            fills[fit] += n
    if wide:
        width = -(-max(fills) // 8) * 8  # pad tokens only beyond the fullest row
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for b, members in enumerate(bins):
        start = 0
        for i in members:
            ids, lab = rows[i]
            n = len(ids)
            input_ids[b, start : start + n] = torch.tensor(ids)
            labels[b, start + 1 : start + n] = torch.tensor(lab[1:n], dtype=torch.long)
            positions[b, start : start + n] = torch.arange(n)
            start += n
        last = int(positions[b, start - 1])
        positions[b, start:] = torch.arange(last + 1, last + 1 + width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


@contextlib.contextmanager
def trainable_flags_kept(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` as it was on entry, restored on exit: peft marks the adapters it
    switches on (or back on) trainable, so an adapter frozen for inference would otherwise thaw."""
    flags = {p: p.requires_grad for p in module.parameters()}
    try:
        yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


def backup_device(weights: Sequence[torch.Tensor]) -> torch.device:
    """Where copies of ``weights`` go for a while: their own GPU if it has room for them twice over (the
    rest is left to the KV cache), else host memory."""
    device = weights[0].device
    if device.type != "cuda":
        return device
    size = sum(w.numel() * w.element_size() for w in weights)
    free, _ = torch.cuda.mem_get_info(device)
    return device if free >= 2 * size else torch.device("cpu")


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in ``_no_split_modules``)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"compile=True: no decoder layers found in {type(base).__name__} (_no_split_modules={names})")
    return layers


def num_examples(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a padded or packed batch (a packed row holds one example per restart of positions)."""
    if "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])

"""Optional vLLM generation for :class:`~ric.text.policy.TextPolicy` (``generation_backend: vllm``).

vLLM serves the frozen base model once; each ``generate`` call sends the policy's current LoRA adapter
(saved to a temporary folder) with the request, so training never has to copy full weights into the engine.
Prompts go in as token ids and come back as token ids: the policy's own tokenizer does both ends.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from typing import Any

#: HF ``generate`` settings this backend translates; anything else is refused rather than ignored.
KNOWN_SETTINGS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p"}


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError("generation_backend='vllm' needs vLLM (CUDA): pip install 'ric[vllm]'")


def sampling_params(settings: dict[str, Any], eos_token_id: int) -> dict[str, Any]:
    """HF ``generate`` settings -> vLLM ``SamplingParams`` keywords (greedy = temperature 0)."""
    unknown = set(settings) - KNOWN_SETTINGS
    if unknown:
        raise ValueError(f"the vllm generation backend does not take {sorted(unknown)}")
    greedy = not settings.get("do_sample", True)
    return {
        "max_tokens": int(settings["max_new_tokens"]),
        "min_tokens": int(settings.get("min_new_tokens") or 0),
        "temperature": 0.0 if greedy else float(settings.get("temperature", 1.0)),
        "top_p": 1.0 if greedy else float(settings.get("top_p", 1.0)),
        "stop_token_ids": [eos_token_id],
    }


class VLLMGenerator:
    """A vLLM engine over the base model with LoRA enabled; built on first use (it claims GPU memory)."""

    def __init__(self, model: str, lora_rank: int, eos_token_id: int, **engine_kwargs: Any) -> None:
        require_vllm()
        import vllm

        engine_kwargs.setdefault("gpu_memory_utilization", 0.3)
        self.llm = vllm.LLM(
            model=model, enable_lora=True, max_lora_rank=lora_rank, skip_tokenizer_init=True, **engine_kwargs
        )
        self.eos_token_id = eos_token_id
        self.calls = 0

    def generate(self, prompt_ids: Sequence[list[int]], peft_model: Any, settings: dict[str, Any]) -> list[list[int]]:
        """New token ids for each prompt, in order, from the adapter as it is now."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(**sampling_params(settings, self.eos_token_id))
        with tempfile.TemporaryDirectory(prefix="ric-lora-") as folder:
            peft_model.save_pretrained(folder, save_embedding_layers=False)
            self.calls += 1  # a new id makes vLLM load this adapter instead of a cached older one
            request = LoRARequest("ric", self.calls, folder)
            prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
            outputs = self.llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

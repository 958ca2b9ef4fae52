"""peft's LoRA linear layers, run with less memory traffic (text and image policies alike).

peft computes ``base(x) + B(A(dropout(x.float()))) * scaling``: it copies the input to the adapter weights'
dtype (float32 next to a bf16 base, which the bf16 matmul under autocast casts straight back), and scales
and adds the adapter's output in two more passes over an activation-sized tensor, in forward and again in
backward. Here the adapter's input goes to its matmul as it is, and its scaled product is added into the
base output by the matmul itself (``addmm(base, A(dropout(x)), B^T, alpha=scaling)``: one rounding instead
of three). The weights, the dropout masks and what the gradients mean do not change. Traced on the
Llama-2-7B shape (8 x 512 rows, every projection adapted, bf16 autocast; ``benchmarks/anatomy.py``), a
training step moves 342 GB outside its matmuls and attention this way, against 568 GB through peft's forward.

This applies under autocast, or where input and adapter weights share a dtype (all float32, or a module
cast to bf16 whole); elsewhere peft's own forward runs, decided at each call: a bf16 input meeting float32
adapters without autocast (the cast is needed there), merged or disabled adapters, several active
adapters, DoRA and other variants, adapter biases, extra arguments, weights partitioned by ZeRO-3. So
direct model calls and checkpointed recomputation, which restores autocast, take the same path as the step
they belong to. 8-bit layers are peft's own and not touched. One difference in values besides rounding:
dropout now sees the bf16 input, and the CPU's dropout rounds its scale to bf16 (1.1094 for 1.1111 at
p = 0.1; CUDA's scales in float32); the masks are the same.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear


class FusedLoraLinear(Linear):
    """peft's ``lora.Linear``, its single adapter's product added by the base output's matmul. Layers become
    one by a class swap (``fuse_adapters``), so weights, names and checkpoints stay peft's."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = self._plain_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        # rows of tokens: the base output is then a fresh 2-D tensor, which the adapter's product is added
        # into in place (a new tensor would first get a copy of it, and adding into a view would make
        # backward copy the gradient); the base matmul's backward does not need its output. In-place ops skip
        # autocast, so the operands take the output's dtype here.
        rows = x.reshape(-1, x.shape[-1])
        result = self.base_layer(rows)
        low = self.lora_A[name](self.lora_dropout[name](rows)).to(result.dtype)
        result.addmm_(low, self.lora_B[name].weight.t().to(result.dtype), alpha=self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def _plain_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter's name where the fused path applies, else ``None``."""
        device = x.device.type
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        names = [a for a in self.active_adapters if a in self.lora_A]
        if len(names) != 1:
            return None
        name = names[0]
        if not _autocast(device) and not x.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype:
            return None
        special = (getattr(self, attr, {}).get(name) for attr in ("lora_variant", "use_dora", "lora_bias"))
        if any(special) or self.lora_B[name].bias is not None:
            return None
        # DeepSpeed ZeRO-3 gathers a weight only when its own module runs, and lora_B's does not run here
        return None if getattr(self.lora_B[name].weight, "ds_id", None) is not None else name


def _autocast(device: str) -> bool:
    """Whether autocast is on for ``device``. Compiled code asks only ``is_autocast_enabled``: torch 2.11's
    dynamo cannot trace the availability check, which broke each compiled decoder layer's graph at every
    adapter (seen on an H100); a device that runs compiled code has autocast."""
    if torch.compiler.is_compiling():
        return torch.is_autocast_enabled(device)
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def fuse_adapters(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Turns every plain peft ``lora.Linear`` of ``model`` into a ``FusedLoraLinear``; returns them."""
    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        layer.__class__ = FusedLoraLinear
    return layers


def unfuse_adapters(layers: list[torch.nn.Module]) -> None:
    """peft's own forward again (the throughput benchmark measures what fusing saves)."""
    for layer in layers:
        layer.__class__ = Linear

"""peft's LoRA linear layers, run with less memory traffic under autocast (``bf16-mixed`` training).

peft computes ``base(x) + B(A(dropout(x.float()))) * scaling``: it copies the input to the adapter weights'
float32 (the bf16 matmul casts it straight back), and scales and adds the adapter's output in two more
passes over an activation-sized tensor, in forward and again in backward. Here, under autocast, the
adapter's input goes to its matmul as it is, and its scaled product is added into the base output by the
matmul itself (``addmm(base, A(dropout(x)), B^T, alpha=scaling)``: one rounding instead of three). The
weights, the dropout masks and what the gradients mean do not change. Traced on the Llama-2-7B shape
(8 x 512 rows, every projection adapted; ``benchmarks/anatomy.py``), a training step moves 343 GB outside
its matmuls this way against 569 GB through peft's forward.

Everything else keeps peft's own forward, decided at each call: no autocast (a bf16 input must meet the
float32 adapter weights), merged or disabled adapters, several active adapters, DoRA and other variants,
adapter biases, extra arguments. So direct model calls and checkpointed recomputation, which restores
autocast, take the same path as the step they belong to. 8-bit layers are peft's own and not touched.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear


class FusedLoraLinear(Linear):
    """peft's ``lora.Linear``, its single adapter's product added by the matmul under autocast. Layers
    become one by a class swap (``fuse_adapters``), so weights, names and checkpoints stay peft's."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = self._plain_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        low = self.lora_A[name](self.lora_dropout[name](x))
        summed = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                             self.lora_B[name].weight.t(), alpha=self.scaling[name])  # fmt: skip
        return summed.view(result.shape)

    def _plain_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter's name where the fused path applies, else ``None``."""
        device = x.device.type
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return None
        names = [a for a in self.active_adapters if a in self.lora_A]
        if len(names) != 1:
            return None
        name = names[0]
        special = (getattr(self, attr, {}).get(name) for attr in ("lora_variant", "use_dora", "lora_bias"))
        return None if any(special) or self.lora_B[name].bias is not None else name


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

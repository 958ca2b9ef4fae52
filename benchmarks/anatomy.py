"""What one training step asks of the device, op by op: kernels, FLOPs and bytes moved per phase (forward,
backward, optimizer) and kind of op (matmul, attention, other), and the floor they set on a device with a
given matmul rate and memory bandwidth.

A profile says where a step's time went on one card; this says what the step's eager code makes any card
do, so it explains a profile (or stands in for one where no GPU is at hand). Each op that moves data counts
as one kernel (a multi-tensor optimizer op too, which CUDA may split into a few launches); its floor is
``max(FLOPs / matmul rate, bytes / bandwidth)`` (a roofline), its bytes the tensors it reads plus those it
writes. That is a lower bound: caches can only help the big tensors a little, and launch gaps, waits on
the host and kernels below their roofline come on top. Views and allocations launch nothing and are not
counted. Ops whose result the host must wait for (``.item()``, ``nonzero``) are counted apart per phase: in
forward and backward each is a device sync; in the optimizer they read step counters kept on the host.
Attention FLOPs count the whole score matrix, as torch's flop counter does, causal or not.

Traced on a CPU, the step runs the CPU's kernels; where CUDA fuses differently the trace follows CUDA:
dropout is one kernel writing the output and a mask (``native_dropout``, CUDA's path; the CPU's takes
three), and AdamW runs multi-tensor kernels (``foreach``, CUDA's default).

Identical decoder layers cost the same, so a model's step is ``trace(1 layer) + (L - 1) x (trace(2 layers)
- trace(1 layer))``: a 7B-shape step is traced on a CPU with two layers in memory (``extrapolate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten._scaled_mm}
#: ops counted with another op's FLOP formula (same leading arguments): the CPU's sdpa kernels as CUDA's
#: flash kernels, in-place addmm as addmm
FLOPS_AS = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
    aten.addmm_: aten.addmm,
}
#: ops whose result's size or value the host waits for
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select}
#: ops that only allocate or re-describe memory: no kernel
NO_KERNEL = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
             aten._unsafe_view, aten.lift_fresh, aten.detach, aten.alias, aten.set_, aten.resize_,
             aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset}  # fmt: skip
#: in-place ops that overwrite their first argument without reading it
WRITE_ONLY = {aten.copy_, aten.fill_, aten.zero_, aten.bernoulli_, aten.uniform_, aten.normal_, aten.random_,
              aten.exponential_}  # fmt: skip
#: ops that make a tensor from sizes and values, reading none (``*_like`` and ``new_*`` take shapes only)
FACTORIES = {aten.full, aten.zeros, aten.ones, aten.scalar_tensor, aten.arange}
PHASES = ("forward", "backward", "optimizer")
NUMBERS = ("kernels", "flops", "bytes", "floor_ms")
KINDS = ("matmul", "attention", "other")


#: a matmul with a dimension this small (a LoRA rank) is bound by memory, not by the matmul rate
THIN = 256


def kind_and_name(op: Any, args: tuple) -> tuple[str, str]:
    """The op's kind, and its name (matmuls with a thin dimension, such as LoRA's, marked apart)."""
    if op in MATMULS:
        dims = [d for t in args if isinstance(t, torch.Tensor) and t.dim() >= 2 for d in t.shape[-2:]]
        return "matmul", op.__name__ + (" (thin)" if dims and min(dims) <= THIN else "")
    return ("attention" if "attention" in op.__name__ else "other"), op.__name__


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (the same tensor passed twice is read once; a
    broadcast view is read as the memory behind it)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            size = min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
            seen[(t.data_ptr(), t.numel(), t.dtype)] = size
    return sum(seen.values())


def written(func: Any, args: tuple, kwargs: dict) -> list:
    """The arguments an op writes into (in-place and ``out=`` ops; multi-tensor updates return nothing)."""
    found = []
    for i, spec in enumerate(func._schema.arguments):
        if spec.alias_info is not None and spec.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(spec.name)
            found.extend(tree_flatten(value)[0])
    return found


class StepTrace(TorchDispatchMode):
    """Records every op run while active, under the current ``phase``: per ``(phase, kind, op name)`` the
    kernels, FLOPs, bytes and floor (each kernel's roofline at ``flops_per_s`` and ``bytes_per_s``, summed;
    ``table``), and the host syncs."""

    def __init__(self, flops_per_s: float, bytes_per_s: float) -> None:
        super().__init__()
        self.rates = flops_per_s, bytes_per_s
        self.phase = PHASES[0]
        self.table: dict[tuple[str, str, str], dict[str, float]] = {}
        self.syncs = dict.fromkeys(PHASES, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = func.overloadpacket
        if op in SYNCING:
            self.syncs[self.phase] += 1
            if op is aten._local_scalar_dense:
                return out
        if func.is_view or op in NO_KERNEL:
            return out
        read_kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        inputs, _ = tree_flatten((args[1:] if op in WRITE_ONLY else args, read_kwargs))
        if op in FACTORIES or op.__name__.endswith("_like") or op.__name__.startswith("new_"):
            inputs = []
        outputs = tree_flatten(out)[0] + written(func, args, kwargs)
        formula = flop_registry.get(FLOPS_AS.get(op, op))
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        moved = tensor_bytes(inputs) + tensor_bytes(outputs)
        kind, name = kind_and_name(op, args)
        row = self.table.setdefault((self.phase, kind, name), dict.fromkeys(NUMBERS, 0))
        row["kernels"] += 1
        row["flops"] += flops
        row["bytes"] += moved
        row["floor_ms"] += 1e3 * max(flops / self.rates[0], moved / self.rates[1])
        return out


def fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` as CUDA runs it, on any device: one kernel for the output and its mask."""
    return torch.native_dropout(input, p, training)[0] if training and p > 0 else input


def trace_step(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, autocast: bool,
               flops_per_s: float, bytes_per_s: float) -> dict:  # fmt: skip
    """One training step traced: ``forward()`` returns the loss (run under bf16 autocast if ``autocast``),
    then backward, the optimizer step and zeroing the gradients. Returns the table as plain rows, with
    floors at the given matmul rate and bandwidth. The optimizer runs multi-tensor kernels for the step
    (unless it is fused already), as by default on CUDA."""
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    saved = [group.get("foreach") for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["foreach"] = group["foreach"] if group.get("fused") else True
    trace = StepTrace(flops_per_s, bytes_per_s)
    try:
        with trace, mock.patch.object(torch.nn.functional, "dropout", fused_dropout):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward()
            trace.phase = "backward"
            loss.backward()
            trace.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for group, foreach in zip(optimizer.param_groups, saved):
            group["foreach"] = foreach
    rows = [{"phase": p, "kind": k, "op": name, **numbers} for (p, k, name), numbers in trace.table.items()]
    return {"rows": rows, "syncs": trace.syncs}


def extrapolate(one: dict, two: dict, layers: int) -> dict:
    """The traced step of a ``layers``-layer model from traces with 1 and 2 layers (the rest identical)."""

    def keyed(trace: dict) -> dict:
        return {(r["phase"], r["kind"], r["op"]): r for r in trace["rows"]}

    a, b = keyed(one), keyed(two)
    rows = []
    for key in dict.fromkeys([*a, *b]):
        zero = dict.fromkeys(NUMBERS, 0)
        ra, rb = a.get(key, zero), b.get(key, zero)
        numbers = {n: ra[n] + (layers - 1) * (rb[n] - ra[n]) for n in zero}
        if any(numbers.values()):
            rows.append({"phase": key[0], "kind": key[1], "op": key[2], **numbers})
    syncs = {p: one["syncs"][p] + (layers - 1) * (two["syncs"][p] - one["syncs"][p]) for p in PHASES}
    return {"rows": rows, "syncs": syncs}


def summarize(trace: dict, top: int = 10) -> dict:
    """Kernels, GFLOP, GB and floor per phase and kind, the totals, and the ops with the highest floors."""
    groups: dict[str, dict[str, float]] = {}
    for r in trace["rows"]:
        g = groups.setdefault(f"{r['phase']}/{r['kind']}", {"kernels": 0, "gflop": 0.0, "gb": 0.0, "floor_ms": 0.0})
        g["kernels"] += r["kernels"]
        g["gflop"] += r["flops"] / 1e9
        g["gb"] += r["bytes"] / 1e9
        g["floor_ms"] += r["floor_ms"]
    order = [f"{p}/{k}" for p in PHASES for k in KINDS]
    groups = dict(sorted(groups.items(), key=lambda item: order.index(item[0])))
    total = {n: sum(g[n] for g in groups.values()) for n in ("kernels", "gflop", "gb", "floor_ms")}
    worst = sorted(trace["rows"], key=lambda r: -r["floor_ms"])[:top]
    return {
        "groups": groups,
        "total": {**total, "syncs": trace["syncs"]},
        "top": [{"phase": r["phase"], "op": r["op"], "kernels": r["kernels"], "gb": r["bytes"] / 1e9,
                 "floor_ms": r["floor_ms"]} for r in worst],
    }  # fmt: skip

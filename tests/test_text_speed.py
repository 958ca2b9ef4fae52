import copy
import importlib.util

import numpy as np
import pytest
import torch
from conftest import TINY_TEMPLATE as TEMPLATE

from ric.adapters import FusedLoraLinear, unfuse_adapters
from ric.text.policy import TextPolicy, num_examples, pack
from ric.text.vllm_backend import sampling_params

LONG = "hello there my friend, how are you today? I hope the weather is nice and your plants grow well. Tell me more."
EXAMPLES = [  # the two short examples fit together in the long one's length
    {"prompt": "Q: why <R1> 1.0 <R2> 2.0\nA:", "response": "ok"},
    {"prompt": "Q: hi <R1> 0.1 <R2> 0.2\nA:", "response": LONG},
    {"prompt": "Q: mid <R1> -1.0 <R2> 0.0\nA:", "response": "fine thanks"},
]


def make_policy(path, **kwargs):
    """The tiny Llama with weights scaled up, so greedy outputs and losses depend on every position."""
    torch.manual_seed(0)
    kwargs = {"lora_dropout": 0.0, **kwargs}
    policy = TextPolicy(model=path, reward_names=["verbosity", "sentiment"], template=TEMPLATE, lora_r=4, lora_alpha=8,
                        **kwargs)  # fmt: skip
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.3)
    return policy


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return make_policy(tiny_llama).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_padded(tiny_llama, attn):
    policy = make_policy(tiny_llama, attn_implementation=attn).eval()
    assert policy.lm.config._attn_implementation == attn
    padded = policy.collate(EXAMPLES)
    policy.hparams.packing = True
    packed = policy.collate(EXAMPLES)
    pad_id = policy.tokenizer.pad_token_id
    assert packed["input_ids"].shape == (2, padded["input_ids"].shape[1]) and "attention_mask" not in packed
    assert int((packed["input_ids"] == pad_id).sum()) < int((padded["input_ids"] == pad_id).sum())
    assert int((packed["input_ids"] != pad_id).sum()) == int(padded["attention_mask"].sum())
    assert num_examples(packed) == num_examples(padded) == 3
    with torch.no_grad():
        torch.testing.assert_close(policy(**packed), policy(**padded), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_wide_packing_makes_one_row_with_the_same_loss(tiny_llama, attn):
    policy = make_policy(tiny_llama, attn_implementation=attn, packing=True).eval()
    narrow = policy.collate(EXAMPLES)
    policy.hparams.packing_width = 4096
    wide = policy.collate(EXAMPLES)
    pad_id = policy.tokenizer.pad_token_id
    real = int((narrow["input_ids"] != pad_id).sum())
    assert narrow["input_ids"].shape[0] == 2 and wide["input_ids"].shape[0] == 1
    assert wide["input_ids"].shape[1] % 8 == 0 and real <= wide["input_ids"].shape[1] < real + 8
    assert int((wide["input_ids"] != pad_id).sum()) == real and num_examples(wide) == 3
    # transformers compiles flex attention; inductor's CPU flex kernel (torch 2.14) returns NaN or wrong values
    # for some of these shapes from one run to the next. What is tested here is the packing and its block mask,
    # so flex attention runs uncompiled (its reference implementation), which gives the exact loss.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(policy(**wide), policy(**narrow), atol=1e-5, rtol=1e-5)


def test_wide_rows_are_multiples_of_8_and_hold_whole_examples():
    rows = [(list(range(10)), list(range(10))), ([7, 8, 9], [7, 8, 9]), ([1] * 6, [1] * 6)]
    packed = pack(rows, 0, 13)
    assert packed["input_ids"].shape == (2, 16)  # 10 + 3 in one row, 6 in the other; 13 rounds up to 16
    assert packed["position_ids"][0, :13].tolist() == list(range(10)) + [0, 1, 2]
    assert packed["input_ids"][1, :6].tolist() == [1] * 6 and packed["labels"][1, 6:].eq(-100).all()


def test_bad_speed_settings_fail_before_loading(tmp_path):
    missing = str(tmp_path / "no-model")  # an error about the model would mean it was loaded first
    with pytest.raises(ValueError, match=r"packing_width \(-5\) needs packing: true and at least max_length \(512\)"):
        TextPolicy(model=missing, packing=True, packing_width=-5)
    with pytest.raises(ValueError, match=r"packing_width \(300\).*max_length \(512\)"):
        TextPolicy(model=missing, packing=True, packing_width=300)
    with pytest.raises(ValueError, match=r"packing_width \(2048\) needs packing: true"):
        TextPolicy(model=missing, packing_width=2048)
    with pytest.raises(ValueError, match="compile_mode 'reduce-overhead' needs compile: true"):
        TextPolicy(model=missing, compile_mode="reduce-overhead")


class AdapterOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts copies of activations (not weights) into float32, and products added in place by a matmul."""

    def __init__(self):
        super().__init__()
        self.count = self.fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32 and args[0].dim() == 3:
            self.count += 1
        self.fused += func is torch.ops.aten.addmm_.default
        return func(*args, **kwargs)


def run_step(policy, batch, autocast):
    """Loss, adapter gradients, float32 activation copies and fused adapter products of one seeded step
    (same dropout masks)."""
    policy.zero_grad()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), AdapterOps() as counter:
        loss = policy(**batch)
    loss.backward()
    grads = [p.grad.float() for n, p in policy.named_parameters() if "lora_" in n]
    return loss.detach().float(), grads, counter.count, counter.fused


def test_fused_adapters_match_peft_under_autocast(tiny_llama):
    """bf16 base, float32 adapters with dropout: under autocast our adapter layers skip peft's float32 input
    copies (one per adapted layer) and add their scaled product inside the matmul; loss and gradients match
    peft's forward to bf16 rounding (same dropout masks). Without autocast a bf16 input meets float32
    adapters, so peft's forward (with its casts) runs, bit for bit."""
    policy = make_policy(tiny_llama, dtype="bfloat16", lora_dropout=0.1)
    layers = policy.fused_adapters
    assert len(layers) == 2 * 7 and all(type(layer) is FusedLoraLinear for layer in layers)
    assert {p.dtype for n, p in policy.named_parameters() if "lora_" in n} == {torch.float32}
    batch = policy.collate(EXAMPLES)
    fused = {autocast: run_step(policy, batch, autocast) for autocast in (True, False)}
    unfuse_adapters(layers)
    peft = {autocast: run_step(policy, batch, autocast) for autocast in (True, False)}
    torch.testing.assert_close(fused[True][0], peft[True][0], rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(fused[True][1], peft[True][1]):
        torch.testing.assert_close(ours, theirs, rtol=0.1, atol=0.1 * theirs.abs().max().item())
    assert peft[True][2] - fused[True][2] == len(layers)
    assert fused[True][3] == len(layers) and fused[False][3] == peft[True][3] == 0
    assert fused[False][0] == peft[False][0] and all(torch.equal(a, b) for a, b in zip(fused[False][1], peft[False][1]))


def test_fused_adapters_in_float32_match_peft(tiny_llama):
    """All float32 (the CPU quickstart): no autocast, nothing to cast, the product added by the matmul."""
    policy = make_policy(tiny_llama, lora_dropout=0.1)
    batch = policy.collate(EXAMPLES)
    fused = run_step(policy, batch, autocast=False)
    unfuse_adapters(policy.fused_adapters)
    peft = run_step(policy, batch, autocast=False)
    assert fused[3] == len(policy.fused_adapters) == 14 and peft[3] == 0
    torch.testing.assert_close(fused[0], peft[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fused[1], peft[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_fused_adapters_fall_back_to_peft_where_they_do_not_apply(tiny_llama):
    """Disabled adapters (merged generation switches them off) and a direct call without autocast right
    after a step under autocast take peft's forward; the layers stay fused and peft's merge still works."""
    policy = make_policy(tiny_llama, dtype="bfloat16").eval()
    batch = policy.collate(EXAMPLES)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        on = policy(**batch)
        with policy.lm.disable_adapter():
            off = policy(**batch)
    with torch.no_grad():  # no autocast: a bf16 input meets float32 adapter weights through peft's casts
        assert torch.isfinite(policy.lm(**batch).loss)
    assert on != off
    merged = copy.deepcopy(policy.lm).merge_and_unload()
    assert not any(isinstance(m, FusedLoraLinear) for m in merged.modules())


def test_adapter_path_holds_through_checkpointed_recomputation(tiny_llama):
    """Non-reentrant checkpointing recomputes each block in backward, where autocast is restored: the
    adapter layers decide again and match what the forward did, even after a call without autocast."""
    policy = make_policy(tiny_llama, dtype="bfloat16", gradient_checkpointing=True)
    batch = policy.collate(EXAMPLES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = policy(**batch)
    with torch.no_grad():
        policy.lm(**batch)  # between forward and backward, without autocast
    loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_mode_reaches_every_layer(tiny_llama, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: modes.append(kwargs.get("mode")))
    make_policy(tiny_llama, compile=True, compile_mode="max-autotune-no-cudagraphs")
    make_policy(tiny_llama, compile=True)
    assert modes == ["max-autotune-no-cudagraphs"] * 2 + [None] * 2


def test_static_cache_greedy_equals_dynamic(policy):
    prompts = ["short", "a considerably longer prompt with many more words in it", "mid length prompt"]
    desired = np.array([[0.5, -1.0], [1.5, 0.0], [-2.0, 3.0]])
    dynamic = policy.generate(prompts, desired, do_sample=False, batch_size=3, max_new_tokens=6)
    static = policy.generate(prompts, desired, do_sample=False, batch_size=3, max_new_tokens=6,
                             cache_implementation="static")  # fmt: skip
    assert len(set(dynamic)) == 3 and static == dynamic


def test_gradient_checkpointing_gives_the_same_lora_grads(tiny_llama, policy):
    checkpointed = make_policy(tiny_llama, gradient_checkpointing=True)
    assert checkpointed.lm.base_model.model.model.gradient_checkpointing
    grads = []
    for model in (policy, checkpointed):
        model.train()
        model.zero_grad()
        model(**model.collate(EXAMPLES)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    policy.eval()
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


def test_checkpoint_keeps_adapter_inside_wrapped_layers(tiny_llama):
    """FSDP and activation checkpointing wrap decoder layers, which renames parameters but not state-dict
    keys; the adapter must still be what a checkpoint holds."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = make_policy(tiny_llama)
    apply_activation_checkpointing(policy, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in policy.named_parameters())
    checkpoint = {"state_dict": policy.state_dict()}
    policy.on_save_checkpoint(checkpoint)
    n_lora = sum(p.requires_grad for p in policy.parameters())
    assert n_lora > 0 and len(checkpoint["state_dict"]) == n_lora
    assert all("lora_" in k for k in checkpoint["state_dict"])


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_package_fails_before_loading(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'ric\[speed\]'"):
        TextPolicy(model=str(tmp_path / "absent"), liger_kernel=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_package_fails_before_loading(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'ric\[vllm\]'"):
        TextPolicy(model=str(tmp_path / "absent"), generation_backend="vllm")


def test_vllm_sampling_params():
    greedy = sampling_params({"max_new_tokens": 8, "do_sample": False}, eos_token_id=2)
    assert greedy == {"max_tokens": 8, "min_tokens": 0, "temperature": 0.0, "top_p": 1.0, "stop_token_ids": [2]}
    sampled = sampling_params({"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0.7, "top_p": 0.9}, 2)
    assert (sampled["min_tokens"], sampled["temperature"], sampled["top_p"]) == (8, 0.7, 0.9)
    with pytest.raises(ValueError, match="num_beams"):
        sampling_params({"max_new_tokens": 8, "num_beams": 4}, 2)


def base_weights(policy):
    return {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" not in n}


def test_merged_generation_equals_adapter_generation_and_restores_weights(policy):
    prompts = ["short", "a considerably longer prompt with many more words in it", "mid length prompt"]
    desired = np.array([[0.5, -1.0], [1.5, 0.0], [-2.0, 3.0]])
    layers = policy._mergeable_lora_layers()
    assert len(layers) == 2 * 7  # every adapted projection of both decoder layers
    before = base_weights(policy)
    with policy.generation_session():  # inside: the adapter is in the weights and switched off
        inside = base_weights(policy)
        assert all(layer.disable_adapters for layer in layers)
        changed = [n for n in before if not torch.equal(before[n], inside[n])]
        assert len(changed) == 2 * 7 and all("proj" in n for n in changed)
    merged = policy.generate(prompts, desired, do_sample=False, batch_size=3, max_new_tokens=6)
    after = base_weights(policy)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(layer.disable_adapters for layer in layers)  # the adapter is switched back on
    policy.hparams.generation_backend = "vllm"
    assert policy._mergeable_lora_layers() == []
    policy.hparams.generation_backend = "hf"
    policy.hparams.merge_lora_for_generation = False
    try:
        assert policy._mergeable_lora_layers() == []
        unmerged = policy.generate(prompts, desired, do_sample=False, batch_size=3, max_new_tokens=6)
    finally:
        policy.hparams.merge_lora_for_generation = True
    assert len(set(merged)) == 3 and merged == unmerged


def test_merge_is_skipped_for_weights_that_are_not_full(tiny_llama):
    """Sharded weights (ZeRO-3 / FSDP leave empty or partial tensors outside their forward) are not merged."""
    policy = make_policy(tiny_llama)
    layer = policy._mergeable_lora_layers()[0]
    layer.get_base_layer().weight.data = torch.empty(0)
    assert policy._mergeable_lora_layers() == []


def test_merged_generation_keeps_a_frozen_adapter_frozen(tiny_llama):
    policy = make_policy(tiny_llama).eval()
    for name, param in policy.named_parameters():
        param.requires_grad_("lora_A" in name)  # e.g. half an adapter frozen, or all of it for inference
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    policy.generate(["hello"], np.array([[0.0, 0.0]]), do_sample=False, max_new_tokens=2)
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_merge_restores_weights_when_generation_fails(policy, monkeypatch, batching):
    from ric.text.batching import ContinuousBatcher

    before = base_weights(policy)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory halfway")

    monkeypatch.setitem(policy.hparams, "generation_batching", batching)
    if batching == "static":
        monkeypatch.setattr(policy.lm, "generate", boom)
    else:
        monkeypatch.setattr(ContinuousBatcher, "step", boom)
    with pytest.raises(RuntimeError, match="halfway"):
        policy.generate(["hello"], np.array([[0.0, 0.0]]), do_sample=False, max_new_tokens=2)
    after = base_weights(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_regional_compile_keeps_names_loss_and_generation(tiny_llama, policy):
    compiled = make_policy(tiny_llama, compile=True).eval()
    layers = compiled.lm.base_model.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in policy.named_parameters()]
    batch = policy.collate(EXAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch), policy(**batch), atol=1e-5, rtol=1e-5)
    prompts, desired = ["short", "mid length prompt"], np.array([[0.5, -1.0], [1.5, 0.0]])
    settings = {"do_sample": False, "batch_size": 2, "max_new_tokens": 5}
    assert compiled.generate(prompts, desired, **settings) == policy.generate(prompts, desired, **settings)


def test_compiled_static_decoding_compiles_once_and_matches_dynamic(policy):
    """Five prompts of spread lengths in batches of 2, one over 64 tokens: the last batch is filled up and the
    longest batch goes first, so the cache length never grows and decoding compiles one graph; greedy
    outputs equal the dynamic cache's."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    long = "a very long prompt that goes on " + "and on and on " * 12  # over 64 tokens: widths 64 and 128
    prompts = ["short", "a considerably longer prompt with many more words in it", "mid length prompt", "x", long]
    desired = np.zeros((len(prompts), 2))
    reference = policy.generate(prompts, desired, do_sample=False, batch_size=2, max_new_tokens=5)
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers compiles decoding on CUDA only unless asked
    torch._dynamo.reset()
    counters.clear()
    settings = {"cache_implementation": "static", "disable_compile": False, "compile_config": config}
    for _ in range(2):
        out = policy.generate(prompts, desired, do_sample=False, batch_size=2, max_new_tokens=5, **settings)
        assert out == reference
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compiled_layers_hold_their_adapters_in_one_graph(tiny_llama, monkeypatch):
    """A compiled decoder layer traces its fused adapters without a graph break, under autocast too: torch
    2.11's dynamo could not trace the autocast availability check (emulated here), and a break at every
    adapter split each layer's fused kernels."""
    from torch._dynamo.utils import counters

    def untraceable(device: str) -> bool:
        torch._dynamo.graph_break()
        return True

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    policy = make_policy(tiny_llama, compile=True, lora_dropout=0.1)
    assert all(type(m) is FusedLoraLinear for m in policy.fused_adapters) and len(policy.fused_adapters) == 14
    torch._dynamo.reset()
    counters.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = policy(**policy.collate(EXAMPLES))
    loss.backward()
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_compiled_layers_run_plainly_in_generation(tiny_llama, policy):
    """Generation sets the layers' compiled calls aside (prompt widths would recompile them past dynamo's
    limit) and restores them; with compiled static-cache decoding only transformers' decoding step compiles."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    compiled = make_policy(tiny_llama, compile=True).eval()
    calls = [layer._compiled_call_impl for layer in compiled.lm.base_model.model.model.layers]
    prompts = ["short", "a considerably longer prompt with many more words in it", "mid length prompt", "x"]
    desired = np.zeros((len(prompts), 2))
    reference = policy.generate(prompts, desired, do_sample=False, batch_size=2, max_new_tokens=4)
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    settings = {"cache_implementation": "static", "disable_compile": False, "compile_config": config}
    torch._dynamo.reset()
    counters.clear()
    assert compiled.generate(prompts, desired, do_sample=False, batch_size=2, max_new_tokens=4, **settings) == reference
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.generate(prompts, desired, do_sample=False, batch_size=2, max_new_tokens=4) == reference
    assert [layer._compiled_call_impl for layer in compiled.lm.base_model.model.model.layers] == calls
    torch._dynamo.reset()


def test_compiled_layers_stop_recompiling_as_packed_widths_vary(tiny_llama):
    """Every batch packs to another width; after one recompile the layers' shapes are dynamic, so later
    widths reuse the same graphs (a recompile per batch would soon hit dynamo's limit and fall back to eager)."""
    from torch._dynamo.utils import counters

    policy = make_policy(tiny_llama, compile=True, packing=True, packing_width=1024)
    torch._dynamo.reset()
    counters.clear()
    graphs, widths = [], []
    for k in range(5):
        examples = [dict(ex, response=ex["response"] + " more" * (4 * k + j)) for j, ex in enumerate(EXAMPLES)]
        batch = policy.collate(examples)
        widths.append(batch["input_ids"].shape[1])
        with torch.no_grad():
            policy(**batch)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(widths)) == 5 and graphs[0] > 0
    assert graphs[-1] == graphs[2] <= 2 * graphs[0]

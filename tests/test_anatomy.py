import json

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

TINY = ["--shape", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--matmul-size", "256", "--repeats", "1",
        "--batch-size", "4", "--seq-len", "32", "--sections", "anatomy", "--tflops", "10", "--gbs", "100"]  # fmt: skip


@pytest.fixture
def anatomy():
    from benchmarks import anatomy

    return anatomy


def lora_llama(layers: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    return get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))


def traced(anatomy, layers: int) -> dict:
    lm = lora_llama(layers)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    ids = torch.randint(0, 100, (2, 16))
    return anatomy.trace_step(lambda: lm(input_ids=ids, labels=ids).loss, optimizer, True, 1e12, 1e11)


def test_depth_extrapolates_exactly(anatomy):
    """Layers are alike: traces of 1 and 2 layers give a 3-layer step's kernels, FLOPs, bytes and floor."""
    one, two, three = (traced(anatomy, n) for n in (1, 2, 3))

    def table(trace):
        return {(r["phase"], r["kind"], r["op"]): r for r in trace["rows"]}

    guess, truth = table(anatomy.extrapolate(one, two, 3)), table(three)
    assert guess.keys() == truth.keys()
    for key, row in truth.items():
        for number in ("kernels", "flops", "bytes", "floor_ms"):
            assert guess[key][number] == pytest.approx(row[number]), (key, number)
    mm = ("forward", "matmul", "mm (thin)")  # every dimension of this model is small
    assert table(two)[mm]["kernels"] > table(one)[mm]["kernels"]
    # CUDA's dropout path: one kernel each way, not the CPU's bernoulli_ / div_ / mul
    ops = {r["op"] for r in three["rows"]}
    assert {"native_dropout", "native_dropout_backward"} <= ops and "bernoulli_" not in ops


def test_counts_flops_bytes_and_syncs_per_op(anatomy):
    a = torch.randn(32, 64, dtype=torch.bfloat16)
    b = torch.randn(64, 300, dtype=torch.bfloat16)
    trace = anatomy.StepTrace(flops_per_s=1e9, bytes_per_s=1e9)
    with trace:
        c = a @ b  # 2 x 32 x 64 x 300 FLOPs; reads a and b, writes c
        c.t().reshape(-1)  # a view, then a copy (reads and writes 32 x 300)
        c.fill_(1.0)  # writes c without reading it
        float(c.sum())  # a reduction, and a sync
    rows = {name: numbers for (_, _, name), numbers in trace.table.items()}
    assert rows["mm (thin)"]["flops"] == 2 * 32 * 64 * 300
    assert rows["mm (thin)"]["bytes"] == 2 * (32 * 64 + 64 * 300 + 32 * 300)
    assert rows["mm (thin)"]["floor_ms"] == pytest.approx(1e3 * 2 * 32 * 64 * 300 / 1e9)  # FLOP-bound here
    assert rows["fill_"]["bytes"] == 2 * 32 * 300 and rows["clone"]["bytes"] == 2 * 2 * 32 * 300
    assert "t" not in rows and "view" not in rows and rows["sum"]["kernels"] == 1
    assert trace.syncs == {"forward": 1, "backward": 0, "optimizer": 0}


def test_writes_of_in_place_and_out_ops_count(anatomy):
    """Multi-tensor updates return nothing and ``out=`` ops write an argument: their writes still count."""
    a, b, c, d, e = (torch.ones(1000) for _ in range(5))  # 4,000 bytes each
    trace = anatomy.StepTrace(flops_per_s=1e9, bytes_per_s=1e9)
    with trace:
        torch._foreach_add_([a, b], [c, d])  # reads a, b, c, d; writes a, b
        torch.add(a, c, out=e)  # reads a, c; writes e
        base, low, up = torch.zeros(8, 300), torch.ones(8, 4), torch.ones(4, 300)
        base.addmm_(low, up, alpha=0.5)  # a matmul, in place
    rows = {name: numbers for (_, _, name), numbers in trace.table.items()}
    assert rows["_foreach_add_"]["bytes"] == 6 * 4000 and rows["add"]["bytes"] == 3 * 4000
    assert rows["addmm_ (thin)"]["flops"] == 2 * 8 * 4 * 300 and torch.allclose(base, torch.full((8, 300), 2.0))
    assert ("forward", "matmul", "addmm_ (thin)") in trace.table


def test_throughput_anatomy_section(tmp_path):
    """The section traces HF + peft and our eager variants (compiled ones are left out); keeping peft's float32
    copies of adapter inputs moves more bytes for the same FLOPs, and adapting q / v only does less work."""
    from benchmarks import throughput

    stacks = {}
    for targets in ("all", "authors"):
        out = tmp_path / f"{targets}.json"
        args = [*TINY, "--sft-variants", "eager,eager+peft-forward,compile", "--lora-targets", targets]
        throughput.main([*args, "--out", str(out)])
        result = json.loads(out.read_text())
        assert set(result) >= {"anatomy", "matmul"} and "sft" not in result and result["partial"] is False
        a = result["anatomy"]
        assert a["layers"] == 2 and a["rates_given"] and a["tflops"] == 10 and a["gbs"] == 100
        stacks[targets] = a["stacks"]
    assert set(stacks["all"]) == {"HF + peft", "eager", "eager+peft-forward"}
    eager, casts = stacks["all"]["eager"], stacks["all"]["eager+peft-forward"]
    assert casts["total"]["gflop"] == pytest.approx(eager["total"]["gflop"])
    assert casts["total"]["gb"] > eager["total"]["gb"] and casts["total"]["kernels"] > eager["total"]["kernels"]
    for name, st in stacks["all"].items():
        fewer = stacks["authors"][name]["total"]
        assert fewer["kernels"] < st["total"]["kernels"] and fewer["gflop"] < st["total"]["gflop"], name
        assert 0 < st["mfu_at_floor"] and st["floor_tokens_per_s"] > 0
        assert st["total"]["floor_ms"] == pytest.approx(sum(g["floor_ms"] for g in st["groups"].values()))

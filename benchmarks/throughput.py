"""Training, generation and reward-scoring throughput of ric's text stack vs the authors' plain HF stack.

Everything is measured side by side in one run, against a matmul ceiling measured in the same run:

* SFT: our training step (TextPolicy, LoRA r=64 on all Llama projections, packed batches, sdpa; each switch set
  of ``--sft-variants``: eager, flex attention, Liger kernels, regional torch.compile) vs a plain HF + peft loop on the
  same examples
  (``model(**padded).loss.backward(); optimizer.step()``, AdamW on the LoRA weights). Tokens/s count real
  (non-pad) tokens; MFU = 4 x base-model parameters x tokens/s / matmul FLOP/s (frozen base: forward + input grads).
* generation: TextPolicy.generate at a batch size, in each set-up of ``--gen-variants`` (adapter unmerged;
  merged; merged + static KV cache with compiled decoding), vs HF ``generate`` one prompt at a time (the
  authors' way) and HF ``generate`` at the same batch size; every arm makes exactly ``--new-tokens`` tokens
  per prompt. A variant that fails is recorded with its error and the others still run; the JSON is written
  after every section.
* reward scoring: samples/s in batches vs one pair per call (a random-initialized GPT-2 classifier, the class
  of the paper's reward models: gpt2-large shape with ``--shape llama2-7b``).
* anatomy (only when ``--sections`` names it): the SFT step of HF + peft and of each eager variant traced op
  by op (``anatomy.py``): kernels, FLOPs, bytes moved, and the floor they set at a matmul rate and a memory
  bandwidth (``--tflops`` / ``--gbs``, e.g. a GPU's, or measured in the run). A 7B step traces on a CPU.

``--lora-targets authors`` adapts only the query and value projections, ours and HF's alike: what the authors'
code trains (its LoraConfig names no modules, so peft uses its Llama default); ``all`` (default) is ours.

Shapes: ``smollm2`` (the offline SmolLM2-135M weights, default on CPU), ``llama2-7b`` (random-initialized
Llama-2-7B shape in bf16, for a GPU), ``tiny`` (a smoke run in seconds). Random shapes need no network and no
gguf: the SmolLM2 tokenizer is used when it loads, else a byte-level stand-in (prompts only need token ids).

    .venv/bin/python -m benchmarks.throughput --sft-variants eager,compile \
        --gen-variants adapter,merged,merged+static --out benchmarks/results/throughput_cpu.json
    python3 -m benchmarks.throughput --shape llama2-7b --sft-variants eager,liger,compile \
        --gen-variants merged,merged+static --out benchmarks/results/throughput_cuda.json
    .venv/bin/python -m benchmarks.throughput --shape llama2-7b --tokenizer bytes --dtype bfloat16 --sections anatomy \
        --lengths full --sft-variants eager,eager+peft-forward --tflops 781 --gbs 3350 --out anatomy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch._dynamo.utils import counters

from benchmarks.anatomy import extrapolate, summarize, trace_step
from benchmarks.measure import copy_bandwidth, matmul_ceiling, profile_step, scoring_speed, synchronize, timed
from ric.adapters import unfuse_adapters
from ric.text.datasets import Quickstart
from ric.text.models import load_causal_lm, load_tokenizer, resolve
from ric.text.policy import LLAMA_PROJECTIONS, TextPolicy, pad
from ric.text.rewards import HFRewardModel

#: random-initialized Llama shapes (``smollm2`` loads the real weights instead)
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 0, "max_position_embeddings": 2048},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                  "rms_norm_eps": 1e-5},
}  # fmt: skip
#: reward-model (GPT-2 classifier) shape per policy shape: gpt2-large is the paper's harmless/helpful model
REWARD_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 4},
    "smollm2": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "llama2-7b": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
}
#: per-device defaults: a CPU run takes minutes, a GPU run of the 7B shape a few minutes
DEFAULTS = {
    "cpu": {
        "matmul_size": 2048,
        "steps": 1,
        "warmup": 1,
        "gen_batch": 16,
        "new_tokens": 32,
        "score_samples": 64,
        "score_batch": 16,
    },
    "cuda": {
        "matmul_size": 8192,
        "steps": 10,
        "warmup": 2,
        "gen_batch": 64,
        "new_tokens": 128,
        "score_samples": 256,
        "score_batch": 64,
    },
}
LORA = {"lora_r": 64, "lora_alpha": 128, "lora_dropout": 0.05}
#: which projections get adapters (``--lora-targets``): ours adapts all of them; the authors' LoraConfig names
#: none, so peft falls back to its Llama default, the query and value projections
LORA_TARGETS = {"all": LLAMA_PROJECTIONS, "authors": ("q_proj", "v_proj")}
TEMPLATE = "{prompt} {rewards}\n\nAssistant:"


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, BOS, EOS, pad) built offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|pad|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|pad|>"
    )


def tokenizer_for(name: str) -> tuple[transformers.PreTrainedTokenizerBase, str]:
    """The named tokenizer (``smollm2`` or a folder), or the byte-level stand-in (``bytes``, or where the named
    one cannot load: then a 7B shape keeps Llama-2's 32,000-token vocabulary)."""
    if name == "bytes":
        return byte_tokenizer(), "bytes"
    try:
        return load_tokenizer(name), name
    except (ImportError, OSError, ValueError) as err:
        print(f"tokenizer {name!r} unavailable ({type(err).__name__}: {err}); using a byte-level tokenizer")
        return byte_tokenizer(), "bytes"


def llama_config(shape: str, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PretrainedConfig:
    """The shape's model config with the tokenizer's special ids; ``smollm2`` takes the offline model's."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    if shape == "smollm2":
        source, gguf = resolve("smollm2")
        config = transformers.AutoConfig.from_pretrained(source, gguf_file=gguf)
        config.update({**ids, "vocab_size": max(config.vocab_size, len(tokenizer))})
        return config
    settings = dict(LLAMA_SHAPES[shape])
    settings["vocab_size"] = max(settings["vocab_size"], len(tokenizer))  # the model must cover every token id
    return transformers.LlamaConfig(**settings, **ids, tie_word_embeddings=shape == "tiny")


def random_llama(shape: str, tokenizer: transformers.PreTrainedTokenizerBase, folder: Path,
                 layers: int | None = None) -> str:  # fmt: skip
    """Write a random-weight model reference (config.json + tokenizer) for TextPolicy / load_causal_lm;
    ``layers`` overrides the decoder depth."""
    config = llama_config(shape, tokenizer)
    if layers is not None:
        config.num_hidden_layers = layers
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder / "config.json")


def random_reward(shape: str, tokenizer: transformers.PreTrainedTokenizerBase, folder: Path, dtype: str) -> str:
    """Save a random-initialized GPT-2 sequence classifier (one score) with the tokenizer; returns the folder."""
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **REWARD_SHAPES[shape],
    )  # fmt: skip
    transformers.GPT2ForSequenceClassification(config).to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sft_examples(
    tokenizer: transformers.PreTrainedTokenizerBase, batch: int, seq_len: int, full: bool = False
) -> list[dict]:
    """``batch`` (prompt, response) examples cut from the quickstart answers, a quarter prompt. Spread
    lengths, ``seq_len / 8 .. seq_len`` tokens: padding them to the longest wastes over 40% of a padded batch.
    ``full``: every example longer than ``seq_len``, so each row is cut to exactly ``seq_len`` tokens (the
    batch x seq tokens the reference HF + peft numbers count)."""
    text = " ".join(r["response"] for r in Quickstart().load())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    examples = []
    for i in range(batch):
        n = seq_len + 16 if full else seq_len // 8 + (seq_len - seq_len // 8) * i // max(1, batch - 1)
        start = (i * 997) % max(1, len(ids) - n)
        chunk = ids[start : start + n]
        cut = max(1, n // 4)
        examples.append({"prompt": tokenizer.decode(chunk[:cut]), "response": tokenizer.decode(chunk[cut:])})
    return examples


def sft_step(model_call: Any, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device, bf16: bool) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model_call(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_sft(model_call: Any, optimizer: Any, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Median seconds of one training step (forward, backward, optimizer) after warm-up steps, and with
    ``--profile`` where a step's time goes."""
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> None:
        sft_step(model_call, optimizer, batch, device, args.bf16)

    for _ in range(args.warmup):
        step()
    return {"step_s": timed(step, args.steps, device), "profile": profile_step(step, device) if args.profile else None}


def hf_generate(
    lm: Any, tokenizer: Any, texts: Sequence[str], new_tokens: int, device: torch.device, bf16: bool
) -> None:
    """Plain HF ``generate`` on one left-padded batch of texts, exactly ``new_tokens`` per prompt."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        lm.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    """Release the last stack's memory (compiled graphs hold references to its weights)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: benchmark-only switch: peft's own adapter forward (float32 input copies, separate scaling and sum), to
#: measure what ours saves
PEFT_FORWARD = "peft_forward"
#: packing width that holds a whole batch of the benchmark in one row
WIDE = 1 << 16
#: our SFT step's switch sets (``--sft-variants``) and generation set-ups (``--gen-variants``)
SFT_VARIANTS = {
    "eager": {},
    "eager+peft-forward": {PEFT_FORWARD: True},  # peft's adapter forward (what ric.adapters replaces)
    "compile": {"compile": True},
    "compile+peft-forward": {"compile": True, PEFT_FORWARD: True},
    "flex": {"attn_implementation": "flex_attention"},  # block masks for packed rows instead of dense ones
    "wide": {"packing_width": WIDE},  # one row with a dense block-causal mask: quadratic attention
    "flex+wide": {"attn_implementation": "flex_attention", "packing_width": WIDE},  # the batch in one row
    "compile+flex+wide": {"compile": True, "attn_implementation": "flex_attention", "packing_width": WIDE},
    "compile+autotune": {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"},
    "compile+cudagraphs": {"compile": True, "compile_mode": "reduce-overhead"},
    "liger": {"liger_kernel": True},
    "liger+compile": {"liger_kernel": True, "compile": True},
}
GEN_VARIANTS = {
    "adapter": {"merge": False, "static": False},  # the adapter's matmuls in every step, dynamic KV cache
    "merged": {"merge": True, "static": False},  # adapter merged into the weights for the call
    "merged+static": {"merge": True, "static": True},  # plus a static KV cache, compiled decoding on CUDA
}


SECTIONS = ("generation", "sft", "scoring", "anatomy")
#: measured unless asked: the anatomy section traces op by op instead of timing
DEFAULT_SECTIONS = SECTIONS[:3]


def variant_list(text: str, known: dict, option: str) -> list[str]:
    """The comma-separated names of ``option``, each one of ``known``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise SystemExit(f"{option}: unknown name(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["smollm2", "llama2-7b", "tiny"], default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="weights and compute: bfloat16 (bf16 base, autocast) or float32; auto = bfloat16 on a GPU",
    )
    parser.add_argument(
        "--tokenizer", default="smollm2", help="for random shapes: smollm2, bytes (what GPU runs use) or a folder"
    )
    parser.add_argument("--matmul-size", type=int, help="n of the n x n matmuls that measure the ceiling")
    parser.add_argument("--steps", type=int, help="timed SFT steps (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed SFT steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gen-batch", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--single-prompts", type=int, default=2, help="prompts generated one at a time")
    parser.add_argument("--score-samples", type=int)
    parser.add_argument("--score-batch", type=int)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of generation and scoring")
    parser.add_argument(
        "--lengths",
        choices=["spread", "full"],
        default="spread",
        help="SFT examples of spread lengths (what packing is for), or all cut to --seq-len (batch x seq tokens)",
    )
    parser.add_argument(
        "--lora-targets",
        choices=list(LORA_TARGETS),
        default="all",
        help="adapted projections, ours and HF's: all (our configs) or authors (q_proj, v_proj: their code's)",
    )
    parser.add_argument("--no-packing", dest="packing", action="store_false", help="our step on padded batches")
    parser.add_argument(
        "--sft-variants",
        default="eager",
        help=f"comma-separated switch sets of our SFT step: {', '.join(SFT_VARIANTS)}",
    )
    parser.add_argument(
        "--gen-variants",
        default="adapter,merged",
        help=f"comma-separated generation set-ups: {', '.join(GEN_VARIANTS)}",
    )
    parser.add_argument("--profile", action="store_true", help="profile SFT steps: where the time goes (kernels)")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated parts to measure: {', '.join(SECTIONS)} (anatomy: the SFT step's kernels, FLOPs,"
        " bytes and their floor, traced op by op for HF + peft and our eager variants)",
    )
    parser.add_argument("--tflops", type=float, help="anatomy: matmul rate of the floors (default: measured here)")
    parser.add_argument(
        "--gbs", type=float, help="anatomy: memory bandwidth (GB/s) of the floors (default: measured here)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)  # fmt: skip
    args.command = shlex.join(["-m", "benchmarks.throughput", *(sys.argv[1:] if argv is None else argv)])
    for key, value in DEFAULTS["cuda" if torch.device(args.device).type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Liger patches transformers' Llama module for the whole process (classes, RoPE, the LM forward), so any
    # model built after a Liger variant would carry its kernels: those variants run last
    args.sft_variants = sorted(
        variant_list(args.sft_variants, SFT_VARIANTS, "--sft-variants"), key=lambda name: "liger" in name
    )
    args.gen_variants = variant_list(args.gen_variants, GEN_VARIANTS, "--gen-variants")
    args.sections = variant_list(args.sections, dict.fromkeys(SECTIONS), "--sections")
    args.bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and torch.device(args.device).type == "cuda")
    return args


def make_policy(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, **switches: Any) -> Any:
    peft_forward = switches.pop(PEFT_FORWARD, False)
    with device:
        policy = TextPolicy(
            model=model_ref, reward_names=["harmless", "helpful"], template=TEMPLATE, dtype=dtype, **LORA,
            lora_target_modules=list(LORA_TARGETS[args.lora_targets]),
            max_length=args.seq_len, packing=args.packing, **{"attn_implementation": "sdpa", **switches},
        )  # fmt: skip
    if peft_forward:
        unfuse_adapters(policy.fused_adapters)
    return policy.to(device)


def attempt(name: str, fn: Any, device: torch.device) -> dict:
    """One variant's measurement; a failure (a missing kernel package, a compile error, out of memory) is
    recorded with its message instead of ending the run, and its memory is released either way."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - every variant's failure is reported, the others still run
        print(f"variant {name} failed: {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    finally:
        free(device)


def our_stack(args: argparse.Namespace, name: str, model_ref: str, dtype: str, device: torch.device) -> tuple:
    """Our policy with one variant's switches, its loss call, its optimizer and its (packed) batch on the device."""
    policy = make_policy(args, model_ref, dtype, device, **SFT_VARIANTS[name])
    examples = sft_examples(policy.tokenizer, args.batch_size, args.seq_len, args.lengths == "full")
    batch = {k: v.to(device) for k, v in policy.collate(examples).items()}
    return policy, lambda b: policy(**b), policy.configure_optimizers()["optimizer"], batch


def hf_stack(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, tokenizer: Any,
             padded: dict) -> tuple:  # fmt: skip
    """The HF + peft model in training mode, its loss call, AdamW on the LoRA weights, the padded rows."""
    lm, _ = hf_peft(args, model_ref, dtype, device, tokenizer)
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1.41e-4)
    return lm, lambda b: lm(**b).loss, optimizer, {k: v.to(device) for k, v in padded.items()}


def base_parameters(module: torch.nn.Module) -> int:
    """The frozen base model's parameters, the count MFU is defined on (the adapters' are not model FLOPs)."""
    return sum(p.numel() for p in module.parameters() if not p.requires_grad)


def mfu(parameters: int, tokens_per_s: float, flops_per_s: float) -> float:
    """Model FLOPs utilization of a LoRA step: forward plus input gradients, 4 FLOPs per parameter and token."""
    return 4 * parameters * tokens_per_s / flops_per_s


def measure_sft_variant(args: argparse.Namespace, name: str, model_ref: str, dtype: str, device: torch.device) -> dict:
    """Our training step with one set of switches: the policy's optimizer and its (packed) collated batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, call, optimizer, batch = our_stack(args, name, model_ref, dtype, device)
    counters.clear()
    start = time.perf_counter()
    sft_step(call, optimizer, batch, device, args.bf16)
    synchronize(device)
    first = time.perf_counter() - start  # includes compilation, if any
    measured = measure_sft(call, optimizer, batch, args, device)
    result = {
        "switches": {"attn_implementation": "sdpa", "packing": args.packing, **SFT_VARIANTS[name]},
        "first_step_s": first,
        "step_s": measured["step_s"],
        "peak_memory_gb": peak_memory_gb(device),
        "computed_tokens": int(batch["input_ids"].numel()),
    }
    if measured["profile"]:
        result["profile"] = measured["profile"]
    if SFT_VARIANTS[name].get("compile"):  # a graph break splits a decoder layer's fused kernels
        result.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    return result


def measure_generation_variants(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device) -> dict:
    """TextPolicy.generate under each generation set-up, on one policy (the adapter made non-zero first, so
    merging changes the weights as it would after training)."""
    policy = make_policy(args, model_ref, dtype, device)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    prompts = list(dict.fromkeys(r["prompt"] for r in Quickstart().load()))
    prompts = [prompts[i % len(prompts)] for i in range(args.gen_batch)]
    desired = np.ones((len(prompts), 2))
    out: dict[str, Any] = {"texts": policy.condition(prompts, desired), "variants": {}}
    for name in args.gen_variants:
        spec = GEN_VARIANTS[name]
        settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True,
                    "batch_size": args.gen_batch}  # fmt: skip
        if spec["static"]:
            settings.update(cache_implementation="static", disable_compile=False)
        policy.hparams.merge_lora_for_generation = spec["merge"]
        run = partial(time_generation, policy, prompts, desired, settings, args.repeats, device, args.bf16)
        out["variants"][name] = attempt(f"generation {name}", run, device)
    return out


def time_generation(policy: Any, prompts: list[str], desired: np.ndarray, settings: dict, repeats: int,
                    device: torch.device, bf16: bool) -> dict:  # fmt: skip
    """Seconds of a first call (warm-up, and compilation if any) and the median of ``repeats`` more, in one
    generation session as in an online round or a sweep; entering it (merging the adapter) is timed apart."""

    def generate() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            policy.generate(prompts, desired, **settings)

    session = policy.generation_session()
    enter = timed(session.__enter__, 1, device)
    try:
        first = timed(generate, 1, device)
        return {"session_enter_s": enter, "first_call_s": first, "generate_s": timed(generate, repeats, device)}
    finally:
        session.__exit__(None, None, None)


def hf_peft(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, tokenizer: Any
            ) -> tuple[Any, Any]:  # fmt: skip
    """The authors' stack: the HF model with peft's LoRA (the paper's settings) on ``--lora-targets``."""
    from peft import LoraConfig, get_peft_model

    with device:
        lm, tok = load_causal_lm(model_ref, dtype=getattr(torch, dtype), tokenizer=tokenizer)
        lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=list(LORA_TARGETS[args.lora_targets]),
                          task_type="CAUSAL_LM")  # fmt: skip
        lm = get_peft_model(lm, lora)
    return lm.to(device), tok


def padded_batch(args: argparse.Namespace, tokenizer: Any, work: Path) -> dict:
    """The SFT examples as the authors' loop sees them: right-padded rows, tokenized exactly as TextPolicy
    does (a tiny policy with the same tokenizer and template, so no large model is built for it)."""
    policy = make_policy(args, random_llama("tiny", tokenizer, work / "tiny"), "float32", torch.device("cpu"))
    examples = sft_examples(policy.tokenizer, args.batch_size, args.seq_len, args.lengths == "full")
    return pad(policy.training_rows(examples), policy.tokenizer.pad_token_id)


def measure_hf_sft(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, tokenizer: Any,
                   padded: dict) -> dict:  # fmt: skip
    """A plain training step of the HF + peft model on padded rows, AdamW on the LoRA weights."""
    lm, call, optimizer, batch = hf_stack(args, model_ref, dtype, device, tokenizer, padded)
    measured = measure_sft(call, optimizer, batch, args, device)
    return {**measured, "parameters": base_parameters(lm)}


def measure_hf_generation(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device,
                          tokenizer: Any, texts: Sequence[str]) -> dict:  # fmt: skip
    """HF ``generate`` on the same prompts: all of them in one batch, and a few one at a time."""
    lm, tok = hf_peft(args, model_ref, dtype, device, tokenizer)
    lm.eval()
    singles = texts[: args.single_prompts]
    with torch.no_grad():
        hf_generate(lm, tok, texts[:2], 4, device, args.bf16)  # warm-up
        batched = timed(lambda: hf_generate(lm, tok, texts, args.new_tokens, device, args.bf16), args.repeats, device)
        single = timed(
            lambda: [hf_generate(lm, tok, [t], args.new_tokens, device, args.bf16) for t in singles], 1, device
        )
    return {"generate_s": batched, "single_s": single, "single_prompts": len(singles)}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)

    def save(result: dict) -> None:  # after every section: a run cut short still leaves what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory(prefix="ric-throughput-") as work:
        result = measure_all(args, Path(work), save)
    report(result)
    if args.out:
        print(args.out)
    return result


def best(variants: dict, key: str) -> str:
    """The fastest variant that ran (smallest ``key``)."""
    ran = {name: v for name, v in variants.items() if "error" not in v}
    if not ran:
        raise SystemExit(f"every variant failed: {json.dumps(variants, indent=2)}")
    return min(ran, key=lambda name: ran[name][key])


def measure_all(args: argparse.Namespace, work: Path, save: Any = lambda result: None) -> dict:
    """The sections in ``args.sections``, one stack at a time on the device; ``work`` holds the random
    models' files. The JSON is saved after each section."""
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = "bfloat16" if args.bf16 else "float32"
    torch.manual_seed(0)
    if args.shape == "smollm2":
        model_ref, tokenizer_name = "smollm2", "smollm2"
        tokenizer = load_tokenizer("smollm2")
    else:
        tokenizer, tokenizer_name = tokenizer_for(args.tokenizer)
        model_ref = random_llama(args.shape, tokenizer, work / "policy")

    ceiling = matmul_ceiling(device, getattr(torch, dtype), args.matmul_size, args.repeats)
    bandwidth = copy_bandwidth(device, repeats=args.repeats)
    cpu_name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    result: dict[str, Any] = {  # fmt: skip
        "device": torch.cuda.get_device_name(device) if gpu else cpu_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shape": args.shape,
        "dtype": dtype,
        "tokenizer": tokenizer_name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "matmul": {"dtype": dtype, "tflops": ceiling / 1e12},
        "memory": {"copy_gbs": bandwidth / 1e9},
        "partial": True,
    }  # fmt: skip
    if "generation" in args.sections:
        result["generation"] = measure_generation(args, model_ref, dtype, device, tokenizer, save, result)
    if "sft" in args.sections:
        result["sft"] = measure_sft_all(args, model_ref, dtype, device, tokenizer, work, ceiling, save, result)
    if "anatomy" in args.sections:
        flops_per_s = args.tflops * 1e12 if args.tflops else ceiling
        bytes_per_s = args.gbs * 1e9 if args.gbs else bandwidth
        result["anatomy"] = measure_anatomy(args, dtype, device, tokenizer, work, flops_per_s, bytes_per_s)
        save(result)
    if "scoring" in args.sections:
        reward_folder = random_reward(args.shape, tokenizer, work / "reward", dtype)
        reward = HFRewardModel("harmless", reward_folder, "pair", dtype=dtype, device=str(device))
        records = Quickstart().load()
        pairs = [records[i % len(records)] for i in range(args.score_samples)]
        prompts, samples = [r["prompt"] for r in pairs], [r["response"] for r in pairs]
        scoring = scoring_speed(reward, prompts, samples, args.score_batch, args.repeats)
        scoring["reward"] = f"random-initialized GPT-2 classifier {REWARD_SHAPES[args.shape]}"
        result["scoring"] = scoring
    result.update(peak_memory_gb=peak_memory_gb(device), partial=False)
    save(result)
    return result


def measure_generation(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, tokenizer: Any,
                       save: Any, result: dict) -> dict:  # fmt: skip
    """Our generation set-ups, then HF ``generate`` batched and at batch 1."""
    generation = measure_generation_variants(args, model_ref, dtype, device)
    free(device)
    result["generation"] = {"variants": generation["variants"]}
    save(result)
    hf = attempt("HF generate", partial(measure_hf_generation, args, model_ref, dtype, device, tokenizer,
                                       generation["texts"]), device)  # fmt: skip
    if "error" in hf:
        raise SystemExit(f"the HF generation baseline failed: {hf['error']}")
    gen_tokens = len(generation["texts"]) * args.new_tokens
    hf_batch1 = hf["single_prompts"] * args.new_tokens / hf["single_s"]
    for v in generation["variants"].values():
        if "error" not in v:
            v.update(
                tokens_per_s=gen_tokens / v["generate_s"], speedup_vs_hf_batched=hf["generate_s"] / v["generate_s"]
            )
    gen_best = best(generation["variants"], "generate_s")
    ours_gen = generation["variants"][gen_best]["generate_s"]
    return {
        "prompts": len(generation["texts"]),
        "new_tokens": args.new_tokens,
        "batch_size": args.gen_batch,
        "variants": generation["variants"],
        "ours_variant": gen_best,
        "ours_tokens_per_s": gen_tokens / ours_gen,
        "hf_batched_tokens_per_s": gen_tokens / hf["generate_s"],
        "hf_batch1_tokens_per_s": hf_batch1,
        "speedup_vs_batch1": gen_tokens / ours_gen / hf_batch1,
        "speedup_vs_hf_batched": hf["generate_s"] / ours_gen,
    }


def measure_sft_all(args: argparse.Namespace, model_ref: str, dtype: str, device: torch.device, tokenizer: Any,
                    work: Path, ceiling: float, save: Any, result: dict) -> dict:  # fmt: skip
    """The HF + peft step first (Liger variants patch transformers for the process), then each variant of ours."""
    padded = padded_batch(args, tokenizer, work)
    real_tokens = int(padded["attention_mask"].sum())
    hf = attempt("HF + peft SFT", partial(measure_hf_sft, args, model_ref, dtype, device, tokenizer, padded), device)
    if "error" in hf:
        raise SystemExit(f"the HF + peft SFT baseline failed: {hf['error']}")
    params = hf["parameters"]

    def rates(step_s: float) -> dict:  # real tokens per second, and MFU against the measured ceiling
        return {"tokens_per_s": real_tokens / step_s, "mfu": mfu(params, real_tokens / step_s, ceiling)}

    sft: dict[str, Any] = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "real_tokens": real_tokens,
        "padded_tokens": int(padded["input_ids"].numel()),
        "parameters": params,
        "hf_peft": {"step_s": hf["step_s"], **rates(hf["step_s"]), "profile": hf["profile"]},
        "variants": {},
    }
    result["parameters"] = params
    for name in args.sft_variants:
        run = partial(measure_sft_variant, args, name, model_ref, dtype, device)
        sft["variants"][name] = v = attempt(f"SFT {name}", run, device)
        if "error" not in v:
            v.update(rates(v["step_s"]))
        result["sft"] = sft
        save(result)
    fastest = best(sft["variants"], "step_s")
    ours = sft["variants"][fastest]
    sft.update(ours={"variant": fastest, **ours}, ours_computed_tokens=ours["computed_tokens"],
               speedup=hf["step_s"] / ours["step_s"])  # fmt: skip
    return sft


def traceable(name: str) -> bool:
    """Variants whose eager ops are what runs: compiled code (ours, transformers' flex attention) and Liger's
    kernels fuse what a trace would count."""
    switches = SFT_VARIANTS[name]
    return not ({"compile", "liger_kernel"} & set(switches)) and switches.get("attn_implementation") != "flex_attention"


def measure_anatomy(args: argparse.Namespace, dtype: str, device: torch.device, tokenizer: Any, work: Path,
                    flops_per_s: float, bytes_per_s: float) -> dict:  # fmt: skip
    """The SFT step of HF + peft and of each eager variant, traced op by op (``anatomy``) with 1 and 2 decoder
    layers of the shape and extrapolated to its depth: kernels, FLOPs, bytes and floor at the given rates."""
    layers = llama_config(args.shape, tokenizer).num_hidden_layers
    refs = {n: random_llama(args.shape, tokenizer, work / f"anatomy{n}", layers=n) for n in (1, 2)}
    padded = padded_batch(args, tokenizer, work)
    real_tokens = int(padded["attention_mask"].sum())

    def trace(build: Any, ref: str) -> tuple[dict, int]:
        torch.manual_seed(0)
        module, call, optimizer, batch = build(ref)
        sft_step(call, optimizer, batch, device, args.bf16)  # optimizer state, lazy set-up
        traced = trace_step(lambda: call(batch), optimizer, args.bf16, flops_per_s, bytes_per_s)
        return traced, base_parameters(module)

    def stack(build: Any) -> dict:
        (one, p1), (two, p2) = trace(build, refs[1]), trace(build, refs[2])
        parameters = p1 + (layers - 1) * (p2 - p1)
        summary = summarize(extrapolate(one, two, layers))
        tokens_per_s = real_tokens / (summary["total"]["floor_ms"] / 1e3)
        return {**summary, "parameters": parameters, "floor_tokens_per_s": tokens_per_s,
                "mfu_at_floor": mfu(parameters, tokens_per_s, flops_per_s)}  # fmt: skip

    hf = partial(stack, lambda ref: hf_stack(args, ref, dtype, device, tokenizer, padded))
    stacks = {"HF + peft": attempt("anatomy HF + peft", hf, device)}
    for name in args.sft_variants:
        if traceable(name):
            ours = partial(stack, lambda ref, name=name: our_stack(args, name, ref, dtype, device))
            stacks[name] = attempt(f"anatomy {name}", ours, device)
    return {"layers": layers, "tflops": flops_per_s / 1e12, "gbs": bytes_per_s / 1e9,
            "rates_given": bool(args.tflops or args.gbs), "real_tokens": real_tokens, "stacks": stacks}  # fmt: skip


def print_variants(variants: dict, label: Any, numbers: Any) -> None:
    """One table row per variant: ``label(name)`` then ``numbers(result)``, or the variant's error."""
    for name, v in variants.items():
        print(f"{label(name):46}" + (f"  failed: {v['error'][:80]}" if "error" in v else numbers(v)))


def report(r: dict) -> None:
    """The measured sections as a table: ours, HF, HF at batch 1, and the ratio."""
    size = f"{r['parameters'] / 1e6:.0f}M parameters, " if "parameters" in r else ""
    print(f"{r['shape']} ({size}{r['dtype']}) on {r['device']}")
    print(f"matmul ceiling: {r['matmul']['tflops']:.2f} TFLOP/s ({r['matmul']['dtype']}); memory (copy)"
          f" {r['memory']['copy_gbs']:.0f} GB/s")  # fmt: skip
    print(f"{'':46}{'ours':>12}{'HF':>12}{'HF batch 1':>12}{'ours/HF':>9}")
    if "sft" in r:
        report_sft(r["sft"])
    if "generation" in r:
        g = r["generation"]
        print_variants(
            g["variants"],
            lambda name: f"generation tokens/s, {name} (batch {g['batch_size']})",
            lambda v: (
                f"{v['tokens_per_s']:12.1f}{g['hf_batched_tokens_per_s']:12.1f}{g['hf_batch1_tokens_per_s']:12.1f}"
                f"{v['speedup_vs_hf_batched']:8.2f}x  ({v['tokens_per_s'] / g['hf_batch1_tokens_per_s']:.1f}x vs"
                f" batch 1; first call {v['first_call_s']:.1f} s)"
            ),
        )
    if "anatomy" in r:
        report_anatomy(r["anatomy"])
    if "scoring" in r:
        sc = r["scoring"]
        print(
            f"{'scoring samples/s (batch ' + str(sc['batch_size']) + ')':46}{sc['batched_samples_per_s']:12.1f}"
            f"{'':12}{sc['per_sample_samples_per_s']:12.1f}{sc['speedup']:8.2f}x (vs one pair per call)"
        )


def report_sft(s: dict) -> None:
    print_variants(
        s["variants"],
        lambda name: f"SFT tokens/s, {name} ({s['batch_size']}x{s['seq_len']})",
        lambda v: (
            f"{v['tokens_per_s']:12.0f}{s['hf_peft']['tokens_per_s']:12.0f}{'':12}"
            f"{s['hf_peft']['step_s'] / v['step_s']:8.2f}x  MFU {100 * v['mfu']:.1f}%"
            f" vs {100 * s['hf_peft']['mfu']:.1f}%"
            f"  (first step {v['first_step_s']:.1f} s, {v['computed_tokens']} tokens computed"
            + (f", {v['graphs']} graphs, {v['graph_breaks']} breaks)" if "graphs" in v else ")")
        ),
    )
    profiled = {name: v["profile"] for name, v in s["variants"].items() if v.get("profile")}
    if s["hf_peft"].get("profile"):
        profiled["HF + peft"] = s["hf_peft"]["profile"]
    for name, prof in profiled.items():
        groups = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["groups_ms"].items())
        print(f"  SFT step profile, {name}: {prof['step_ms']:.1f} ms wall, device busy {100 * prof['busy_share']:.0f}%"
              f" ({groups})")  # fmt: skip
        for top in prof["top"][:6]:
            print(f"      {top['ms_per_step']:7.2f} ms  {top['name'][:90]}")


def report_anatomy(a: dict) -> None:
    """Per traced stack: totals, the floor's tokens/s and MFU, and each phase and kind's share."""
    source = "given" if a["rates_given"] else "measured here"
    print(f"SFT step anatomy ({a['layers']} layers, traced op by op; floors at {a['tflops']:.4g} TFLOP/s and"
          f" {a['gbs']:.4g} GB/s, {source}):")  # fmt: skip
    for name, st in a["stacks"].items():
        if "error" in st:
            print(f"  {name}: failed: {st['error'][:100]}")
            continue
        t = st["total"]
        syncs = t["syncs"]["forward"] + t["syncs"]["backward"]
        print(f"  {name}: {t['kernels']:.0f} kernels, {syncs} device syncs, {t['gflop'] / 1e3:.1f} TFLOP,"
              f" {t['gb']:.1f} GB moved; floor {t['floor_ms']:.1f} ms = {st['floor_tokens_per_s']:.0f} tokens/s,"
              f" MFU {100 * st['mfu_at_floor']:.1f}% at most")  # fmt: skip
        for group, g in st["groups"].items():
            print(f"      {group:20}{g['kernels']:8.0f} kernels {g['gflop']:10.1f} GFLOP {g['gb']:8.2f} GB"
                  f" {g['floor_ms']:8.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()

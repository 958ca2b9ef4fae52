"""Stable Diffusion components: from the hub / a local folder, or small random-initialized ones built from
the same diffusers and transformers classes (CPU quickstart and tests).

No CLIP or SD weights are reachable offline, but the CLIP BPE vocabulary ships inside open_clip_torch:
:func:`clip_tokenizer` turns it into a ``transformers.CLIPTokenizer`` identical to SD v1.5's.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLIP_MAX_TOKENS = 77

#: sizes of the tiny model: a 2x-downsampling VAE, a two-level UNet, a 2-layer text encoder
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    "unet": {
        "block_out_channels": [32, 64],
        # attention only at the coarse level: on a CPU, full-resolution attention with tiny heads dominates
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 32,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "steps_offset": 1,
    },
}


def clip_tokenizer(cache_dir: str | Path | None = None):
    """SD v1.5's CLIP tokenizer, built offline from open_clip's BPE merges.

    The vocabulary is a pure function of the merges: 256 byte symbols, the same with ``</w>``, one entry per
    merge, then the two special tokens (49,408 in all)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    folder = Path(cache_dir or Path(tempfile.gettempdir()) / "ric-clip-tokenizer")
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
        merges = lines[1 : 49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        # written under per-process names, then renamed: concurrent processes never see half a file
        tmp_v, tmp_m = folder / f"vocab.{os.getpid()}.tmp", folder / f"merges.{os.getpid()}.tmp"
        tmp_v.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
        tmp_m.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tmp_v.replace(vocab_file)
        tmp_m.replace(merges_file)
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=CLIP_MAX_TOKENS)


@dataclass
class SDComponents:
    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler: Any
    pretrained: bool


def _merge(defaults: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **(overrides or {})}


def build_tiny(resolution: int, overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> SDComponents:
    """Random-initialized SD components with small channels (same classes as SD v1.5)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    overrides = overrides or {}
    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-model component(s) {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}")
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae_cfg = _merge(TINY_DEFAULTS["vae"], overrides.get("vae"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=resolution, **vae_cfg)
        text_cfg = _merge(TINY_DEFAULTS["text_encoder"], overrides.get("text_encoder"))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_TOKENS, **text_cfg)
        )
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        unet_cfg = _merge(TINY_DEFAULTS["unet"], overrides.get("unet"))
        unet = UNet2DConditionModel(
            sample_size=resolution // factor,
            in_channels=vae_cfg["latent_channels"],
            out_channels=vae_cfg["latent_channels"],
            cross_attention_dim=text_cfg["hidden_size"],
            **unet_cfg,
        )
    scheduler = DDPMScheduler(**_merge(TINY_DEFAULTS["scheduler"], overrides.get("scheduler")))
    return SDComponents(vae, text_encoder, tokenizer, unet, scheduler, pretrained=False)


def load_pretrained(name: str, revision: str | None = None, variant: str | None = None) -> SDComponents:
    """SD components from a hub name or a local folder in diffusers layout."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"revision": revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    except OSError as err:
        raise OSError(
            f"could not load Stable Diffusion components from {name!r} (a hub name needs network access; a local "
            f"folder needs the diffusers layout with unet/, vae/, text_encoder/, tokenizer/, scheduler/): {err}"
        ) from err
    return SDComponents(vae, text_encoder, tokenizer, unet, scheduler, pretrained=True)

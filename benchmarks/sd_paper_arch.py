"""The paper-scale image config still builds and trains, on SD v1.5's architecture with random weights (no
hub here): ``configs/sd_aesthetic.yaml`` as shipped, except for a CPU trainer, 64 px pictures and offline
rewards. It trains one step with the text encoder frozen (the paper) and one with it trained (the option
the tiny quickstart needs), checks which weights moved, samples a picture per preference, and writes
``benchmarks/results/sd_paper_arch.json``.

    .venv/bin/python -m benchmarks.sd_paper_arch   # 4 GB of random weights in a temporary folder; ~18 GB of memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.experiment import ROOT, command, load_config, write_config, write_results

#: SD v1.5's component configurations (the hub's config.json files, written out)
UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "steps_offset": 1}  # fmt: skip


def write_random_sd15(folder: Path) -> dict[str, int]:
    """A diffusers folder with SD v1.5's architecture and random weights; returns each component's size."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ric.diffusion.models import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    parts = {
        "unet": UNet2DConditionModel(**UNET),
        "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT)),
    }
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


def run_config(folder: Path, work: Path, train_text_encoder: bool) -> Path:
    """The shipped paper config with only what this machine needs changed."""
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "precision": "32-true",
        "max_steps": 1,
        "callbacks": [],
        "logger": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(work),
    }
    model = {
        "model": str(folder),
        "resolution": 64,
        "reward_names": ["compressibility", "colourfulness"],
        "train_text_encoder": train_text_encoder,
        "generation_batch_size": 2,
    }
    data = {"dataset": {"class_path": "ric.diffusion.datasets.Shapes",
                        "init_args": {"count": 16, "size": 64, "folder": str(work / "shapes")}},
            "rewards": [{"class_path": "ric.diffusion.rewards.JpegCompressibility", "init_args": {"size": None}},
                        {"class_path": "ric.diffusion.rewards.Colourfulness"}],
            "batch_size": 2, "val_fraction": 0.0, "test_fraction": 0.0, "max_test_prompts": None,
            "cache_dir": str(work / "cache"), "output_dir": str(work)}  # fmt: skip
    overrides = {**{f"trainer.{k}": v for k, v in trainer.items()},
                 **{f"model.init_args.{k}": v for k, v in model.items()},
                 **{f"data.{k}": v for k, v in data.items()}}  # fmt: skip
    return write_config(work / "config.yaml", load_config("sd_aesthetic", overrides))


def fingerprints(module: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Two sums per parameter: enough to see which moved, without a second copy of 1B weights in memory."""
    with torch.no_grad():
        return {n: (float(p.double().sum()), float(p.double().square().sum())) for n, p in module.named_parameters()}


def check(folder: Path, work: Path, train_text_encoder: bool) -> dict:
    from ric.cli import RiCCLI

    start = time.perf_counter()
    cli = RiCCLI(args=["--config", str(run_config(folder, work, train_text_encoder))], run=False)
    policy = cli.model
    before = fingerprints(policy)
    cli.trainer.fit(policy, datamodule=cli.datamodule)
    after = fingerprints(policy)
    moved = {n for n, f in before.items() if f != after[n]}
    groups = {g: [n for n in before if n.startswith(g + ".")] for g in ("unet", "text_encoder", "vae")}
    seconds_train = time.perf_counter() - start
    start = time.perf_counter()
    images = policy.generate(["a red circle on a grey background"] * 2, np.array([[1.0, -1.0], [-1.0, 1.0]]),
                             num_inference_steps=2)  # fmt: skip
    return {
        "train_text_encoder": train_text_encoder,
        "global_step": cli.trainer.global_step,
        "loss": float(cli.trainer.callback_metrics.get("train/loss", torch.tensor(float("nan")))),
        "moved_share": {g: sum(n in moved for n in names) / max(1, len(names)) for g, names in groups.items()},
        "seconds_train_step": seconds_train,
        "seconds_sample_2_steps": time.perf_counter() - start,
        "image_sizes": [list(im.size) for im in images],
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":  # one run in its own process (see below)
        print(json.dumps(check(Path(sys.argv[2]), Path(sys.argv[2]).parent / f"run-{sys.argv[3]}", sys.argv[3] == "1")))
        return
    results: dict = {"command": command(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-random"
        results["parameters"] = write_random_sd15(folder)
        for train_text_encoder in ("0", "1"):
            # a process per run: the allocator keeps a finished run's 16 GB of weights and optimizer state
            one = [sys.executable, "-m", "benchmarks.sd_paper_arch", "--one", str(folder), train_text_encoder]
            out = subprocess.run(one, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
            run = json.loads(out.strip().splitlines()[-1])
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    ok = [r["global_step"] == 1 and np.isfinite(r["loss"]) and r["moved_share"]["unet"] > 0.9
          and r["moved_share"]["vae"] == 0 and (r["moved_share"]["text_encoder"] > 0.9) == r["train_text_encoder"]
          for r in results["runs"]]  # fmt: skip
    results["passed"] = all(ok)
    print("passed" if results["passed"] else "FAILED", write_results("sd_paper_arch", results))
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    main()

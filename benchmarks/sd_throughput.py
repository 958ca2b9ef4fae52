"""Images/s of the Stable Diffusion policy: conditioned training steps and DDIM sampling, on SD v1.5's
architecture with random weights (no hub needed), plus MFU from FLOPs counted by torch's FlopCounterMode
against a matmul ceiling measured in the same run.

    python3 -m benchmarks.sd_throughput --shape sd15 --out benchmarks/results/sd_throughput_cuda.json
    .venv/bin/python -m benchmarks.sd_throughput --shape tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import matmul_ceiling, timed
from ric.diffusion.policy import DiffusionPolicy

#: SD v1.5's component sizes, as overrides of the tiny builder (same classes, random weights)
SD15 = {
    "unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
             "norm_num_groups": 32, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12},
}  # fmt: skip
SHAPES = {"sd15": (SD15, 512), "tiny": (None, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    overrides, resolution = SHAPES[args.shape]
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    policy = DiffusionPolicy(
        model="tiny",
        tiny_config=overrides,
        resolution=resolution,
        reward_names=["a", "b"],
        frozen_dtype="bfloat16" if gpu else "float32",
        generation_batch_size=args.sample_batch,
        num_inference_steps=args.inference_steps,
    ).to(device)
    ceiling = matmul_ceiling(device, dtype, 8192 if gpu else 1024)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(8)]
    examples = [{"prompt": f"a picture number {i} <R1> 0.5 <R2> -1.0", "response": images[i % 8]}
                for i in range(args.batch_size)]  # fmt: skip
    batch = {k: v.to(device) for k, v in policy.collate(examples).items()}
    optimizer = torch.optim.AdamW([p for p in policy.unet.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            loss = policy.loss(batch, policy.hparams.caption_dropout)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    train_flops = counter.get_total_flops()
    train_s = timed(step, args.steps, device)
    prompts = [e["prompt"].split(" <R1>")[0] for e in examples][: args.sample_batch]
    prompts = (prompts * args.sample_batch)[: args.sample_batch]
    targets = np.tile([0.5, -1.0], (len(prompts), 1))
    policy.generate(prompts[:1], targets[:1], num_inference_steps=2)
    sample_s = timed(lambda: policy.generate(prompts, targets), 2, device)
    param_count = sum(p.numel() for p in policy.unet.parameters())
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "resolution": resolution,
        "unet_parameters": param_count,
        "matmul_tflops": ceiling / 1e12,
        "train": {"batch_size": args.batch_size, "seconds_per_step": train_s,
                  "images_per_s": args.batch_size / train_s, "flops_per_step": train_flops,
                  "mfu": train_flops / train_s / ceiling},
        "sampling": {"batch_size": len(prompts), "ddim_steps": args.inference_steps, "guidance": "cfg (2x batch)",
                     "seconds": sample_s, "images_per_s": len(prompts) / sample_s},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

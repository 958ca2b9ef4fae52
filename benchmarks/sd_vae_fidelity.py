"""How much of each image reward survives the tiny VAE: the quickstart's pictures against their
reconstructions, for VAE shapes and fitting lengths (no UNet is trained).

A reward the decoder cannot reproduce cannot be steered, however well the UNet reads its marker: the spread
kept (sd of the reconstructions' normalized reward over the pictures') caps the sweep's spread ratio.

    .venv/bin/python -m benchmarks.sd_vae_fidelity [--variants default "flat, 600 steps" ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAT = {"block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
#: name -> (fitting steps, learning rate, VAE overrides of the tiny model)
VARIANTS = {
    "default": (300, 1e-3, None),
    "default, 600 steps": (600, 2e-3, None),
    "8 latent channels": (600, 2e-3, {"latent_channels": 8}),
    "12 latent channels": (600, 2e-3, {"latent_channels": 12}),
    "flat": (300, 2e-3, FLAT),
    "flat, 600 steps": (600, 2e-3, FLAT),
    # the mid-block's self-attention over all 1,024 positions is most of a flat VAE's cost
    "flat, no attention": (300, 2e-3, {**FLAT, "mid_block_add_attention": False}),
}


def main() -> None:
    from benchmarks.sd_diagnosis import reconstruct
    from ric.diffusion.datasets import Shapes
    from ric.diffusion.policy import DiffusionPolicy
    from ric.diffusion.rewards import Colourfulness, JpegCompressibility

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=["default", "flat", "flat, no attention"], help=f"any of {list(VARIANTS)}"
    )
    args = parser.parse_args()
    names = args.variants
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    records = Shapes(count=1200, size=32).load()
    rewards = {"compressibility": JpegCompressibility(), "colourfulness": Colourfulness()}
    fit, held = records[:1000], records[1000:]
    prompts = [r["prompt"] for r in records]
    raw = np.stack([r.score(prompts, [x["response"] for x in records]).numpy() for r in rewards.values()], axis=1)
    mean, sd = raw.mean(0), raw.std(0)
    original = (raw[1000:] - mean) / sd
    out_path = ROOT / "benchmarks" / "results" / "sd_vae_fidelity.json"
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    data = f"Shapes v{Shapes.version}: 1,000 pictures fitted, 200 held out"
    report.update(command="python -m benchmarks.sd_vae_fidelity", data=data)
    for name in names:
        steps, lr, vae = VARIANTS[name]
        start = time.perf_counter()
        policy = DiffusionPolicy(model="tiny", reward_names=list(rewards), resolution=32, vae_fit_steps=steps,
                                 vae_fit_lr=lr, tiny_config={"vae": vae} if vae else None)  # fmt: skip
        policy.fit_vae(fit)
        seconds = time.perf_counter() - start
        x, recon, images = reconstruct(policy, [r["response"] for r in held])
        got = np.stack([r.score(prompts[1000:], images).numpy() for r in rewards.values()], axis=1)
        got = (got - mean) / sd
        row = {"fit_steps": steps, "lr": lr, "vae": vae, "fit_seconds": seconds,
               "held_out_mse": float(((recon - x) ** 2).mean())}  # fmt: skip
        for i, reward in enumerate(rewards):
            row[reward] = {
                "correlation": float(np.corrcoef(original[:, i], got[:, i])[0, 1]),
                "spread_kept": float(got[:, i].std() / original[:, i].std()),
                "bias": float((got[:, i] - original[:, i]).mean()),
            }
        report.setdefault("variants", {})[name] = row
        print(name, json.dumps(row), flush=True)
    out_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Why the image quickstart does or does not steer: the evidence behind each candidate cause, for a trained
checkpoint (default: the quickstart's last one).

1. Conditioning: how far the text encoder puts the same caption with the markers of w = (0, 1) and w = (1, 0)
   apart, relative to two different captions with the same markers (random initial encoder vs the trained one).
2. The data: the share of each reward's variance the caption explains (what the markers can still steer).
3. The VAE: rewards of the pictures against rewards of their VAE reconstructions (a decoder that loses colour
   caps colourfulness whatever the UNet learns; ``spread_kept`` is the sd of the reconstructions' reward over the
   pictures'). ``benchmarks/sd_vae_fidelity.py`` compares VAE shapes without training a UNet.

    .venv/bin/python -m benchmarks.sd_diagnosis [runs/quickstart_sd/lightning_logs/version_0/checkpoints/last.ckpt]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def encoder_separation(policy, captions: list[str], desired: np.ndarray) -> dict[str, float]:
    """Relative distance of the encoder's hidden states: same caption, the two ends' markers; and two
    captions, the same markers."""

    def hidden(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return policy.text_encoder(policy.tokenize(texts).to(policy.device))[0].float()

    lo = hidden([policy.format_prompt(c, desired[0]) for c in captions])
    hi = hidden([policy.format_prompt(c, desired[1]) for c in captions])
    other = hidden([policy.format_prompt(c, desired[0]) for c in captions[1:] + captions[:1]])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean())

    return {"markers_apart": rel(lo, hi), "captions_apart": rel(lo, other), "ratio": rel(lo, hi) / rel(lo, other)}


def caption_share(prompts: list[str], values: np.ndarray) -> float:
    groups = collections.defaultdict(list)
    for p, v in zip(prompts, values):
        groups[p].append(v)
    means = {p: float(np.mean(v)) for p, v in groups.items()}
    return float(1 - (values - np.array([means[p] for p in prompts])).var() / values.var())


def reconstruct(policy, pictures: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The pictures through the policy's VAE and back (posterior mean): pixels in, pixels out, output images."""
    from ric.diffusion.images import as_image

    x = torch.stack([policy.load_pixels(p) for p in pictures]).to(policy.device, policy.vae.dtype)
    with torch.no_grad():
        recon = policy.vae.decode(policy.vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    return x.float(), recon, [as_image(((t + 1) / 2).clamp(0, 1)) for t in recon.cpu()]


def main() -> None:
    import ric
    from ric.diffusion.datasets import Shapes
    from ric.diffusion.policy import DiffusionPolicy

    ckpt = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else ROOT / "runs/quickstart_sd/lightning_logs/version_0/checkpoints/last.ckpt"
    )
    policy = ric.load(ckpt)
    space = policy.reward_space
    rewards = space.build_rewards()
    records = Shapes(count=1200, size=32).load()
    prompts = [r["prompt"] for r in records]
    captions = list(dict.fromkeys(prompts))[:32]
    desired = space.desired(np.array([[0.0, 1.0], [1.0, 0.0]]))
    h = policy.hparams
    initial = DiffusionPolicy(model="tiny", reward_names=list(space.reward_names), resolution=h.resolution,
                              tiny_config=h.tiny_config, seed=h.seed)  # fmt: skip
    report: dict = {"checkpoint": str(ckpt), "train_text_encoder": bool(h.get("train_text_encoder", False))}
    report["encoder_initial"] = encoder_separation(initial, captions, desired)
    report["encoder_trained"] = encoder_separation(policy, captions, desired)
    raw = np.stack([r.score(prompts, [rec["response"] for rec in records]).numpy() for r in rewards], axis=1)
    report["caption_share_of_variance"] = {
        n: caption_share(prompts, raw[:, i]) for i, n in enumerate(space.reward_names)
    }
    report["pearson_on_data"] = float(np.corrcoef(raw, rowvar=False)[0, 1])
    sub = records[:256]
    originals = [r["response"] for r in sub]
    _, _, images = reconstruct(policy, originals)
    fidelity = {}
    sub_prompts = [s["prompt"] for s in sub]
    a = space.normalize(np.stack([r.score(sub_prompts, originals).numpy() for r in rewards], axis=1))
    b = space.normalize(np.stack([r.score(sub_prompts, images).numpy() for r in rewards], axis=1))
    for i, n in enumerate(space.reward_names):
        fidelity[n] = {"pictures": float(a[:, i].mean()), "reconstructions": float(b[:, i].mean()),
                       "correlation": float(np.corrcoef(a[:, i], b[:, i])[0, 1]),
                       "spread_kept": float(b[:, i].std() / a[:, i].std())}  # fmt: skip
    report["vae_fidelity_normalized"] = fidelity
    out = ROOT / "benchmarks" / "results" / "sd_diagnosis.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

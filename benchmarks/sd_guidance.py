"""How classifier-free guidance scales an image model's steering, measured on TRAINING captions so that the
guidance a config ships can be chosen without looking at its held-out ones.

For each guidance scale: the 5 preferences of the quickstart's sweep, ``--captions`` distinct captions of the
run's training split x ``--samples`` pictures, the same noise for every preference and scale; per reward, the
Spearman of the obtained mean against its weight and the spread ratio (obtained range over desired range).

    .venv/bin/python -m benchmarks.sd_guidance [CKPT] --guidance 3,5,7.5,10

Results: ``benchmarks/results/sd_guidance.json`` and ``.png`` (spread ratio per reward against the scale).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment import (
    PREFERENCES,
    RESULTS,
    ROOT,
    build_data_module,
    command,
    pyplot,
    save_figure,
    write_results,
)

RUN = ROOT / "runs/quickstart_sd/lightning_logs/version_0"


def training_captions(config: Path, n: int) -> list[str]:
    """``n`` distinct captions of the run's training split (the split its data module made)."""
    import yaml

    dm = build_data_module(yaml.safe_load(config.read_text())["data"])
    train, _, _ = dm.split(dm.dataset.load())
    return list(dict.fromkeys(r["prompt"] for r in train))[:n]


def training_steering(policy: Any, captions: list[str], samples: int, steps: int, guidance: float) -> dict:
    """The quickstart's 5 preferences on ``captions`` x ``samples`` pictures (the same noise for every
    preference): desired and obtained normalized rewards, per reward Spearman and spread ratio, seconds."""
    from ric.report import steering_measures
    from ric.rewards import score_all

    space = policy.reward_space
    rewards = space.build_rewards()
    start = time.perf_counter()
    desired, means = [], []
    for w in PREFERENCES:
        steered = policy.steer(captions, w, num_samples=samples, seed=0, guidance_scale=guidance,
                               num_inference_steps=steps)  # fmt: skip
        z = space.normalize(score_all(rewards, [s.prompt for s in steered], [s.sample for s in steered]))
        desired.append(steered[0].desired_rewards)
        means.append(z.mean(axis=0))
    measures = steering_measures(space.reward_names, np.array(PREFERENCES), np.array(desired), np.array(means))
    return {"steering": measures, "desired": np.array(desired).tolist(), "obtained": np.array(means).tolist(),
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?", type=Path, default=RUN / "checkpoints" / "last.ckpt")
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: beside the log)")
    parser.add_argument("--guidance", default="3,5,7.5,10")
    parser.add_argument("--captions", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (the quickstart's sweep: 25)")
    args = parser.parse_args(argv)
    scales = [float(g) for g in args.guidance.split(",")]
    if not args.ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {args.ckpt}: train one first (ric fit --config ...)")

    import ric

    captions = training_captions(args.config or args.ckpt.parents[1] / "config.yaml", args.captions)
    policy = ric.load(args.ckpt)
    rows = []
    for g in scales:
        row = training_steering(policy, captions, args.samples, args.steps, g)
        rows.append({"guidance_scale": g, **row})
        shown = [
            f"{n} Spearman {m['spearman']:+.2f} spread {m['spread_ratio']:.2f}" for n, m in row["steering"].items()
        ]
        print(f"guidance {g:>5}: " + "  ".join(shown))
    space = policy.reward_space
    results = {"checkpoint": str(args.ckpt), "captions": captions, "samples": args.samples, "steps": args.steps,
               "desired": rows[0]["desired"], "rows": rows,
               "command": command()}  # fmt: skip
    write_results("sd_guidance", results)

    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for name in space.reward_names:
        ax.plot(scales, [r["steering"][name]["spread_ratio"] for r in rows], "o-", label=name)
    ax.axhline(0.5, color="grey", ls=":", label="goal (0.5)")
    ax.set(xlabel="guidance scale", ylabel="spread ratio (training captions)", title="guidance vs steering")
    ax.legend()
    save_figure(fig, RESULTS / "sd_guidance.png", dpi=120)
    print(RESULTS / "sd_guidance.png")


if __name__ == "__main__":
    main()

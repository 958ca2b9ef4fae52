"""The SD quickstart's noise schedule against each image reward's steering.

SD's training schedule never reaches pure noise (its last timestep keeps about 7% of the picture's amplitude),
so sampling from pure noise asks for something training never showed: choosing a picture's mean colour. Both
of the quickstart's rewards depend on it (a plain scene's flat background, a vivid scene's saturated one).
This trains the quickstart (``configs/quickstart_sd.yaml``, unchanged but for the variant's settings) three
ways and measures each reward's steering on its held-out sweep and, at the same sampling, on training
captions (which a choice between the variants may look at):

- ``none``: SD's schedule as the paper trains it (no offset noise);
- ``zero_snr``: zero terminal SNR (rescaled betas, v-prediction, trailing DDIM steps; Lin et al. 2024);
- ``offset``: offset noise 0.1 (a per-channel constant added to the training noise), the quickstart's.

    .venv/bin/python -m benchmarks.sd_noise            # ~16 min per variant on 2 cores; finished ones are kept

Results: ``benchmarks/results/sd_noise.json`` and ``.png`` (desired vs obtained per reward and variant).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment import RESULTS, ROOT, command, diagonal, fit, load_config, pyplot, save_figure, write_results
from benchmarks.sd_guidance import training_captions, training_steering

QUICKSTART = "quickstart_sd"
SCHEDULER = "model.init_args.tiny_config.scheduler"
#: variant -> its overrides of the quickstart's config (DiffusionPolicy's settings)
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"model.init_args.noise_offset": 0.0},
    "zero_snr": {"model.init_args.noise_offset": 0.0, f"{SCHEDULER}.rescale_betas_zero_snr": True,
                 f"{SCHEDULER}.prediction_type": "v_prediction", f"{SCHEDULER}.timestep_spacing": "trailing"},
    "offset": {"model.init_args.noise_offset": 0.1},
}  # fmt: skip


def variant_config(name: str, folder: Path) -> dict:
    """The quickstart's config with the variant's overrides, writing everything under ``folder``."""
    paths = {"trainer.default_root_dir": str(folder), "trainer.logger.init_args.save_dir": str(folder),
             "data.output_dir": str(folder)}  # fmt: skip
    return load_config(QUICKSTART, {**paths, **VARIANTS[name]})


def train(name: str, folder: Path) -> Path:
    """``ric fit`` of the variant (its sweep included), unless its run already finished; returns the log."""
    log = folder / "lightning_logs" / "version_0"
    if not (log / "sweep" / "metrics.json").is_file():
        fit(folder, variant_config(name, folder))
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sd_noise")
    parser.add_argument("--captions", type=int, default=6, help="training captions for the second measure")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    import ric

    rows = []
    for name in names:
        log = train(name, args.out / name)
        metrics = json.loads((log / "sweep" / "metrics.json").read_text())
        front = np.genfromtxt(log / "sweep" / "front.csv", delimiter=",", names=True)
        ckpt = log / "checkpoints" / "last.ckpt"
        train_seconds = metrics["cost"]["train_seconds"]
        sampling = metrics.get("sampling") or {}
        policy = ric.load(ckpt)
        captions = training_captions(log / "config.yaml", args.captions)
        on_train = training_steering(policy, captions, args.samples, sampling.get("num_inference_steps", 25),
                                     sampling.get("guidance_scale", 5.0))  # fmt: skip
        rows.append({"variant": name, "settings": VARIANTS[name], "held_out": metrics["steering"],
                     "hypervolume": metrics["hypervolume"],
                     "desired": [[row[f"desired_{n}"] for n in policy.reward_space.reward_names] for row in front],
                     "obtained": [[row[f"obtained_{n}"] for n in policy.reward_space.reward_names] for row in front],
                     "training_captions": on_train, "train_seconds": train_seconds})  # fmt: skip
        held = "  ".join(f"{n} {m['spearman']:+.2f}/{m['spread_ratio']:.2f}" for n, m in metrics["steering"].items())
        seen = "  ".join(f"{n} {m['spearman']:+.2f}/{m['spread_ratio']:.2f}" for n, m in on_train["steering"].items())
        print(f"{name:<10} held-out (Spearman/spread): {held}   training captions: {seen}   "
              f"UNet training {train_seconds:.0f} s")  # fmt: skip
    write_results("sd_noise", {"rows": rows, "command": command()})
    plot(rows, RESULTS / "sd_noise.png")
    print(RESULTS / "sd_noise.png")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = list(rows[0]["held_out"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8))
    for k, (ax, name) in enumerate(zip(axes, names, strict=True)):
        for row in rows:
            desired, obtained = np.array(row["desired"])[:, k], np.array(row["obtained"])[:, k]
            m = row["held_out"][name]
            ax.plot(desired, obtained, "o-", label=f"{row['variant']} (spread {m['spread_ratio']:.2f})")
        diagonal(ax, *ax.get_xlim())
        ax.set(title=name, xlabel=f"desired {name} (normalized)", ylabel=f"obtained {name} (held-out)")
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()

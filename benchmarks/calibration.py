"""The calibrated mapping on trained checkpoints: how far what the model obtains is from what was asked, before
and after ``ric calibrate``, on prompts the calibration was not fitted on.

The prompts are the config's held-out split (never trained on); ``ric calibrate`` fits on half of them and
checks on the other half, at the sampling of the config's sweep. It runs as a user runs it, in a subprocess,
writing a calibrated export under ``--out``.

    python -m benchmarks.calibration --config quickstart_text \
        --checkpoint runs/quickstart_text/lightning_logs/version_0/checkpoints/last.ckpt --name quickstart
    python -m benchmarks.calibration --config steer_hh_cpu --checkpoint runs/steer_hh_cpu/ckpt/last.ckpt --name hh

Results go to ``benchmarks/results/calibration_<name>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.experiment import (
    ROOT,
    build_data_module,
    command,
    diagonal,
    get,
    load_config,
    pyplot,
    rooted,
    save_figure,
    write_results,
)

#: sweep settings ``ric calibrate`` takes as flags
FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "max_new_tokens": "--max-new-tokens"}


def plot(calibration: dict, names: list[str], path: Path) -> Path:
    """Per reward: the fitted map (written -> obtained) and, on held-out prompts, what was obtained for what
    was asked with the values written as they are and through the map."""
    error = calibration["error"]
    asked = np.array(error["asked"])
    before, after = np.array(error["obtained_before"]), np.array(error["obtained_after"])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        written, obtained = np.array(calibration["written"][i]), np.array(calibration["obtained"][i])
        ax.plot(written, obtained, "s:", color="grey", label="fitted map (written -> obtained)")
        ax.plot(asked[:, i], before[:, i], "o-", label=f"held out, before: error {error['before'][name]:.2f}")
        ax.plot(asked[:, i], after[:, i], "o-", label=f"held out, after: error {error['after'][name]:.2f}")
        lo, hi = min(written.min(), asked[:, i].min()), max(written.max(), asked[:, i].max())
        diagonal(ax, lo, hi)
        ax.set_xlabel("asked (or written), normalized")
        ax.set_ylabel("obtained, normalized")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart_text", help="the shipped config the checkpoint was trained by")
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint (.ckpt) or export folder")
    parser.add_argument("--name", required=True, help="names the results: benchmarks/results/calibration_<name>")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts, at most (half fit, half check)")
    parser.add_argument("--samples", type=int, default=2, help="answers per prompt and preference")
    parser.add_argument("--points", type=int, default=5, help="preferences of the grid")
    parser.add_argument("--guidance", type=float, help="calibrate at this reward guidance (default none)")
    parser.add_argument("--out", default="runs/calibration", help="where the calibrated export and sweeps go")
    args = parser.parse_args(argv)

    config = rooted(load_config(args.config))
    sweep = next(c for c in get(config, "trainer.callbacks") if c["class_path"].endswith("PreferenceSweep"))
    sampling = dict(sweep["init_args"].get("sampling") or {})
    dm = build_data_module(config["data"])
    _, _, held_out = dm.split(dm.dataset.load())
    prompts = list(dict.fromkeys(held_out))[: args.prompts]
    out = (ROOT / args.out / args.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model = out / "model"
    if not (model / "ric.json").is_file():
        flags = [x for key, flag in FLAGS.items() if key in sampling for x in (flag, str(sampling[key]))]
        if args.guidance:
            flags += ["--guidance", str(args.guidance)]
        cmd = [sys.executable, "-m", "ric.cli", "calibrate", str(ROOT / args.checkpoint),
               "--prompts", str(prompts_file), "--out", str(model), "--work", str(out / "sweeps"),
               "--points", str(args.points), "--samples", str(args.samples), *flags]  # fmt: skip
        print(" ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        (out / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    space = json.loads((model / "ric.json").read_text())["reward_space"]
    calibration, names = space["calibration"], space["reward_names"]
    error = calibration["error"]
    results = {
        "command": command(),
        "checkpoint": args.checkpoint,
        "config": args.config,
        "prompts": len(prompts),
        "sampling": calibration["settings"],
        "seconds": json.loads((out / "seconds.json").read_text())["seconds"],
        "calibration": calibration,
        "achievable": {n: [row[0], row[-1]] for n, row in zip(names, calibration["obtained"])},
        "range_before": {n: [lo, hi] for n, lo, hi in zip(names, space["r_min"], space["r_max"])},
        "error_before": error["mean_before"],
        "error_after": error["mean_after"],
        "halved": error["mean_after"] <= 0.5 * error["mean_before"],
    }
    path = write_results(f"calibration_{args.name}", results)
    plot(calibration, names, path.with_suffix(".png"))
    for name in names:
        lo, hi = results["achievable"][name]
        before, after = error["before"][name], error["after"][name]
        print(f"{name}: achievable [{lo:+.2f}, {hi:+.2f}]; error {before:.3f} -> {after:.3f}")
    print(f"mean error {error['mean_before']:.3f} -> {error['mean_after']:.3f} (halved: {results['halved']})")
    print(path)


if __name__ == "__main__":
    main()

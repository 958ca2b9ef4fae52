"""The report of a preference sweep: the files (``front.csv``, ``samples.jsonl``, ``metrics.json``, the front
and steering plots) and the table printed at the end of a run, from a :class:`~ric.sweep.SweepResult` or
from the bare arrays a study computes itself.

Obtained rewards are reported in the same normalized units as the desired rewards.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ric.mapping import default_reward_range
from ric.pareto import hypervolume, plot_fronts


def sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def write_front(
    output_dir: str | Path,
    reward_names: Sequence[str],
    preferences: np.ndarray,
    desired: np.ndarray,
    obtained: list[np.ndarray],
    samples: list[dict[str, Any]],
    meta: dict[str, Any],
    reference: Sequence[float] | None = None,
    label: str = "RiC",
) -> dict[str, Any]:
    """Write front.csv, samples.jsonl, front.png and metrics.json; returns the metrics."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    means = np.array([o.mean(axis=0) for o in obtained])
    rows = []
    for k in range(len(preferences)):
        row: dict[str, Any] = {}
        for d, name in enumerate(reward_names):
            row[f"w_{name}"] = preferences[k, d]
        for d, name in enumerate(reward_names):
            row[f"desired_{name}"] = desired[k, d]
        for d, name in enumerate(reward_names):
            row[f"obtained_{name}"] = means[k, d]
            row[f"obtained_{name}_sem"] = sem(obtained[k][:, d])
        rows.append(row)
    with (out / "front.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "samples.jsonl").open("w") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=float, ensure_ascii=False) + "\n")
    if reference is None:
        reference = meta.get("r_min") or np.full(len(reward_names), default_reward_range()[0]).tolist()
    ref = np.asarray(reference, dtype=float)
    steering = steering_measures(reward_names, preferences, desired, means)
    metrics = {
        "hypervolume": hypervolume(means, ref),
        "steering": steering,
        "steerability": {name: m["spearman"] for name, m in steering.items()},
        "reference_point": ref.tolist(),
        "num_preferences": len(preferences),
        "num_prompts": int(len(obtained[0])) if obtained else 0,
        **meta,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if len(reward_names) in (2, 3):
        labels = preferences[:, 0].tolist() if np.all(np.isfinite(preferences)) else None
        plot_fronts(
            {label: means},
            out / "front.png",
            reward_names,
            {label: labels} if labels else None,
            title=f"{label}: obtained rewards per preference",
        )
    if steering:
        plot_steering(
            reward_names,
            desired,
            means,
            [o.std(axis=0, ddof=1) / np.sqrt(len(o)) if len(o) > 1 else np.zeros(len(reward_names)) for o in obtained],
            out / "steering.png",
            label,
        )
    return metrics


def steering_measures(
    reward_names: Sequence[str], preferences: np.ndarray, desired: np.ndarray, means: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per reward, how well the obtained rewards follow the preference: the Spearman correlation of the
    obtained mean with the reward's weight, and the spread ratio (range of the obtained means over the range
    of the desired values; 1 = the model moves as far as it is asked to). Empty without a preference axis."""
    out: dict[str, dict[str, float]] = {}
    if len(preferences) < 3 or not np.all(np.isfinite(preferences)):
        return out
    from scipy.stats import spearmanr

    for d, name in enumerate(reward_names):
        if np.ptp(preferences[:, d]) == 0:
            continue
        rho = spearmanr(preferences[:, d], means[:, d]).statistic
        asked = float(np.ptp(desired[:, d]))
        out[name] = {
            "spearman": float(rho) if np.isfinite(rho) else 0.0,
            "spread_ratio": float(np.ptp(means[:, d]) / asked) if asked > 0 else float("nan"),
        }
    return out


def plot_steering(
    reward_names: Sequence[str],
    desired: np.ndarray,
    means: np.ndarray,
    sems: Sequence[np.ndarray],
    path: Path,
    label: str,
) -> Path:
    """Desired vs obtained reward, one panel per reward (the paper's Figure 2): points on the diagonal are
    rewards obtained exactly as asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(reward_names)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.8), squeeze=False)
    err = np.array(sems)
    for d, (ax, name) in enumerate(zip(axes[0], reward_names)):
        lo, hi = min(desired[:, d].min(), means[:, d].min()), max(desired[:, d].max(), means[:, d].max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--", label="obtained = desired")
        ax.errorbar(desired[:, d], means[:, d], yerr=err[:, d], fmt="o-", capsize=3, label=label)
        ax.set_xlabel(f"desired {name} (normalized)")
        ax.set_ylabel(f"obtained {name} (normalized)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(reward_names: Sequence[str], preferences: np.ndarray, desired: np.ndarray, means: np.ndarray) -> str:
    head = ["w"] + [f"desired {n}" for n in reward_names] + [f"obtained {n}" for n in reward_names]
    lines = ["  ".join(f"{h:>18}" for h in head)]
    for k in range(len(preferences)):
        w = "(" + ", ".join(f"{v:.2f}" for v in preferences[k]) + ")" if np.all(np.isfinite(preferences[k])) else "none"
        cells = [w] + [f"{v:+.3f}" for v in desired[k]] + [f"{v:+.3f}" for v in means[k]]
        lines.append("  ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def print_report(metrics: dict[str, Any], reward_names: Sequence[str], preferences: np.ndarray, desired: np.ndarray,
                 means: np.ndarray) -> None:  # fmt: skip
    """The table and the one-line measures a run prints after its sweep (``metrics`` as :func:`write_front`
    returns it)."""
    names = list(reward_names)
    sampling = metrics.get("sampling") or {}
    if sampling.get("guidance"):
        reference = sampling.get("guidance_reference", "neutral")
        print(f"reward guidance g = {sampling['guidance']:g} against the {reference} reference")
    print(format_table(names, preferences, desired, means))
    for key, value in metrics.get("steering", {}).items():
        print(
            f"steering {key}: Spearman(w_{key}, obtained {key}) = {value['spearman']:+.2f}, spread ratio "
            f"{value['spread_ratio']:.2f} (obtained range / desired range)"
        )
    for key, value in metrics.get("marker_effects", {}).get("rewards", {}).items():
        print(
            f"marker effect {key}: {value['nats_mean']:+.2f} +- {value['nats_sem']:.2f} nats lost by a held-out "
            f"response when only this marker moves (0 = the model ignores it)"
        )
    if "train_reward_correlation" in metrics:
        corr = np.asarray(metrics["train_reward_correlation"])
        pairs = [
            f"{names[i]}/{names[j]} {corr[i, j]:+.2f}" for i in range(len(names)) for j in range(i + 1, len(names))
        ]
        print("Pearson correlation of the rewards on the training data: " + ", ".join(pairs))
    print(f"hypervolume {metrics['hypervolume']:.4f} (reference {metrics['reference_point']})")

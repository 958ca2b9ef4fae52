"""Compare several evaluated runs on one plot, with every hypervolume against one shared reference point.

    ric compare runs/base/sweep runs/sft/sweep runs/ric/sweep --labels base SFT RiC --out runs/compare

Each input is a sweep folder (or its ``front.csv``); runs must share reward names. Writes ``front.png``
(all fronts on one axes), ``compare.csv`` and ``compare.json`` (hypervolume per run, the reference point).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ric.pareto import hypervolume, plot_fronts, shared_reference


def read_front(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(reward names, preferences [P, N], obtained means [P, N])`` of a front.csv (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "front.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no front.csv at {path}")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no rows")
    names = [c[len("obtained_") :] for c in rows[0] if c.startswith("obtained_") and not c.endswith("_sem")]
    prefs = np.array([[float(r[f"w_{n}"]) for n in names] for r in rows])
    means = np.array([[float(r[f"obtained_{n}"]) for n in names] for r in rows])
    return names, prefs, means


#: cost columns of the table, from each run's metrics.json (blank where a run did not record them)
COST_FIELDS = ("train_seconds", "generation_seconds", "generated_samples", "reward_calls", "training_tokens")


def read_cost(front: str | Path) -> dict[str, float | None]:
    """The cost of a run from the ``metrics.json`` beside its front: training and generation wall seconds,
    generated samples and reward calls (training and sweep together), training tokens."""
    folder = Path(front) if Path(front).is_dir() else Path(front).parent
    path = folder / "metrics.json"
    cost = json.loads(path.read_text()).get("cost", {}) if path.is_file() else {}
    if not cost:
        return dict.fromkeys(COST_FIELDS)

    def total(*keys: str) -> float | None:
        values = [cost[k] for k in keys if cost.get(k) is not None]
        return float(sum(values)) if values else None

    return {
        "train_seconds": total("train_seconds"),
        "generation_seconds": total("sweep_seconds"),
        "generated_samples": total("generated_samples_training", "generated_samples_sweep"),
        "reward_calls": total("reward_calls_training", "reward_calls_sweep"),
        "training_tokens": total("training_tokens"),
    }


def compare(
    fronts: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    out: str | Path = "compare",
    reference: Sequence[float] | None = None,
) -> dict:
    labels = list(labels) if labels else [Path(f).parent.name if Path(f).is_file() else Path(f).name for f in fronts]
    if len(labels) != len(fronts):
        raise ValueError(f"{len(labels)} labels for {len(fronts)} runs")
    loaded = [read_front(f) for f in fronts]
    names = loaded[0][0]
    for f, (other, _, _) in zip(fronts, loaded):
        if other != names:
            raise ValueError(f"{f} has rewards {other}, the first run has {names}")
    ref = np.asarray(reference, dtype=float) if reference is not None else shared_reference([m for _, _, m in loaded])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for f, label, (_, _, means) in zip(fronts, labels, loaded):
        results.append({"run": label, "hypervolume": hypervolume(means, ref), "points": len(means), **read_cost(f)})
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["run", "hypervolume", "points", *COST_FIELDS])
        writer.writeheader()
        writer.writerows(results)
    summary = {"reward_names": names, "reference_point": ref.tolist(), "runs": results}
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    if len(names) in (2, 3):
        w1 = {label: p[:, 0].tolist() for label, (_, p, _) in zip(labels, loaded) if np.all(np.isfinite(p))}
        plot_fronts(
            {label: m for label, (_, _, m) in zip(labels, loaded)},
            out / "front.png",
            names,
            w1,
            title="obtained rewards (shared hypervolume reference)",
        )
    return summary


def print_summary(summary: dict, out: str | Path) -> None:
    """What ``ric compare`` prints: each run's hypervolume and cost, the shared reference, the plot's path."""
    for r in summary["runs"]:
        costs = ", ".join(f"{k.replace('_', ' ')} {r[k]:.0f}" for k in COST_FIELDS if r.get(k) is not None)
        print(f"{r['run']:>20}  hypervolume {r['hypervolume']:.4f}" + (f"  ({costs})" if costs else ""))
    print(f"reference point {summary['reference_point']}")
    print(Path(out).resolve() / "front.png")

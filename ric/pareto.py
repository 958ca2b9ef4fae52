"""Pareto fronts: the non-dominated set, hypervolume (through moocore) and front plots.

All objectives are maximized (rewards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import moocore
import numpy as np


def _points(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"points must have shape [n_points, n_objectives], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"points contain non-finite values: {arr[~np.isfinite(arr).all(axis=1)].tolist()}")
    return arr


def non_dominated_mask(points: np.ndarray) -> np.ndarray:
    """True for the points no other point dominates (duplicates keep their first copy)."""
    arr = _points(points)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(arr, maximise=True, keep_weakly=False), dtype=bool)


def non_dominated(points: np.ndarray) -> np.ndarray:
    arr = _points(points)
    return arr[non_dominated_mask(arr)]


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and dominating ``reference`` (points not better than the reference
    in every objective add nothing)."""
    arr = _points(points)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape[0] != arr.shape[1]:
        raise ValueError(f"reference point {ref.tolist()} has {ref.shape[0]} objectives, points have {arr.shape[1]}")
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference point must be finite, got {ref.tolist()}")
    arr = arr[np.all(arr > ref, axis=1)]
    if arr.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(arr, ref=ref, maximise=True))


def shared_reference(fronts: Sequence[np.ndarray], margin: float = 0.1) -> np.ndarray:
    """One reference point for comparing several fronts: the per-objective minimum over all of them,
    lowered by ``margin`` times the spread, so every point counts."""
    allp = np.vstack([_points(f) for f in fronts])
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    return lo - margin * np.where(hi > lo, hi - lo, 1.0)


def plot_fronts(
    fronts: Mapping[str, np.ndarray],
    path: str | Path,
    objective_names: Sequence[str],
    preferences: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
) -> Path:
    """Draw one or more fronts (one per method) on shared axes and save a PNG.

    2 objectives: lines through the points in preference order, each point labelled with its ``w_1``
    (like the paper's Figure 4). 3 objectives: a 3-D scatter. ``preferences`` maps a method to the ``w_1``
    label of each of its points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not fronts:
        raise ValueError("no fronts to plot")
    dims = {_points(p).shape[1] for p in fronts.values()}
    if len(dims) != 1:
        raise ValueError(f"fronts have different numbers of objectives: {sorted(dims)}")
    (n,) = dims
    if len(objective_names) != n:
        raise ValueError(f"{len(objective_names)} objective names {list(objective_names)} for {n} objectives")
    if n not in (2, 3):
        raise ValueError(f"can plot 2 or 3 objectives, got {n}")
    fig = plt.figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot(projection="3d" if n == 3 else None)
    for label, pts in fronts.items():
        pts = _points(pts)
        if n == 2:
            (line,) = ax.plot(pts[:, 0], pts[:, 1], "-o", label=label, markersize=7, alpha=0.85)
            for k, w1 in enumerate((preferences or {}).get(label, [])[: len(pts)]):
                ax.annotate(
                    f"{w1:g}",
                    (pts[k, 0], pts[k, 1]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        else:
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], label=label, s=30, depthshade=True)
    ax.set_xlabel(objective_names[0])
    ax.set_ylabel(objective_names[1])
    if n == 3:
        ax.set_zlabel(objective_names[2])
    else:
        ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

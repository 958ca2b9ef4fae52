"""Multi-objective rejection sampling (MORS) and online target sampling (paper section 3.2).

MORS keeps the online buffer near the Pareto front: a sample is dropped exactly when it is at or below
the per-dimension quantile threshold in every dimension, i.e. kept when it beats the threshold somewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

TargetVariant = Literal["paper", "authors"]


def _scores(scores: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"scores must have shape [n_samples, n_rewards], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        row, col = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"non-finite score {arr[row, col]} at sample {row}, reward dimension {col}")
    return arr


def mors_thresholds(scores: np.ndarray, quantile: float = 0.7) -> np.ndarray:
    """Per-dimension ``quantile`` of the scores, shape ``(N,)``."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    arr = _scores(scores)
    if arr.shape[0] == 0:
        raise ValueError("cannot compute MORS thresholds from zero samples")
    return np.quantile(arr, quantile, axis=0)


def mors_keep_mask(scores: np.ndarray, thresholds: np.ndarray | Sequence[float], inclusive: bool = False) -> np.ndarray:
    """Boolean mask of kept samples: above the threshold in at least one dimension.

    ``inclusive=True`` also keeps samples that only tie a threshold (the authors' ``>=``; it matters with
    rewards rounded to 0.1, where ties are common)."""
    arr = _scores(scores)
    thr = np.asarray(thresholds, dtype=float).reshape(-1)
    if thr.shape[0] != arr.shape[1]:
        raise ValueError(f"{thr.shape[0]} thresholds {thr.tolist()} for {arr.shape[1]} reward dimensions")
    better = arr >= thr if inclusive else arr > thr
    return better.any(axis=1)


def sample_targets(
    num_samples: int,
    r_min: float | Sequence[float],
    r_max: float | Sequence[float],
    num_rewards: int | None = None,
    variant: TargetVariant = "paper",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Target rewards near the Pareto front for online generation, shape ``[num_samples, N]``.

    ``paper``: one dimension, chosen uniformly, at its maximum; the others uniform in their range.
    ``authors``: every dimension uniform, then all but the smallest (relative to its range) set to the
    maximum, as the authors' script does (for N = 2 both coincide in distribution).
    """
    rng = np.random.default_rng(rng)
    lo, hi = np.atleast_1d(np.asarray(r_min, dtype=float)), np.atleast_1d(np.asarray(r_max, dtype=float))
    n = num_rewards or max(lo.size, hi.size)
    lo, hi = np.broadcast_to(lo, (n,)).copy(), np.broadcast_to(hi, (n,)).copy()
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise ValueError(f"need finite r_min < r_max, got {lo.tolist()} and {hi.tolist()}")
    unit = rng.random((num_samples, n))
    if variant == "paper":
        top = rng.integers(0, n, size=num_samples)
        unit[np.arange(num_samples), top] = 1.0
    elif variant == "authors":
        keep = unit.argmin(axis=1)
        mask = np.ones_like(unit, dtype=bool)
        mask[np.arange(num_samples), keep] = False
        unit[mask] = 1.0
    else:
        raise ValueError(f"unknown target variant {variant!r}; choose 'paper' or 'authors'")
    return lo + unit * (hi - lo)


def sample_original(
    original_scores: np.ndarray,
    buffer_size: int,
    ratio: float = 0.5,
    quantile: float = 0.7,
    inclusive: bool = False,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Indices of original (offline) samples to mix into the online buffer: MORS-filtered with the
    original data's own thresholds, then ``round(ratio * buffer_size)`` drawn without replacement (all of
    them when fewer pass)."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    arr = _scores(original_scores)
    if arr.shape[0] == 0 or buffer_size <= 0 or ratio == 0:
        return np.zeros(0, dtype=int)
    kept = np.flatnonzero(mors_keep_mask(arr, mors_thresholds(arr, quantile), inclusive))
    want = min(int(round(ratio * buffer_size)), kept.size)
    return np.sort(np.random.default_rng(rng).choice(kept, size=want, replace=False))

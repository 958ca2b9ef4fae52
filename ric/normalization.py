"""Per-dimension reward normalization, fitted once and reused by every later stage.

The paper conditions on z-scored rewards; the statistics must be the same at relabeling, online
generation and inference, so they live in one JSON file saved next to every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


@dataclass
class RewardNormalizer:
    """Zero-mean / unit-std normalization of an ``[n_samples, n_rewards]`` score matrix.

    Args:
        reward_names: one name per column, in column order.
        mean, std: per-dimension statistics (set by :meth:`fit` or :meth:`load`).
        fitted_on: free-form description of the data the statistics came from (path, size, ...).
    """

    reward_names: Sequence[str]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reward_names = list(self.reward_names)
        if not self.reward_names:
            raise ValueError("reward_names is empty")
        if self.mean is not None:
            self.mean = np.asarray(self.mean, dtype=float)
            self.std = np.asarray(self.std, dtype=float)
            self._check_stats()

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def _check_stats(self) -> None:
        n = len(self.reward_names)
        if self.mean.shape != (n,) or self.std.shape != (n,):
            raise ValueError(
                f"statistics shapes mean {self.mean.shape} / std {self.std.shape} do not match "
                f"{n} rewards {self.reward_names}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std)) and np.all(self.std > 0)):
            raise ValueError(f"invalid statistics for {self.reward_names}: mean {self.mean}, std {self.std}")

    def _check_scores(self, scores: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        arr = np.asarray(scores, dtype=float)
        if arr.ndim != 2 or arr.shape[1] != len(self.reward_names):
            raise ValueError(
                f"scores must have shape [n, {len(self.reward_names)}] for rewards {self.reward_names}, got {arr.shape}"
            )
        bad = ~np.isfinite(arr)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{int(bad.sum())} non-finite scores, first at row {row} for reward "
                f"{self.reward_names[col]!r}: {arr[row, col]}"
            )
        return arr

    def fit(self, scores: np.ndarray, fitted_on: Mapping[str, Any] | None = None) -> RewardNormalizer:
        """Fit mean and std on raw scores (a constant column gets std 1)."""
        arr = self._check_scores(scores)
        if arr.shape[0] < 2:
            raise ValueError(f"need at least 2 scored samples to fit normalization, got {arr.shape[0]}")
        self.mean = arr.mean(axis=0)
        std = arr.std(axis=0)
        # a (numerically) constant reward carries no information: keep it finite instead of dividing by ~0
        self.std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(self.mean)), std, 1.0)
        self.fitted_on = {"num_samples": int(arr.shape[0]), **dict(fitted_on or {})}
        return self

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"normalization for {self.reward_names} is not fitted: call fit() or load()")

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores -> normalized scores."""
        self._require_fitted()
        return (self._check_scores(scores) - self.mean) / self.std

    def inverse_transform(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized scores -> raw scores."""
        self._require_fitted()
        return self._check_scores(normalized) * self.std + self.mean

    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {
            "schema_version": SCHEMA_VERSION,
            "reward_names": list(self.reward_names),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "fitted_on": self.fitted_on,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], expected_names: Sequence[str] | None = None) -> RewardNormalizer:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported normalization schema_version {version!r} (expected {SCHEMA_VERSION})")
        missing = [k for k in ("reward_names", "mean", "std") if k not in data]
        if missing:
            raise ValueError(f"normalization statistics lack the fields {missing}")
        names = list(data["reward_names"])
        if expected_names is not None and names != list(expected_names):
            raise ValueError(
                f"normalization statistics are for rewards {names}, but the configured rewards are "
                f"{list(expected_names)}"
            )
        return cls(names, mean=data["mean"], std=data["std"], fitted_on=dict(data.get("fitted_on", {})))

    @classmethod
    def load(cls, path: str | Path, expected_names: Sequence[str] | None = None) -> RewardNormalizer:
        """Load statistics; ``expected_names`` (the configured rewards) must match the file's names."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"normalization statistics file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"normalization statistics file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"normalization statistics file {path} must hold a JSON object")
        return cls.from_dict(data, expected_names)

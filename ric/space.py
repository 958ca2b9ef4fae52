"""The reward space: everything that turns raw reward scores and user preferences into the numbers a RiC
prompt carries, kept in one object.

It holds the reward names, the normalization fitted on the training data (mean and std per reward), the
reward range ``[r_min, r_max]`` in normalized units resolved to numbers, the default preference mapping
(method, p, lambda) and the configuration of the reward models, so that they can be rebuilt wherever their
weights are available. The DataModule builds it, the policy carries it inside every checkpoint and export,
and relabeling, the online loop, the sweep and inference all read that one copy.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ric.calibration import FLAT, Calibration
from ric.mapping import (
    RewardRange,
    check_mapping,
    default_reward_range,
    desired_rewards,
    per_reward,
    validate_preference,
)

#: schema 1 stored the normalization alone (``normalization.json``); schema 2 is the whole reward space;
#: schema 3 adds the optional calibration (:mod:`ric.calibration`)
SCHEMA_VERSION = 3
#: the conditions reward guidance contrasts the desired rewards with: the space's neutral point (0 in
#: normalized units), the desired rewards mirrored through it, or no markers at all
GUIDANCE_REFERENCES = ("neutral", "mirror", "none")


@dataclass
class RewardSpace:
    """Normalization, reward range and default mapping of a set of named rewards.

    Args:
        reward_names: one name per reward, in the order prompts carry them.
        mean, std: per-reward statistics of the raw scores on the training data.
        r_min, r_max: the reward range in normalized units, one value per reward.
        method, p, lam: the default preference-to-reward mapping (see :mod:`ric.mapping`).
        range_source: how ``r_min`` / ``r_max`` were obtained (for the record: ``normal`` or ``data`` and
            its quantiles).
        rewards: ``{"class_path", "init_args"}`` of each reward model (``None`` where it cannot be rebuilt).
        fitted_on: what the statistics were fitted on (data set, split, number of samples).
        calibration: what the model obtains for the values written in its prompts (``ric calibrate``). With
            one, a desired reward means the reward expected: preferences map onto the achievable range and
            :meth:`markers` writes the value that achieves it. Inference only; training labels never use it.
    """

    reward_names: Sequence[str]
    mean: np.ndarray
    std: np.ndarray
    r_min: np.ndarray | None = None
    r_max: np.ndarray | None = None
    method: str = "p_inf"
    p: float = 2.0
    lam: Sequence[float] | None = None
    range_source: dict[str, Any] = field(default_factory=lambda: {"kind": "normal"})
    rewards: list[dict[str, Any] | None] | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        self.reward_names = list(self.reward_names)
        n = len(self.reward_names)
        if not n:
            raise ValueError("reward_names is empty: a reward space needs at least one reward")
        if len(set(self.reward_names)) != n:
            raise ValueError(f"reward names must be distinct, got {self.reward_names}")
        self.mean = np.asarray(self.mean, dtype=float)
        self.std = np.asarray(self.std, dtype=float)
        if self.mean.shape != (n,) or self.std.shape != (n,):
            raise ValueError(
                f"statistics shapes mean {self.mean.shape} / std {self.std.shape} do not match "
                f"{n} rewards {self.reward_names}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std)) and np.all(self.std > 0)):
            raise ValueError(f"invalid statistics for {self.reward_names}: mean {self.mean}, std {self.std}")
        lo_default, hi_default = default_reward_range()
        self.r_min = np.full(n, lo_default) if self.r_min is None else per_reward("r_min", self.r_min, n)
        self.r_max = np.full(n, hi_default) if self.r_max is None else per_reward("r_max", self.r_max, n)
        if not (
            np.all(np.isfinite(self.r_min)) and np.all(np.isfinite(self.r_max)) and np.all(self.r_max > self.r_min)
        ):
            raise ValueError(
                f"need finite r_min < r_max, got r_min {self.r_min.tolist()} and r_max {self.r_max.tolist()}"
            )
        self.lam = None if self.lam is None else [float(v) for v in np.atleast_1d(self.lam)]
        check_mapping(self.method, self.p, self.lam, n)
        if self.rewards is not None and len(self.rewards) != n:
            raise ValueError(f"{len(self.rewards)} reward configurations for {n} rewards {self.reward_names}")
        if self.calibration is not None and list(self.calibration.reward_names) != self.reward_names:
            raise ValueError(
                f"the calibration is for rewards {list(self.calibration.reward_names)}, not {self.reward_names}"
            )

    @property
    def num_rewards(self) -> int:
        return len(self.reward_names)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        reward_names: Sequence[str],
        raw_scores: np.ndarray,
        reward_range: RewardRange | None = None,
        *,
        method: str = "p_inf",
        p: float = 2.0,
        lam: Sequence[float] | None = None,
        rewards: list[dict[str, Any] | None] | None = None,
        fitted_on: Mapping[str, Any] | None = None,
    ) -> RewardSpace:
        """Fit the statistics on raw scores ``[n, N]`` (a constant reward gets std 1), then resolve the range
        (``data`` ranges are quantiles of the normalized scores)."""
        names = list(reward_names)
        arr = check_scores(raw_scores, names)
        if arr.shape[0] < 2:
            raise ValueError(f"need at least 2 scored samples to fit normalization, got {arr.shape[0]}")
        mean = arr.mean(axis=0)
        std = arr.std(axis=0)
        # a (numerically) constant reward carries no information: keep it finite instead of dividing by ~0
        std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        reward_range = reward_range or RewardRange()
        lo, hi = reward_range.bounds(len(names), (arr - mean) / std)
        return cls(
            names,
            mean,
            std,
            lo,
            hi,
            method=method,
            p=p,
            lam=lam,
            range_source=reward_range.describe(),
            rewards=rewards,
            fitted_on={"num_samples": int(arr.shape[0]), **dict(fitted_on or {})},
        )

    def with_statistics(self, mean: Any, std: Any, fitted_on: Mapping[str, Any] | None = None) -> RewardSpace:
        """The same range and mapping over other statistics (a schema-1 checkpoint's)."""
        return replace(self, mean=np.asarray(mean, float), std=np.asarray(std, float), fitted_on=dict(fitted_on or {}))

    # ---- scores ---------------------------------------------------------------------------------
    def normalize(self, raw: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Raw scores ``[n, N]`` -> normalized scores (the units prompts and results use)."""
        return (check_scores(raw, self.reward_names) - self.mean) / self.std

    def denormalize(self, normalized: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Normalized scores -> raw scores."""
        return check_scores(normalized, self.reward_names) * self.std + self.mean

    # ---- preferences ----------------------------------------------------------------------------
    def desired(
        self, preference: Any, method: str | None = None, p: float | None = None, lam: Any = None
    ) -> np.ndarray:
        """Desired rewards (normalized units) for one preference ``[N]`` or a batch ``[B, N]``, through the
        default mapping unless ``method`` / ``p`` / ``lam`` override it; onto the achievable range when the
        space is calibrated, else onto ``[r_min, r_max]``."""
        method = method or self.method
        p = self.p if p is None else p
        lam = self.lam if lam is None and method == self.method else lam
        if is_batch(preference):
            return np.stack([self.desired(w, method, p, lam) for w in preference])
        w = self.check_preference(preference)
        lo, hi = self.mapped_range()
        return desired_rewards(w, method, p=p, lam=lam, r_min=lo, r_max=hi)

    def mapped_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The range preferences map onto: the achievable one when calibrated (a reward its marker does not
        move gets its one value), else ``[r_min, r_max]``."""
        if self.calibration is None:
            return self.r_min, self.r_max
        lo, hi = self.calibration.achievable()
        return lo, np.maximum(hi, lo + FLAT)

    def markers(self, desired: Any) -> np.ndarray:
        """The values written into prompts for ``desired`` rewards (``[N]`` or ``[B, N]``): through the
        calibration, clipped to the achievable range, when there is one; as they are otherwise."""
        values = np.asarray(desired, dtype=float)
        return values if self.calibration is None else self.calibration.marker_values(values)

    def check_preference(self, preference: Any) -> np.ndarray:
        """One preference over these rewards, or an error naming it (:func:`check_preference`)."""
        return check_preference(preference, self.reward_names)

    def check_desired(self, values: Any) -> np.ndarray:
        """Explicit desired rewards over these rewards, or an error naming them (:func:`check_desired`)."""
        return check_desired(values, self.reward_names)

    # ---- reward models --------------------------------------------------------------------------
    def build_rewards(self) -> list[Any]:
        """The reward models, rebuilt from their recorded configuration (their weights must be reachable)."""
        if self.rewards is None or any(c is None for c in self.rewards):
            missing = (
                self.reward_names
                if self.rewards is None
                else [n for n, c in zip(self.reward_names, self.rewards) if c is None]
            )
            raise ValueError(f"the reward models {missing} were not recorded in a rebuildable form")
        out = []
        for name, conf in zip(self.reward_names, self.rewards):
            module, _, cls_name = conf["class_path"].rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), cls_name)
                reward = cls(**conf.get("init_args", {}))
            except Exception as err:  # noqa: BLE001 - the user needs the reward's name with any failure
                raise RuntimeError(f"could not rebuild reward {name!r} ({conf['class_path']}): {err}") from err
            if reward.name != name:
                raise ValueError(f"rebuilt reward {conf['class_path']} is named {reward.name!r}, expected {name!r}")
            out.append(reward)
        return out

    # ---- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "reward_names": list(self.reward_names),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "r_min": self.r_min.tolist(),
            "r_max": self.r_max.tolist(),
            "range_source": self.range_source,
            "mapping": {"method": self.method, "p": self.p, "lam": self.lam},
            "rewards": self.rewards,
            "fitted_on": self.fitted_on,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], expected_names: Sequence[str] | None = None) -> RewardSpace:
        """A space from :meth:`to_dict`, or from a schema-1 normalization record (the paper's defaults for
        the range and the mapping then apply)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a reward space must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version not in (1, 2, SCHEMA_VERSION):
            raise ValueError(f"unsupported reward space schema_version {version!r} (this ric reads 1 to 3)")
        missing = [k for k in ("reward_names", "mean", "std") if k not in data]
        if missing:
            raise ValueError(f"the reward space lacks the fields {missing}")
        names = list(data["reward_names"])
        if expected_names is not None and names != list(expected_names):
            raise ValueError(
                f"the reward statistics are for rewards {names}, but the configured rewards are {list(expected_names)}"
            )
        if version == 1:
            return cls(names, data["mean"], data["std"], fitted_on=dict(data.get("fitted_on", {})))
        mapping = data.get("mapping") or {}
        return cls(
            names,
            data["mean"],
            data["std"],
            data.get("r_min"),
            data.get("r_max"),
            method=mapping.get("method", "p_inf"),
            p=mapping.get("p", 2.0),
            lam=mapping.get("lam"),
            range_source=dict(data.get("range_source") or {"kind": "normal"}),
            rewards=data.get("rewards"),
            fitted_on=dict(data.get("fitted_on", {})),
            calibration=None if not data.get("calibration") else Calibration.from_dict(data["calibration"], names),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_names: Sequence[str] | None = None) -> RewardSpace:
        """A saved space (``reward_space.json``) or schema-1 statistics (``normalization.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"reward space file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"reward space file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data, expected_names)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def describe(self) -> str:
        """One line per reward: its statistics and range, then the mapping (model cards, ``ric generate``)."""
        lines = [
            f"{name}: raw mean {m:.4g}, std {s:.4g}; range [{lo:+.3f}, {hi:+.3f}] (normalized)"
            for name, m, s, lo, hi in zip(self.reward_names, self.mean, self.std, self.r_min, self.r_max)
        ]
        p = f", p={self.p:g}" if self.method in ("p_norm", "solver") else ""
        calibrated = [] if self.calibration is None else [self.calibration.describe()]
        return "\n".join([*lines, f"mapping: {self.method}{p}; range from {self.range_source}", *calibrated])


def check_preference(preference: Any, reward_names: Sequence[str]) -> np.ndarray:
    """The one check of a user's preference (the CLI, the Python API and the server all call it): one
    non-negative weight per reward summing to 1; the error names the value and the rewards."""
    try:
        return validate_preference(preference, num_rewards=len(reward_names))
    except ValueError as err:
        raise ValueError(f"{err}; rewards: {list(reward_names)}") from None


def check_desired(values: Any, reward_names: Sequence[str], what: str = "desired rewards") -> np.ndarray:
    """The one check of reward values written into a prompt (``[N]``, or ``[B, N]`` one row per prompt): finite
    numbers, one per reward (the CLI, the Python API, the server and the conditioning format all call it).
    Returns them as floats; the error names the values (``what``) and the rewards."""
    if not all(_is_number(v) for v in _leaves(values)):
        raise ValueError(f"{what} {values!r} are not numbers")
    n = len(reward_names)
    problem = f"{what} {values!r} need {n} finite values, one per reward {list(reward_names)}"
    try:
        arr = np.asarray(values, dtype=float)
    except ValueError:  # rows of different lengths
        raise ValueError(problem) from None
    if arr.ndim not in (1, 2) or arr.shape[-1] != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} {arr.tolist()} need {n} finite values, one per reward {list(reward_names)}")
    return arr


def _leaves(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist()
    if isinstance(values, (list, tuple)):
        return [leaf for v in values for leaf in _leaves(v)]
    return [values]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_scores(scores: np.ndarray | Sequence[Sequence[float]], names: Sequence[str]) -> np.ndarray:
    """Scores as a finite ``[n, N]`` float array, or an error naming the first bad value."""
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"scores must have shape [n, {len(names)}] for rewards {list(names)}, got {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{int(bad.sum())} non-finite scores, first at row {row} for reward {names[col]!r}: {arr[row, col]}"
        )
    return arr


def is_batch(value: Any) -> bool:
    """Whether preferences or desired rewards come one row per prompt (a sequence of sequences)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 2
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (list, tuple, np.ndarray))


class RangeSettingsMoved:
    """Refuses the reward-range settings callbacks once took, naming where they live now: the reward space
    is saved with the model, so the sweep, the online loop and inference share one range. A callback inherits
    this and passes its ``**moved`` keyword arguments on."""

    def __init__(
        self,
        reward_range: str | None = None,
        range_quantiles: tuple[float, float] | None = None,
        r_min: float | list[float] | None = None,
        r_max: float | list[float] | None = None,
    ) -> None:
        given = {"reward_range": reward_range, "range_quantiles": range_quantiles, "r_min": r_min, "r_max": r_max}
        for key, value in given.items():
            if value is not None:
                raise ValueError(
                    f"{type(self).__name__}.{key} moved to the reward space: set data.init_args.{key} (it is saved "
                    "with the model, so the sweep, the online loop and inference use the same range)"
                )

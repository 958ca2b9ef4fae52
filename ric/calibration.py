"""A mapping calibrated on the model's own answers: what to write in the prompt so that it obtains what is asked.

A RiC model told "verbosity 2.0" seldom obtains 2.0: on real data it reads its markers weakly, so the values
written in the prompt overstate what it does. :class:`Calibration` holds, per reward, a monotone
(isotonic) map from the value written to the reward obtained, fitted on answers to a grid of preferences.
Inverted, it gives the value to write for a reward one wants to obtain, clipped to the range the model
achieved; the reward space applies it at inference (``ric generate``, ``ric serve``, the sweep), never to
training labels. :func:`calibrate` fits one and measures it on prompts it was not fitted on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import isotonic_regression

if TYPE_CHECKING:
    from ric.interfaces import ConditionalPolicy
    from ric.rewards import RewardModel
    from ric.space import RewardSpace

#: an achievable range narrower than this is a reward the model does not steer (one value for every marker)
FLAT = 1e-6


@dataclass
class Calibration:
    """Per reward ``i``, the knots of a non-decreasing map ``written[i][k] -> obtained[i][k]`` (normalized
    units; ``written`` ascending; each reward its own number of knots), the sampling settings the answers were
    drawn with, and what it was fitted on and measured to do (``error``: mean |obtained - asked| on held-out
    prompts, before and after)."""

    reward_names: Sequence[str]
    written: Sequence[Sequence[float]]
    obtained: Sequence[Sequence[float]]
    settings: dict[str, Any] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.reward_names = list(self.reward_names)
        n = len(self.reward_names)
        if len(self.written) != n or len(self.obtained) != n:
            raise ValueError(
                f"a calibration needs written and obtained knots for each of the {n} rewards {self.reward_names}, "
                f"got {len(self.written)} and {len(self.obtained)}"
            )
        self.written = [np.asarray(x, dtype=float) for x in self.written]
        self.obtained = [np.asarray(y, dtype=float) for y in self.obtained]
        for name, x, y in zip(self.reward_names, self.written, self.obtained):
            if x.ndim != 1 or x.shape != y.shape or x.size < 2:
                raise ValueError(f"{name!r} needs at least 2 written and obtained knots of one length, got "
                                 f"{x.shape} and {y.shape}")  # fmt: skip
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                raise ValueError(f"calibration knots for {name!r} must be finite numbers")
            if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < -1e-9):
                raise ValueError(
                    f"calibration knots for {name!r} need written values ascending and obtained ones non-decreasing"
                )

    @classmethod
    def fit(
        cls,
        reward_names: Sequence[str],
        written: np.ndarray,
        obtained: np.ndarray,
        settings: Mapping[str, Any] | None = None,
        fitted_on: Mapping[str, Any] | None = None,
    ) -> Calibration:
        """The isotonic fit of obtained rewards ``[n, N]`` on the values written for them ``[n, N]``: per reward,
        the mean obtained at each distinct written value, made non-decreasing (weighted by answers)."""
        written, obtained = np.asarray(written, dtype=float), np.asarray(obtained, dtype=float)
        names = list(reward_names)
        if written.shape != obtained.shape or written.ndim != 2 or written.shape[1] != len(names):
            raise ValueError(f"written {written.shape} and obtained {obtained.shape} need shape [n, {len(names)}]")
        if not np.all(np.isfinite(obtained)):
            raise ValueError("obtained rewards hold non-finite values: the calibration cannot be fitted")
        knots_x, knots_y = [], []
        for i, name in enumerate(names):
            values, group = np.unique(written[:, i].round(9), return_inverse=True)
            if values.size < 2:
                raise ValueError(f"the grid wrote one value for {name!r}: a calibration needs at least two")
            counts = np.bincount(group)
            means = np.bincount(group, weights=obtained[:, i]) / counts
            knots_x.append(values)
            knots_y.append(isotonic_regression(means, weights=counts, increasing=True).x)
        return cls(names, knots_x, knots_y, dict(settings or {}), dict(fitted_on or {}))

    # ---- the map ------------------------------------------------------------------------------------
    def achievable(self) -> tuple[np.ndarray, np.ndarray]:
        """Per reward, the lowest and highest reward the model obtained over the written grid."""
        return np.array([y[0] for y in self.obtained]), np.array([y[-1] for y in self.obtained])

    def steerable(self) -> list[bool]:
        """Whether each reward moved at all with its marker (a flat map cannot be inverted)."""
        lo, hi = self.achievable()
        return [bool(h - l > FLAT) for l, h in zip(lo, hi)]  # noqa: E741 - low / high

    def expected(self, written: Any) -> np.ndarray:
        """The reward expected from writing ``written`` (``[N]`` or ``[B, N]``)."""
        values = np.asarray(written, dtype=float)
        rows = np.atleast_2d(values)
        out = np.stack([np.interp(rows[:, i], self.written[i], self.obtained[i]) for i in range(rows.shape[1])], 1)
        return out.reshape(values.shape)

    def marker_values(self, asked: Any) -> np.ndarray:
        """The values to write for ``asked`` rewards (``[N]`` or ``[B, N]``): each clipped to its achievable
        range, then the map inverted (a plateau of equal obtained values answers with its middle written
        value; a reward that did not move writes the middle of its grid)."""
        values = np.asarray(asked, dtype=float)
        rows = np.atleast_2d(values)
        out = np.empty_like(rows)
        for i in range(rows.shape[1]):
            levels, group = np.unique(self.obtained[i].round(12), return_inverse=True)
            middles = np.bincount(group, weights=self.written[i]) / np.bincount(group)
            out[:, i] = np.interp(np.clip(rows[:, i], levels[0], levels[-1]), levels, middles)
        return out.reshape(values.shape)

    # ---- storage and display ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "written": [x.tolist() for x in self.written],
            "obtained": [y.tolist() for y in self.obtained],
            "settings": self.settings,
            "fitted_on": self.fitted_on,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], reward_names: Sequence[str]) -> Calibration:
        if not isinstance(data, Mapping) or "written" not in data or "obtained" not in data:
            raise ValueError("a calibration must be a JSON object with 'written' and 'obtained' knots")
        return cls(
            reward_names,
            data["written"],
            data["obtained"],
            dict(data.get("settings") or {}),
            dict(data.get("fitted_on") or {}),
            data.get("error"),
        )

    def describe(self) -> str:
        """The achievable range of every reward, one line (``ric generate`` and the model card print it)."""
        lo, hi = self.achievable()
        parts = [
            f"{n} [{a:+.2f}, {b:+.2f}]" if ok else f"{n} {a:+.2f} (its marker does not move it)"
            for n, a, b, ok in zip(self.reward_names, lo, hi, self.steerable())
        ]
        guided = self.settings.get("guidance")
        return "achievable (calibrated" + (f" at guidance g = {guided:g}" if guided else "") + "): " + ", ".join(parts)


def split_prompts(prompts: Sequence[Any], held_out: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(fit, held-out)``: a seeded shuffle of the distinct prompts, ``held_out`` of them (at least one each)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError(f"calibration needs at least 2 distinct prompts (to fit and to check), got {len(distinct)}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    random.Random(seed).shuffle(distinct)
    k = min(max(1, round(len(distinct) * held_out)), len(distinct) - 1)
    return distinct[k:], distinct[:k]


def calibration_error(asked: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per reward, mean |obtained - asked| over a sweep's preferences (its per-preference mean answers)."""
    return np.abs(np.asarray(means, float) - np.asarray(asked, float)).mean(axis=0)


def calibrate(
    policy: ConditionalPolicy,
    rewards: Sequence[RewardModel],
    prompts: Sequence[Any],
    output_dir: str | Path,
    *,
    points: int = 5,
    samples: int = 2,
    held_out: float = 0.5,
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> RewardSpace:
    """The policy's reward space with a calibration fitted on its answers (the policy keeps its own space).

    The grid is the sweep's preferences (``points`` per reward for two rewards) through the linear mapping: each
    reward's written value runs evenly over its range while the others move as they do when users steer. The
    map is fitted on ``1 - held_out`` of the prompts; on the others the error (mean |obtained - asked| at each
    preference) is measured asking for the same values, evenly over the achievable range, written as they are
    (before) and through the map (after). ``samples`` answers per prompt and preference; every sweep
    is kept under ``output_dir`` and resumes (``fingerprint``, the model's, makes another model start afresh)."""
    from ric.sweep import default_preferences, run_sweep

    space = policy.reward_space
    if space is None or not policy.conditioned:
        raise ValueError("calibration needs a conditioned policy with a reward space")
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    fit_prompts, check_prompts = split_prompts(prompts, held_out, seed)
    names = list(space.reward_names)
    preferences = default_preferences(len(names), points)
    raw_space = replace(space, calibration=None)
    out = Path(output_dir)
    settings = dict(settings or {})

    def sweep(with_space: RewardSpace, chosen: list[Any], name: str) -> Any:
        policy.set_reward_space(with_space)
        repeated = [p for p in chosen for _ in range(samples)]
        return run_sweep(policy, rewards, repeated, preferences, out / name, method="linear", settings=settings,
                         seed=seed, fingerprint=fingerprint)  # fmt: skip

    try:
        fitted = sweep(raw_space, fit_prompts, "fit")
        written = np.concatenate([np.broadcast_to(d, o.shape) for d, o in zip(fitted.desired, fitted.obtained)])
        calibration = Calibration.fit(
            names,
            written,
            np.concatenate(fitted.obtained),
            settings,
            {"prompts": len(fit_prompts), "samples_per_prompt": samples, "preferences": len(preferences), "seed": seed},
        )
        calibrated = replace(raw_space, calibration=calibration)
        asked = calibrated.desired(preferences, "linear")
        # "before": the same asked values written as they are, through a space whose range is the achievable one
        lo, hi = calibrated.mapped_range()
        plain = replace(raw_space, r_min=lo, r_max=hi)
        before = sweep(plain, check_prompts, "before")
        after = sweep(calibrated, check_prompts, "after")
    finally:
        policy.set_reward_space(space)
    error_before, error_after = calibration_error(asked, before.means), calibration_error(asked, after.means)
    calibration.error = {
        "held_out_prompts": len(check_prompts),
        "asked": asked.tolist(),
        "obtained_before": before.means.tolist(),
        "obtained_after": after.means.tolist(),
        "before": dict(zip(names, error_before.tolist())),
        "after": dict(zip(names, error_after.tolist())),
        "mean_before": float(error_before.mean()),
        "mean_after": float(error_after.mean()),
    }
    return calibrated

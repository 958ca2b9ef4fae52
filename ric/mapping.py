"""Preference -> desired rewards (paper section 3.4, Theorem 3.1 and Appendix A.1).

A user preference ``w`` (a point on the N-simplex) becomes the reward values written into the prompt.
Each reward's normalized range ``[r_min_i, r_max_i]`` is mapped linearly to ``[0, 1]``; the unit-space
target ``z`` solves ``max_z sum_i w_i z_i`` over a convex regularization set ``C_reg`` with
``1 >= z_(1) >= ... >= z_(N) >= 0`` in the order of ``w``, and ``R_i = (r_max_i - r_min_i) z_i + r_min_i``.

Methods:
    ``linear``  z = w (the simple baseline the paper shows to be worse);
    ``p_norm``  closed form for ``C_reg = {||lambda * z||_p <= 1}``, 1 < p < inf (Theorem 3.1);
    ``p_inf``   the paper's practical p = inf rule, ``lambda_i = 1 if w_i >= 1/N else 1/(N w_i)``;
    ``solver``  the general program solved numerically with scipy (any 1 < p <= inf, optional extra
                convex constraints); it reproduces the closed forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, get_args

import numpy as np
from scipy import integrate, optimize, stats

Method = Literal["linear", "p_norm", "p_inf", "solver"]
METHODS: tuple[str, ...] = get_args(Method)

#: The paper draws 50,000 standard-normal samples and takes their min and max as the reward range.
PAPER_RANGE_DRAWS = 50_000
SIMPLEX_TOL = 1e-6


@lru_cache(maxsize=16)
def expected_normal_max(num_draws: int = PAPER_RANGE_DRAWS) -> float:
    """Expected maximum of ``num_draws`` iid standard-normal samples (a deterministic stand-in for the
    paper's sampled range; 4.2305 for 50,000 draws). The expected minimum is its negative."""
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")

    def cdf_pow(x: float) -> float:
        return float(np.exp(num_draws * stats.norm.logcdf(x)))

    # E[max] = int_0^inf (1 - F(x)^n) dx - int_-inf^0 F(x)^n dx
    upper, _ = integrate.quad(lambda x: 1.0 - cdf_pow(x), 0.0, 40.0, limit=200, points=[2.0, 4.0, 6.0])
    lower, _ = integrate.quad(cdf_pow, -40.0, 0.0, limit=200)
    return upper - lower


def default_reward_range(num_draws: int = PAPER_RANGE_DRAWS) -> tuple[float, float]:
    """``(r_min, r_max)`` in normalized reward space, as the paper sets them."""
    top = expected_normal_max(num_draws)
    return -top, top


@dataclass(frozen=True)
class RewardRange:
    """Where ``[r_min, r_max]`` comes from, in normalized reward units.

    ``normal``: the paper's choice, the expected extremes of 50,000 standard-normal draws (+-4.23);
    ``data``: the ``quantiles`` of the normalized training scores. ``r_min`` / ``r_max`` (scalars or one
    value per reward) override either bound.
    """

    kind: str = "normal"
    quantiles: tuple[float, float] = (0.0, 1.0)
    r_min: float | Sequence[float] | None = None
    r_max: float | Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "data"):
            raise ValueError(f"reward_range must be 'normal' or 'data', got {self.kind!r}")
        lo, hi = self.quantiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"range_quantiles must satisfy 0 <= low < high <= 1, got {tuple(self.quantiles)}")

    def bounds(self, num_rewards: int, normalized_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(r_min, r_max)``, one value per reward."""
        if self.kind == "data" and normalized_scores is not None and len(normalized_scores):
            lo, hi = np.quantile(np.asarray(normalized_scores, dtype=float), self.quantiles, axis=0)
        else:
            lo_n, hi_n = default_reward_range()
            lo, hi = np.full(num_rewards, lo_n), np.full(num_rewards, hi_n)
        if self.r_min is not None:
            lo = per_reward("r_min", self.r_min, num_rewards)
        if self.r_max is not None:
            hi = per_reward("r_max", self.r_max, num_rewards)
        if not np.all(hi > lo):
            raise ValueError(f"need r_min < r_max, got r_min {lo.tolist()} and r_max {hi.tolist()}")
        return lo, hi

    def describe(self) -> dict[str, Any]:
        """The settings, for the record kept with a reward space."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "data":
            out["quantiles"] = list(self.quantiles)
        if self.r_min is not None:
            out["r_min"] = self.r_min
        if self.r_max is not None:
            out["r_max"] = self.r_max
        return out


def check_mapping(method: str, p: float, lam: Any, num_rewards: int | None = None) -> None:
    """Mapping settings that are wrong for every preference, refused when they are declared: an unknown
    method, ``p <= 1`` (or ``p = inf`` for ``p_norm``), ``lam`` with ``linear``, of the wrong length or below 1."""
    if method not in METHODS:
        raise ValueError(f"unknown mapping method {method!r}; choose one of {list(METHODS)}")
    if method in ("p_norm", "solver"):
        _check_p(p, allow_inf=method == "solver")
    if lam is None:
        return
    if method == "linear":
        raise ValueError("lam has no meaning for the linear mapping")
    arr = np.atleast_1d(np.asarray(lam, dtype=float))
    if num_rewards is not None and arr.shape != (num_rewards,) and arr.size != 1:
        raise ValueError(f"lam {arr.tolist()} has {arr.size} values, expected {num_rewards} (one per reward)")
    if np.any(np.isnan(arr)) or np.any(arr < 1):
        raise ValueError(f"lam {arr.tolist()} must have every entry >= 1")


def validate_preference(preference: Any, num_rewards: int | None = None) -> np.ndarray:
    """A 1-D, finite, non-negative vector summing to 1 (within 1e-6), of length ``num_rewards`` if given."""
    try:
        w = np.asarray(preference, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"preference {preference!r} is not a vector of numbers") from None
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"preference must be a non-empty 1-D vector, got shape {w.shape}: {preference!r}")
    if num_rewards is not None and w.size != num_rewards:
        raise ValueError(f"preference {w.tolist()} has {w.size} entries, expected {num_rewards} (one per reward)")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"preference {w.tolist()} has non-finite entries")
    if np.any(w < 0):
        raise ValueError(f"preference {w.tolist()} has negative entries")
    if abs(w.sum() - 1.0) > SIMPLEX_TOL:
        raise ValueError(f"preference {w.tolist()} sums to {w.sum():.9g}, not 1 (it must lie on the simplex)")
    return w


def per_reward(name: str, value: Any, n: int) -> np.ndarray:
    """A setting given as one value for all ``n`` rewards or one per reward, as ``n`` floats."""
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} {arr.tolist()} has shape {arr.shape}, expected a scalar or {n} values")
    return arr


def _check_p(p: float, allow_inf: bool) -> float:
    p = float(p)
    if np.isnan(p) or p <= 1:
        raise ValueError(f"p must be > 1, got {p}")
    if np.isinf(p) and not allow_inf:
        raise ValueError("p = inf has no p_norm closed form: use method='p_inf' (or 'solver' with p=inf)")
    return p


def _check_lambda(lam: Any, w: np.ndarray, p: float) -> np.ndarray:
    """Theorem 3.1 needs lambda >= 1 and the reweighted preference ``w_i^(1/p) / lambda_i`` ordered like w."""
    n = w.size
    lam = per_reward("lam", lam, n)
    if np.any(np.isnan(lam)) or np.any(lam < 1):
        raise ValueError(f"lam {lam.tolist()} must have every entry >= 1")
    ratio = (1.0 / lam) if np.isinf(p) else w ** (1.0 / p) / lam
    for i in range(n):
        for j in range(n):
            if w[i] > w[j] and ratio[i] < ratio[j] - 1e-12:
                raise ValueError(
                    f"lam {lam.tolist()} violates Theorem 3.1's ordering condition for preference {w.tolist()}: "
                    f"w_i^(1/p)/lam_i must follow the order of w, but dimension {i} (w={w[i]:.6g}) gives "
                    f"{ratio[i]:.6g} < {ratio[j]:.6g} of dimension {j} (w={w[j]:.6g})"
                )
    return lam


def p_norm_unit(w: np.ndarray, p: float, lam: np.ndarray) -> np.ndarray:
    """Closed form of Theorem 3.1 for 1 < p < inf:
    ``z_i = (w_i / lam_i^p)^(1/(p-1)) / (sum_j (w_j / lam_j)^(p/(p-1)))^(1/p)``."""
    num = (w / lam**p) ** (1.0 / (p - 1.0))
    den = np.sum((w / lam) ** (p / (p - 1.0))) ** (1.0 / p)
    return num / den


def p_inf_unit(w: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray:
    """p = inf: ``z_i = 1 / lam_i``; by default the paper's practical ``lambda``, i.e. ``z_i = min(1, N w_i)``."""
    if lam is None:
        return np.minimum(1.0, w.size * w)
    return 1.0 / lam


def _order_pairs(w: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j) with w_i > w_j adjacent in the descending order of w: z_i >= z_j for each."""
    levels = sorted(set(w.tolist()), reverse=True)
    pairs = []
    for hi, lo in zip(levels, levels[1:]):
        pairs += [(i, j) for i in np.flatnonzero(w == hi) for j in np.flatnonzero(w == lo)]
    return pairs


def solve_unit(
    w: np.ndarray,
    p: float,
    lam: np.ndarray,
    constraints: Sequence[dict] = (),
) -> np.ndarray:
    """Solve Appendix A.1's convex program numerically:
    maximize ``w . z`` s.t. ``||lam * z||_p <= 1``, ``1 >= z >= 0``, z ordered like w, plus ``constraints``
    (scipy ``{'type': 'ineq', 'fun': ...}`` dicts describing further convex restrictions).
    Among several maximizers the largest ``z`` is returned, matching the closed forms."""
    n = w.size
    pairs = _order_pairs(w)
    order = [{"type": "ineq", "fun": (lambda z, i=i, j=j: z[i] - z[j])} for i, j in pairs]
    # lambda_i = inf (the practical p = inf rule at w_i = 0) pins z_i to 0
    upper = np.minimum(1.0, 1.0 / lam)
    if np.isinf(p) and not constraints:
        a_ub = np.zeros((len(pairs), n))
        for row, (i, j) in enumerate(pairs):
            a_ub[row, i], a_ub[row, j] = -1.0, 1.0
        box = list(zip(np.zeros(n), upper))
        first = optimize.linprog(
            -w,
            A_ub=a_ub if pairs else None,
            b_ub=np.zeros(len(pairs)) if pairs else None,
            bounds=box,
            method="highs",
        )
        if not first.success:
            raise RuntimeError(f"mapping LP failed for preference {w.tolist()}: {first.message}")
        # lexicographic second stage: the largest z among the maximizers of w . z
        a2 = np.vstack([a_ub, -w[None, :]])
        b2 = np.append(np.zeros(len(pairs)), first.fun + 1e-12)
        second = optimize.linprog(-np.ones(n), A_ub=a2, b_ub=b2, bounds=box, method="highs")
        return second.x if second.success else first.x

    if not constraints:
        # without weight a dimension only takes norm budget from the others: 0 is optimal there, and
        # fixing it keeps the problem well conditioned (the norm's gradient vanishes at 0)
        upper = np.where(w > 0, upper, 0.0)
    cons = [*order, *constraints]
    if np.isfinite(p):

        def scaled(z: np.ndarray) -> np.ndarray:
            return np.where(upper > 0, lam * z, 0.0)

        def norm_fun(z: np.ndarray) -> float:
            return 1.0 - np.linalg.norm(scaled(z), ord=p)

        def norm_jac(z: np.ndarray) -> np.ndarray:
            u = scaled(z)
            nrm = np.linalg.norm(u, ord=p)
            if nrm == 0:
                return np.zeros(n)
            return -np.where(upper > 0, (np.abs(u) ** (p - 1)) * lam, 0.0) / nrm ** (p - 1)

        cons.append({"type": "ineq", "fun": norm_fun, "jac": norm_jac})
        x0 = 0.5 * upper / max(np.linalg.norm(np.where(upper > 0, lam, 0.0), ord=p), 1.0)
    else:
        x0 = 0.5 * upper
    res = optimize.minimize(
        lambda z: -float(w @ z),
        x0,
        jac=lambda z: -w,
        method="SLSQP",
        bounds=optimize.Bounds(np.zeros(n), upper, keep_feasible=False),
        constraints=cons,
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    if not res.success and res.status != 8:  # 8: positive directional derivative at the optimum (converged)
        raise RuntimeError(f"mapping solver failed for preference {w.tolist()}: {res.message}")
    return np.clip(res.x, 0.0, upper)


def preference_to_unit(
    preference: Any,
    method: Method = "p_norm",
    *,
    p: float = 2.0,
    lam: Any = None,
    constraints: Sequence[dict] = (),
    num_rewards: int | None = None,
) -> np.ndarray:
    """The unit-space targets ``z`` in ``[0, 1]^N`` for a preference (see the module docstring)."""
    check_mapping(method, p, None)
    w = validate_preference(preference, num_rewards)
    if method == "linear":
        if lam is not None:
            raise ValueError("lam has no meaning for the linear mapping")
        return w.copy()
    if method == "p_inf":
        return p_inf_unit(w, None if lam is None else _check_lambda(lam, w, np.inf))
    p = _check_p(p, allow_inf=method == "solver")
    if lam is None:
        with np.errstate(divide="ignore"):  # w_i = 0 gives lambda_i = inf, i.e. z_i pinned to 0
            lam_arr = (1.0 / p_inf_unit(w)) if np.isinf(p) else np.ones(w.size)
    else:
        lam_arr = _check_lambda(lam, w, p)
    if method == "p_norm":
        return p_norm_unit(w, p, lam_arr)
    return solve_unit(w, p, lam_arr, constraints)


def desired_rewards(
    preference: Any,
    method: Method = "p_norm",
    *,
    p: float = 2.0,
    lam: Any = None,
    r_min: Any = None,
    r_max: Any = None,
    constraints: Sequence[dict] = (),
) -> np.ndarray:
    """Desired rewards ``R`` (shape ``(N,)``) to write into the prompt for preference ``w``.

    Args:
        preference: ``w`` on the simplex (non-negative, sums to 1).
        method: ``"linear"``, ``"p_norm"``, ``"p_inf"`` or ``"solver"``.
        p: the norm of ``C_reg`` for ``p_norm`` (1 < p < inf) and ``solver`` (1 < p <= inf).
        lam: per-dimension reweighting ``lambda >= 1`` (Theorem 3.1); must keep ``w_i^(1/p)/lambda_i``
            in the order of ``w``. Default: all ones, or the paper's practical rule for p = inf.
        r_min, r_max: reward range (scalars or one value per reward); default: the expected extremes of
            50,000 standard-normal draws (-4.2305 / +4.2305), the paper's choice in normalized space.
        constraints: extra convex constraints for ``solver`` (scipy inequality dicts on ``z``).
    """
    z = preference_to_unit(preference, method, p=p, lam=lam, constraints=constraints)
    n = z.size
    lo_default, hi_default = default_reward_range()
    lo = per_reward("r_min", lo_default if r_min is None else r_min, n)
    hi = per_reward("r_max", hi_default if r_max is None else r_max, n)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise ValueError(f"need finite r_min < r_max, got r_min {lo.tolist()} and r_max {hi.tolist()}")
    return (hi - lo) * z + lo

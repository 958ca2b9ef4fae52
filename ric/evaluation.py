"""Preference sweep: map each preference to desired rewards, generate, score, and write the front.

Outputs in one folder: ``front.csv`` (one row per preference), ``samples.jsonl``, ``front.png`` and
``metrics.json`` (hypervolume, its reference point, the mapping method and the normalization used).
Obtained rewards are reported in the same normalized units as the desired rewards.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np

from ric.distributed import contiguous_share, gather_to_first, rank_and_world, sharded_weights
from ric.interfaces import ConditionalPolicy, RewardModel
from ric.mapping import check_mapping, default_reward_range, validate_preference
from ric.pareto import hypervolume, plot_fronts
from ric.rollout import rollout
from ric.signals import clear_stop

log = logging.getLogger(__name__)

#: The 13 preference triples of the paper's three-objective front (Appendix B); 0.33 read as 1/3.
PAPER_TRIPLES = [
    [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.2, 0.4, 0.4],
    [0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.4, 0.2, 0.4], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2], [0.8, 0.1, 0.1],
    [1.0, 0.0, 0.0],
]  # fmt: skip


def default_preferences(num_rewards: int, num_points: int | None = None) -> list[list[float]]:
    """2 objectives: ``num_points`` (default 11) values of ``w_1`` from 0 to 1; 3 objectives: the paper's
    13 triples; more: the simplex lattice with step 1/2 plus the centre. One objective: ``[1]``."""
    if num_rewards == 1:
        return [[1.0]]
    if num_rewards == 2:
        return [[float(t), float(1 - t)] for t in np.linspace(0.0, 1.0, num_points or 11).round(10)]
    if num_rewards == 3 and num_points is None:
        return [list(p) for p in PAPER_TRIPLES]
    steps = 2 if num_points is None else max(1, num_points - 1)
    out = []

    def rec(prefix: list[int], left: int) -> None:
        if len(prefix) == num_rewards - 1:
            out.append([*prefix, left])
            return
        for k in range(left + 1):
            rec([*prefix, k], left - k)

    rec([], steps)
    points = [[k / steps for k in p] for p in out]
    centre = [1.0 / num_rewards] * num_rewards
    return points + ([centre] if centre not in points else [])


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


def assemble(
    parts: Sequence[tuple[list[int], list[Any], np.ndarray]], n: int, num_rewards: int
) -> tuple[list, np.ndarray]:
    """Ranks' ``(indices, samples, raw scores)`` -> all ``n`` samples and scores in prompt order."""
    samples: list[Any] = [None] * n
    raw = np.full((n, num_rewards), np.nan)
    for indices, their_samples, their_raw in parts:
        for j, i in enumerate(indices):
            samples[i], raw[i] = their_samples[j], their_raw[j]
    missing = [i for i in range(n) if samples[i] is None]
    if missing:
        raise RuntimeError(f"the sweep lost samples {missing[:10]} while gathering them from the ranks")
    return samples, raw


#: where a checkpoint keeps the training's cost (seconds, steps, tokens), so a fit started from it adds to it
LEDGER_KEY = "ric_training_ledger"

#: sweep settings that moved to the reward space (the DataModule), with where they live now
MOVED_TO_SPACE = {
    "reward_range": "reward_range",
    "range_quantiles": "range_quantiles",
    "r_min": "r_min",
    "r_max": "r_max",
}


def moved_settings(owner: str, **given: Any) -> None:
    """Refuse settings that moved to the reward space, naming their new place."""
    for key, value in given.items():
        if value is not None:
            raise ValueError(
                f"{owner}.{key} moved to the reward space: set data.init_args.{MOVED_TO_SPACE[key]} (it is saved "
                "with the model, so the sweep, the online loop and inference use the same range)"
            )


class PreferenceSweep(L.Callback):
    """Evaluates a policy across preferences on the DataModule's held-out prompts.

    Runs after ``test`` (``ric test --ckpt_path ...``) and, with ``after_fit: true``, at the end of ``fit``.
    Every process generates and scores its share of the prompts; rank 0 writes the results. Desired rewards
    come from the policy's reward space (its range and mapping) unless ``method`` / ``p`` override the mapping.

    Args:
        preferences: explicit list of preferences; default: 11 points for 2 rewards, the paper's 13 triples
            for 3 (or ``num_points`` per axis).
        num_points: number of ``w_1`` values for 2 rewards.
        method, p: override the reward space's mapping (recorded in metrics.json).
        unconditioned: evaluate without reward markers (base model / plain SFT baseline): one row.
        output_dir: result folder (default: ``<log_dir>/sweep``).
        reference: hypervolume reference point (default: ``r_min`` of the reward space in every dimension).
        sampling: generation overrides (default: the policy's evaluation settings, e.g. temperature 1.0, top_p 0.9
            for text as in the paper).
        after_fit: also run at the end of ``fit``.
        label: the run's name in plots, ``metrics.json`` and ``ric.compare``.
        samples_per_prompt: responses generated per prompt and preference (more = less noisy means).
        seed: every preference samples from this seed's stream, so the columns differ by the conditioning
            alone, and ``policy.steer(..., seed=seed)`` gives the same samples.
        marker_responses: held-out responses on which each reward's marker effect is measured
            (:mod:`ric.marker_effects`; 0 = not measured). A reward whose Spearman is borrowed from a correlated
            reward shows there as a marker the model does not read.
    """

    def __init__(
        self,
        preferences: list[list[float]] | None = None,
        num_points: int | None = None,
        method: Literal["linear", "p_norm", "p_inf", "solver"] | None = None,
        p: float | None = None,
        unconditioned: bool = False,
        output_dir: str | None = None,
        reference: list[float] | None = None,
        sampling: dict[str, Any] | None = None,
        after_fit: bool = False,
        label: str = "RiC",
        samples_per_prompt: int = 1,
        seed: int = 0,
        marker_responses: int = 128,
        reward_range: str | None = None,
        range_quantiles: tuple[float, float] | None = None,
        r_min: float | list[float] | None = None,
        r_max: float | list[float] | None = None,
    ) -> None:
        moved_settings("PreferenceSweep", reward_range=reward_range, range_quantiles=range_quantiles,
                       r_min=r_min, r_max=r_max)  # fmt: skip
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        if marker_responses < 0:
            raise ValueError(f"marker_responses must be >= 0 (0 = not measured), got {marker_responses}")
        if num_points is not None and num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points}")
        if method is not None:
            check_mapping(method, 2.0 if p is None else p, None)
        elif p is not None:
            check_mapping("p_norm", p, None)
        if preferences is not None:
            if not preferences:
                raise ValueError("preferences is empty: give at least one, or leave it unset for the default grid")
            checked = [validate_preference(w) for w in preferences]
            if len({len(w) for w in checked}) > 1:
                raise ValueError(f"preferences {preferences} have different lengths")
        if reference is not None and not np.all(np.isfinite(np.asarray(reference, dtype=float))):
            raise ValueError(f"reference {reference} must be finite numbers")
        self.samples_per_prompt = samples_per_prompt
        self.preferences = preferences
        self.num_points = num_points
        self.method = method
        self.p = p
        self.unconditioned = unconditioned
        self.output_dir = output_dir
        self.reference = reference
        self.sampling = dict(sampling or {})
        self.after_fit = after_fit
        self.label = label
        self.seed = seed
        self.marker_responses = marker_responses
        self.last_metrics: dict[str, Any] | None = None
        self.front_csv: Path | None = None
        self._swept = False
        self._training: dict[str, Any] = {}
        self._carried: dict[str, Any] = {}
        self.reused_seconds = 0.0

    def check_rewards(self, reward_names: Sequence[str]) -> None:
        """Refuse preferences that do not fit the configured rewards (called when the config is parsed)."""
        if self.preferences is not None and not self.unconditioned:
            for w in self.preferences:
                validate_preference(w, num_rewards=len(reward_names))
        if self.reference is not None and len(self.reference) != len(reward_names):
            raise ValueError(
                f"reference {self.reference} has {len(self.reference)} values for {len(reward_names)} rewards "
                f"{list(reward_names)}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swept = False
        clear_stop()  # a stop request belongs to one run

    # ---- the cost ledger of the training, kept in checkpoints: a fit started from one adds to what it holds --
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # one top-level key, not callback state: two sweeps (a base-model one beside RiC's) hold the same ledger
        if self._training or self._carried:
            checkpoint[LEDGER_KEY] = self.ledger() if self._training else dict(self._carried)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fitting = trainer.state.fn == "fit"  # a test from a checkpoint trains nothing and carries nothing
        self._carried = dict(checkpoint.get(LEDGER_KEY, {})) if fitting else {}

    def ledger(self) -> dict[str, Any]:
        """The training so far: this process's part plus what its starting checkpoint carried.
        ``counted_from_step`` is where the count begins: 0, or a checkpoint written without a ledger."""
        ledger = {k: v for k, v in self._training.items() if not k.startswith("_")}
        if "_start" in self._training:
            ledger["train_seconds"] += time.perf_counter() - self._training["_start"]
            ledger["training_steps"] += self._training["_step"] - self._training["_first_step"]
        return ledger

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        zero = {"train_seconds": 0.0, "training_steps": 0, "training_tokens": 0, "training_examples": 0,
                "counted_from_step": trainer.global_step}  # fmt: skip
        self._training = {**zero, **self._carried, "_first_step": trainer.global_step, "_step": trainer.global_step,
                          "_start": time.perf_counter()}  # fmt: skip
        self._carried = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._training:
            self._training["_step"] = trainer.global_step
        if isinstance(batch, dict) and self._training:
            ids, mask = batch.get("input_ids"), batch.get("attention_mask")
            if mask is not None or ids is not None:  # tokens through the model (all of a packed row)
                self._training["training_tokens"] += int(mask.sum() if mask is not None else ids.numel())
            first = next((v for v in batch.values() if hasattr(v, "shape")), None)
            self._training["training_examples"] += int(first.shape[0]) if first is not None else 0

    def end_training(self, trainer: L.Trainer) -> None:
        if "_start" in self._training:
            self._training["_step"] = trainer.global_step
            self._training = self.ledger()
        elif self._carried:  # resumed from the final checkpoint: nothing trained here, all of it carried
            self._training, self._carried = self._carried, {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        clear_stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_end: by then the strategy's teardown has moved the model to the CPU
        if self.after_fit:
            self.end_training(trainer)
            for callback in trainer.checkpoint_callbacks:  # the final checkpoint first: a sweep can take hours
                callback.on_train_end(trainer, pl_module)
            self.run(trainer, pl_module)
            self._swept = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit with nothing left to train (resumed from its final checkpoint, or no training batches) ends
        without ``on_train_end``; sweep then, on the device the strategy had the model on."""
        if self.after_fit and not self._swept:
            self.end_training(trainer)
            log.warning("no training ran in this fit; running the preference sweep after teardown")
            pl_module.to(trainer.strategy.root_device)
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def resolve_preferences(self, reward_names: Sequence[str]) -> np.ndarray:
        n = len(reward_names)
        prefs = self.preferences if self.preferences is not None else default_preferences(n, self.num_points)
        return np.array([validate_preference(w, num_rewards=n) for w in prefs])

    def generate_all(
        self,
        policy: ConditionalPolicy,
        rewards: Sequence[RewardModel],
        prompts: Sequence[Any],
        desired: np.ndarray | None,
        settings: dict[str, Any],
        out: Path,
        fingerprint: str = "",
        preferences: np.ndarray | None = None,
    ) -> list[tuple[list[Any], np.ndarray]] | None:
        """``(stored samples, raw scores)`` per preference (row of ``desired``; ``None``: one unconditioned
        row). Every process generates and scores a contiguous share of the prompts, each preference from the
        sweep's seed, in one generation session; rank 0 gets everything back, the other ranks ``None``.

        Each finished preference is kept in ``out/.partial`` (samples stored under their final names), so a
        sweep stopped by a signal or a crash continues where it stopped; the seconds those took are added to
        ``self.reused_seconds``. ``fingerprint`` (the model's state) makes a changed model start afresh.
        ``preferences`` (rows like ``desired``): each row is generated inside ``policy.preference_context``
        (the weights a baseline trained or mixed for it)."""
        from tqdm.auto import tqdm

        rank, world = rank_and_world()
        share = contiguous_share(len(prompts), rank, world)
        rows = [None] if desired is None else list(desired)
        partial = out / ".partial"
        local = []
        for k, row in enumerate(tqdm(rows, desc="preference sweep", unit="pref", disable=rank != 0)):
            key = hashlib.sha256(
                json.dumps(
                    [fingerprint, world, self.seed, settings, None if row is None else row.tolist(),
                     [str(p) for p in prompts]],
                    default=str,
                ).encode()
            ).hexdigest()[:16]  # fmt: skip
            path = partial / f"pref{k:02d}-{key}.rank{rank}.json"
            if path.is_file():
                if rank == 0:
                    print(f"preference sweep: preference {k + 1} of {len(rows)} was finished before, reusing it")
                done = json.loads(path.read_text())
                raw = np.array(done["raw"], dtype=float).reshape(-1, len(rewards))
                self.reused_seconds += float(done.get("seconds", 0.0))  # the cost stays the first run's
                local.append((done["indices"], done["samples"], raw))
                continue
            targets = None if row is None else np.broadcast_to(row, (len(prompts), len(rewards)))
            context = contextlib.nullcontext() if preferences is None else policy.preference_context(preferences[k])
            started = time.perf_counter()
            with context:  # the rollout holds its own generation session (an adapter merged once per row)
                result = rollout(policy, prompts, targets, indices=share, settings=settings, rewards=rewards,
                                 seed=self.seed)  # fmt: skip
            stored = policy.store_samples(result.samples, out / "samples", [f"pref{k:02d}-{i:04d}" for i in share])
            partial.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            record = {"indices": share, "samples": stored, "raw": result.raw.tolist(),
                      "seconds": time.perf_counter() - started}  # fmt: skip
            tmp.write_text(json.dumps(record, default=str))
            tmp.replace(path)
            local.append((share, stored, result.raw))
        gathered = gather_to_first(local)
        if gathered is None:
            return None
        return [assemble([g[k] for g in gathered], len(prompts), len(rewards)) for k in range(len(rows))]

    def run(self, trainer: L.Trainer, policy: ConditionalPolicy) -> Path | None:
        dm = trainer.datamodule
        rewards: list[RewardModel] = dm.rewards
        space = policy.reward_space
        if space is None:
            raise RuntimeError("the policy has no reward space; run the DataModule setup first")
        names = list(space.reward_names)
        self.check_rewards(names)
        prompts = [p for p in dm.test_prompts for _ in range(self.samples_per_prompt)]
        if not prompts:
            raise ValueError("no held-out prompts to evaluate: set test_fraction > 0 or test_dataset")
        method = self.method or space.method
        p = space.p if self.p is None else self.p
        # a model without markers is one point, unless a preference selects its weights (the RL baselines)
        unconditioned = self.unconditioned or not (policy.conditioned or policy.weight_steered)
        if unconditioned:
            preferences = np.full((1, len(names)), np.nan)
            desired = np.full((1, len(names)), np.nan)
        else:
            preferences = self.resolve_preferences(names)
            desired = space.desired(preferences, method, p)
        from tqdm.auto import tqdm

        out = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "sweep"
        obtained, samples, generated = [], [], []
        settings = {**policy.sampling_defaults("evaluation"), **self.sampling}
        fingerprint = f"{type(policy).__qualname__}@{trainer.global_step}"
        start, self.reused_seconds = time.perf_counter(), 0.0
        results = self.generate_all(
            policy, rewards, prompts, None if unconditioned else desired, settings, out, fingerprint,
            preferences if policy.weight_steered and not unconditioned else None,
        )  # fmt: skip
        if results is None:  # not rank 0
            return None
        for k, (stored, raw) in enumerate(tqdm(results, desc="writing results", unit="pref", leave=False)):
            z = space.normalize(raw)
            obtained.append(z)
            generated.append(stored)
            for i, (prompt, response) in enumerate(zip(prompts, stored)):
                samples.append(
                    {
                        "prompt": prompt,
                        "preference": None if unconditioned else preferences[k].tolist(),
                        "desired": None if unconditioned else desired[k].tolist(),
                        "response": response if isinstance(response, str) else str(response),
                        "scores": dict(zip(names, z[i].tolist())),
                        "raw_scores": dict(zip(names, raw[i].tolist())),
                    }
                )
        meta = {
            "label": self.label,
            "mapping_method": None if unconditioned else method,
            "p": p if method in ("p_norm", "solver") else None,
            "unconditioned": unconditioned,
            "reward_space": space.to_dict(),
            "sampling": settings,
            "seed": self.seed,
            "reward_range": space.range_source,
            "r_min": space.r_min.tolist(),
            "r_max": space.r_max.tolist(),
            "samples_per_prompt": self.samples_per_prompt,
            "cost": {
                **self.ledger(),
                "sweep_seconds": time.perf_counter() - start + self.reused_seconds,
                "generated_samples_sweep": len(prompts) * len(results),
                "reward_calls_sweep": len(prompts) * len(results) * len(rewards),
            },
        }
        # (rank 0 alone: not where a forward pass gathers weight shards from every rank)
        if not unconditioned and policy.conditioned and not sharded_weights(trainer):
            try:
                effects = self.read_markers(policy, dm)
            except Exception as error:  # a check added to the sweep must not lose the sweep's results
                log.warning("marker effects not measured: %s: %s", type(error).__name__, error)
                effects = None
            if effects is not None:
                meta["marker_effects"] = effects
        train_scores = getattr(dm, "train_scores", np.zeros((0, len(names))))
        if len(train_scores) > 2 and len(names) > 1:
            meta["train_reward_correlation"] = np.corrcoef(train_scores, rowvar=False).tolist()
        self.last_metrics = write_front(
            out, names, preferences, desired, obtained, samples, meta, self.reference, self.label
        )
        gallery = policy.save_gallery(prompts, preferences, generated, out)
        if gallery is not None:
            print(f"samples per prompt and preference: {gallery}")
        means = np.array([o.mean(axis=0) for o in obtained])
        print(format_table(names, preferences, desired, means))
        for key, value in self.last_metrics.get("steering", {}).items():
            print(
                f"steering {key}: Spearman(w_{key}, obtained {key}) = {value['spearman']:+.2f}, spread ratio "
                f"{value['spread_ratio']:.2f} (obtained range / desired range)"
            )
        for key, value in self.last_metrics.get("marker_effects", {}).get("rewards", {}).items():
            print(
                f"marker effect {key}: {value['nats_mean']:+.2f} +- {value['nats_sem']:.2f} nats lost by a held-out "
                f"response when only this marker moves (0 = the model ignores it)"
            )
        if "train_reward_correlation" in self.last_metrics:
            corr = np.asarray(self.last_metrics["train_reward_correlation"])
            pairs = [
                f"{names[i]}/{names[j]} {corr[i, j]:+.2f}" for i in range(len(names)) for j in range(i + 1, len(names))
            ]
            print("Pearson correlation of the rewards on the training data: " + ", ".join(pairs))
        print(f"hypervolume {self.last_metrics['hypervolume']:.4f} (reference {self.last_metrics['reference_point']})")
        shutil.rmtree(out / ".partial", ignore_errors=True)  # the sweep is complete: nothing to continue
        self.front_csv = (out / "front.csv").resolve()
        print(self.front_csv, flush=True)
        if not unconditioned:
            self.print_next_step(trainer)
        return self.front_csv

    def read_markers(self, policy: ConditionalPolicy, dm: Any) -> dict[str, Any] | None:
        """:func:`ric.marker_effects.marker_effects` on up to ``marker_responses`` held-out responses that fit the
        policy; ``None`` where there are none or the policy gives no likelihood (diffusion)."""
        from ric.marker_effects import marker_effects

        if type(policy).log_likelihood is ConditionalPolicy.log_likelihood:  # (diffusion: no likelihood)
            return None
        blank = np.zeros(len(dm.rewards))
        records = [r for r in getattr(dm, "test_records", [])
                   if policy.accepts(policy.training_prompt(r["prompt"], blank), r["response"])]  # fmt: skip
        records = records[: self.marker_responses]
        if len(records) < 2:
            return None
        z = policy.reward_space.normalize(dm.cache.scores(dm.rewards, records, progress=False))
        effects = marker_effects(policy, [r["prompt"] for r in records], [r["response"] for r in records], z)
        return {"responses": len(records), "rewards": effects}

    def print_next_step(self, trainer: L.Trainer) -> None:
        """After a fit, the command that steers the model just trained."""
        ckpt = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks), None)
        if not ckpt:
            return
        script = Path(sys.executable).with_name("ric")
        command = shlex.quote(_relative(script)) if script.is_file() else "ric"
        print(
            f"steer it: {command} generate {shlex.quote(_relative(Path(ckpt)))} --preference "
            f'{",".join(["1"] + ["0"] * (len(trainer.datamodule.rewards) - 1))} --prompt "..."',
            flush=True,
        )


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)

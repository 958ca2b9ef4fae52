"""Preference sweep: map each preference to desired rewards, generate, score, and write the front.

Outputs in one folder: ``front.csv`` (one row per preference), ``samples.jsonl``, ``front.png`` and
``metrics.json`` (hypervolume, its reference point, the mapping method and the normalization used).
Obtained rewards are reported in the same normalized units as the desired rewards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ric.distributed import even_share, gather_to_first, rank_and_world, seed_for_rank
from ric.interfaces import ConditionalPolicy, RewardModel, score_all
from ric.mapping import RewardRange, default_reward_range, desired_rewards, validate_preference
from ric.pareto import hypervolume, plot_fronts

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
    steer = {}
    if len(preferences) > 2 and np.all(np.isfinite(preferences)):
        from scipy.stats import spearmanr

        for d, name in enumerate(reward_names):
            if np.ptp(preferences[:, d]) > 0:
                steer[name] = float(spearmanr(preferences[:, d], means[:, d]).statistic)
    metrics = {
        "hypervolume": hypervolume(means, ref),
        "steerability": steer,
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
    return metrics


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


@contextlib.contextmanager
def own_random_stream(world: int) -> Iterator[None]:
    """With several processes, sample from a random stream of this rank's own (ranks start from one seed),
    restoring the global generators afterwards; a single process keeps its stream as it is."""
    if world == 1:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed_for_rank(torch.initial_seed()))
        yield


class PreferenceSweep(L.Callback):
    """Evaluates a policy across preferences on the DataModule's held-out prompts.

    Runs after ``test`` (``python -m ric.cli test --ckpt_path ...``) and, with ``after_fit: true``, at the
    end of ``fit``. Every process generates and scores its share of the prompts; rank 0 writes the results.

    Args:
        preferences: explicit list of preferences; default: 11 points for 2 rewards, the paper's 13 triples
            for 3 (or ``num_points`` per axis).
        num_points: number of ``w_1`` values for 2 rewards.
        method, p: the preference-to-reward mapping (recorded in metrics.json).
        unconditioned: evaluate without reward markers (base model / plain SFT baseline): one row.
        output_dir: result folder (default: ``<log_dir>/sweep``).
        reference: hypervolume reference point (default: ``r_min`` of the mapping in every dimension).
        sampling: generation overrides (default: the policy's evaluation settings, e.g. temperature 1.0, top_p 0.9
            for text as in the paper).
        after_fit: also run at the end of ``fit``.
        reward_range: ``normal`` (the paper: expected extremes of 50,000 standard-normal draws, about
            +-4.23) or ``data`` (the ``range_quantiles`` of the normalized training scores, default min and
            max); ``r_min`` / ``r_max`` (scalars or per-reward lists) override either.
        samples_per_prompt: responses generated per prompt and preference (more = less noisy means).
    """

    def __init__(
        self,
        preferences: list[list[float]] | None = None,
        num_points: int | None = None,
        method: str = "p_inf",
        p: float = 2.0,
        unconditioned: bool = False,
        output_dir: str | None = None,
        reference: list[float] | None = None,
        sampling: dict[str, Any] | None = None,
        after_fit: bool = False,
        label: str = "RiC",
        reward_range: str = "normal",
        r_min: float | list[float] | None = None,
        r_max: float | list[float] | None = None,
        samples_per_prompt: int = 1,
        range_quantiles: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.range = RewardRange(reward_range, tuple(range_quantiles), r_min, r_max)
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
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
        self.last_metrics: dict[str, Any] | None = None
        self.front_csv: Path | None = None
        self._swept = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swept = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_end: by then the strategy's teardown has moved the model to the CPU
        if self.after_fit:
            for callback in trainer.checkpoint_callbacks:  # the final checkpoint first: a sweep can take hours
                callback.on_train_end(trainer, pl_module)
            self.run(trainer, pl_module)
            self._swept = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit with nothing left to train (resumed from its final checkpoint, or no training batches) ends
        without ``on_train_end``; sweep then, on the device the strategy had the model on."""
        if self.after_fit and not self._swept:
            log.warning("no training ran in this fit; running the preference sweep after teardown")
            pl_module.to(trainer.strategy.root_device)
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def resolve_preferences(self, reward_names: Sequence[str]) -> np.ndarray:
        n = len(reward_names)
        prefs = self.preferences if self.preferences is not None else default_preferences(n, self.num_points)
        return np.array([validate_preference(w, num_rewards=n) for w in prefs])

    @staticmethod
    def generate_all(
        policy: ConditionalPolicy,
        rewards: Sequence[RewardModel],
        prompts: Sequence[Any],
        desired: np.ndarray | None,
        settings: dict[str, Any],
    ) -> list[tuple[list[Any], np.ndarray]] | None:
        """``(samples, raw scores)`` per preference (row of ``desired``; ``None``: one unconditioned row).
        Every process generates and scores an equal, contiguous share of the prompts in one generation
        session, from its own random stream; rank 0 gets everything back, the other ranks ``None``."""
        from tqdm.auto import tqdm

        rank, world = rank_and_world()
        share, real = even_share(len(prompts), rank, world)  # equal counts: sharded weights need lockstep
        rows = [None] if desired is None else list(desired)
        mine = [prompts[i] for i in share]
        local = []
        with policy.generation_session(), own_random_stream(world):
            for row in tqdm(rows, desc="preference sweep", unit="pref", disable=rank != 0):
                target = None if row is None else np.broadcast_to(row, (len(share), len(rewards)))
                samples = policy.generate(mine, target, **settings)[:real]
                local.append((share[:real], samples, score_all(rewards, mine[:real], samples)))
        gathered = gather_to_first(local)
        if gathered is None:
            return None
        return [assemble([g[k] for g in gathered], len(prompts), len(rewards)) for k in range(len(rows))]

    def bounds(self, dm: Any, num_rewards: int) -> tuple[np.ndarray, np.ndarray]:
        """``(r_min, r_max)`` per reward in normalized units."""
        scores = getattr(dm, "train_scores", None)
        normalized = dm.normalizer.transform(scores) if scores is not None and len(scores) else None
        return self.range.bounds(num_rewards, normalized)

    def run(self, trainer: L.Trainer, policy: ConditionalPolicy) -> Path | None:
        dm = trainer.datamodule
        rewards: list[RewardModel] = dm.rewards
        names = [r.name for r in rewards]
        prompts = [p for p in dm.test_prompts for _ in range(self.samples_per_prompt)]
        if not prompts:
            raise ValueError("no held-out prompts to evaluate: set test_fraction > 0 or test_dataset")
        if policy.normalizer is None:
            raise RuntimeError("the policy has no normalization statistics; run the DataModule setup first")
        if self.unconditioned:
            preferences = np.full((1, len(names)), np.nan)
            desired = np.full((1, len(names)), np.nan)
        else:
            preferences = self.resolve_preferences(names)
            lo, hi = self.bounds(dm, len(names))
            desired = np.array([desired_rewards(w, self.method, p=self.p, r_min=lo, r_max=hi) for w in preferences])
        from tqdm.auto import tqdm

        out = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "sweep"
        obtained, samples, generated = [], [], []
        settings = {**policy.sampling_defaults("evaluation"), **self.sampling}
        results = self.generate_all(policy, rewards, prompts, None if self.unconditioned else desired, settings)
        if results is None:  # not rank 0
            return None
        for k, (responses, raw) in enumerate(tqdm(results, desc="writing results", unit="pref", leave=False)):
            z = policy.normalizer.transform(raw)
            obtained.append(z)
            generated.append(responses)
            stored = policy.store_samples(
                responses, out / "samples", [f"pref{k:02d}-{i:04d}" for i in range(len(prompts))]
            )
            for i, (prompt, response) in enumerate(zip(prompts, stored)):
                samples.append(
                    {
                        "prompt": prompt,
                        "preference": None if self.unconditioned else preferences[k].tolist(),
                        "desired": None if self.unconditioned else desired[k].tolist(),
                        "response": response if isinstance(response, str) else str(response),
                        "scores": dict(zip(names, z[i].tolist())),
                        "raw_scores": dict(zip(names, raw[i].tolist())),
                    }
                )
        meta = {
            "mapping_method": None if self.unconditioned else self.method,
            "p": self.p if self.method in ("p_norm", "solver") else None,
            "unconditioned": self.unconditioned,
            "normalization": policy.normalizer.to_dict(),
            "sampling": settings,
            "reward_range": self.range.kind,
            "r_min": None if self.unconditioned else lo.tolist(),
            "r_max": None if self.unconditioned else hi.tolist(),
            "samples_per_prompt": self.samples_per_prompt,
        }
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
        for key, value in self.last_metrics.get("steerability", {}).items():
            print(f"Spearman(w_{key}, obtained {key}) = {value:+.2f}")
        if "train_reward_correlation" in self.last_metrics:
            corr = np.asarray(self.last_metrics["train_reward_correlation"])
            pairs = [
                f"{names[i]}/{names[j]} {corr[i, j]:+.2f}" for i in range(len(names)) for j in range(i + 1, len(names))
            ]
            print("Pearson correlation of the rewards on the training data: " + ", ".join(pairs))
        print(f"hypervolume {self.last_metrics['hypervolume']:.4f} (reference {self.last_metrics['reference_point']})")
        self.front_csv = (out / "front.csv").resolve()
        print(self.front_csv, flush=True)
        return self.front_csv

"""The preference sweep as a Lightning callback: after ``ric test`` (and, with ``after_fit``, at the end of a fit)
it sweeps the DataModule's held-out prompts (:func:`ric.sweep.run_sweep`), writes the report
(:mod:`ric.report`) with the training's cost (:class:`ric.cost.TrainingCost`), and prints the front.

Outputs in one folder: ``front.csv`` (one row per preference), ``samples.jsonl``, ``front.png``,
``steering.png`` and ``metrics.json`` (hypervolume, its reference point, the mapping and the normalization).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np

from ric.commands import steer_hint
from ric.cost import TrainingCost
from ric.distributed import attached_trainer, sharded_weights
from ric.interfaces import ConditionalPolicy
from ric.mapping import check_mapping, validate_preference
from ric.report import print_report, write_front
from ric.signals import clear_stop
from ric.space import RangeSettingsMoved, check_preference
from ric.sweep import default_preferences, run_sweep

log = logging.getLogger(__name__)

#: the label of a sweep that names none
DEFAULT_LABEL = "RiC"


class PreferenceSweep(RangeSettingsMoved, L.Callback):
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
        label: the run's name in plots, ``metrics.json`` and ``ric compare``.
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
        label: str = DEFAULT_LABEL,
        samples_per_prompt: int = 1,
        seed: int = 0,
        marker_responses: int = 128,
        **moved: Any,
    ) -> None:
        super().__init__(**moved)
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

    def check_rewards(self, reward_names: Sequence[str]) -> None:
        """Refuse preferences that do not fit the configured rewards (called when the config is parsed)."""
        if self.preferences is not None and not self.unconditioned:
            for w in self.preferences:
                check_preference(w, reward_names)
        if self.reference is not None and len(self.reference) != len(reward_names):
            raise ValueError(
                f"reference {self.reference} has {len(self.reference)} values for {len(reward_names)} rewards "
                f"{list(reward_names)}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        TrainingCost.of(trainer)  # the report carries the training's cost

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swept = False
        clear_stop()  # a stop request belongs to one run

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        clear_stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_end: by then the strategy's teardown has moved the model to the CPU
        if self.after_fit:
            TrainingCost.of(trainer).finish(trainer)
            save_final_checkpoints(trainer, pl_module)
            self.run(trainer, pl_module)
            self._swept = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit with nothing left to train (resumed from its final checkpoint, or no training batches) ends
        without ``on_train_end``; sweep then, on the device the strategy had the model on."""
        if self.after_fit and not self._swept:
            TrainingCost.of(trainer).finish(trainer)
            log.warning("no training ran in this fit; running the preference sweep after teardown")
            pl_module.to(trainer.strategy.root_device)
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def resolve_preferences(self, reward_names: Sequence[str]) -> np.ndarray:
        n = len(reward_names)
        prefs = self.preferences if self.preferences is not None else default_preferences(n, self.num_points)
        return np.array([check_preference(w, reward_names) for w in prefs])

    def run(self, trainer: L.Trainer, policy: ConditionalPolicy) -> Path | None:
        """The sweep of a fit or test: the report goes to ``output_dir`` (default ``<log_dir>/sweep``)."""
        out = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "sweep"
        ckpt = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks), None)
        return self.evaluate(
            policy, trainer.datamodule, out, training_cost=TrainingCost.of(trainer).ledger(),
            fingerprint=f"{type(policy).__qualname__}@{trainer.global_step}", checkpoint=ckpt or None,
        )  # fmt: skip

    def evaluate(
        self,
        policy: ConditionalPolicy,
        data: Any,
        output_dir: str | Path,
        *,
        training_cost: dict[str, Any] | None = None,
        label: str | None = None,
        preferences: Sequence[Sequence[float]] | None = None,
        fingerprint: str = "",
        checkpoint: str | None = None,
    ) -> Path | None:
        """Sweep ``policy`` on ``data``'s held-out prompts with these settings and write the report in
        ``output_dir``; returns its ``front.csv`` on rank 0 (``None`` elsewhere). ``training_cost`` goes into
        ``metrics.json``'s ``cost``; ``label`` and ``preferences`` replace the configured ones for this call;
        ``checkpoint`` is what the printed "steer it" command names."""
        space = policy.reward_space
        if space is None:
            raise RuntimeError("the policy has no reward space; run the DataModule setup first")
        names = list(space.reward_names)
        self.check_rewards(names)
        prompts = [p for p in data.test_prompts for _ in range(self.samples_per_prompt)]
        unconditioned = self.unconditioned or not policy.steerable
        if unconditioned:
            prefs = None
        else:
            prefs = self.resolve_preferences(names) if preferences is None else np.asarray(preferences, dtype=float)
        result = run_sweep(policy, data.rewards, prompts, prefs, output_dir, method=self.method, p=self.p,
                           settings=self.sampling, seed=self.seed, fingerprint=fingerprint)  # fmt: skip
        if result is None:  # not rank 0
            return None
        label = label or self.label
        meta = {
            "label": label,
            "mapping_method": result.method,
            "p": result.p,
            "unconditioned": unconditioned,
            "reward_space": space.to_dict(),
            "sampling": result.settings,
            "seed": self.seed,
            "reward_range": space.range_source,
            "r_min": space.r_min.tolist(),
            "r_max": space.r_max.tolist(),
            "samples_per_prompt": self.samples_per_prompt,
            "cost": {
                **(training_cost or {}),
                "sweep_seconds": result.seconds,
                "generated_samples_sweep": len(prompts) * len(result.samples),
                "reward_calls_sweep": len(prompts) * len(result.samples) * len(names),
            },
        }
        # (rank 0 alone: not where a forward pass gathers weight shards from every rank)
        if not unconditioned and policy.conditioned and not sharded_weights(attached_trainer(policy)):
            try:
                effects = self.read_markers(policy, data)
            except Exception as error:  # a check added to the sweep must not lose the sweep's results
                log.warning("marker effects not measured: %s: %s", type(error).__name__, error)
                effects = None
            if effects is not None:
                meta["marker_effects"] = effects
        train_scores = getattr(data, "train_scores", np.zeros((0, len(names))))
        if len(train_scores) > 2 and len(names) > 1:
            meta["train_reward_correlation"] = np.corrcoef(train_scores, rowvar=False).tolist()
        out = Path(output_dir)
        self.last_metrics = write_front(out, names, result.preferences, result.desired, result.obtained,
                                        result.records(), meta, self.reference, label)  # fmt: skip
        gallery = policy.save_gallery(prompts, result.preferences, result.samples, out)
        if gallery is not None:
            print(f"samples per prompt and preference: {gallery}")
        print_report(self.last_metrics, names, result.preferences, result.desired, result.means)
        shutil.rmtree(out / ".partial", ignore_errors=True)  # the sweep is complete: nothing to continue
        self.front_csv = (out / "front.csv").resolve()
        print(self.front_csv, flush=True)
        if checkpoint and not unconditioned:
            print(steer_hint(Path(checkpoint), len(names)), flush=True)
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


def save_final_checkpoints(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Write the fit's final checkpoints now, before a sweep that can take hours: Lightning runs checkpoint
    callbacks' ``on_train_end`` after every other callback's, so a sweep killed midway would lose them (their
    own call later finds the step saved and does nothing)."""
    for callback in trainer.checkpoint_callbacks:
        callback.on_train_end(trainer, pl_module)

"""RiC's online stage (paper section 3.2) as a Lightning callback, modality-agnostic.

After ``offline_steps`` of conditioned SFT, each of ``iterations`` rounds: sample prompts from the training
set -> targets near the Pareto front (MORS target sampler) -> generate -> score -> relabel each sample with
the rewards it obtained -> MORS filter (thresholds from this round's scores) -> add MORS-filtered original
data (``original_ratio`` x the buffer) -> fine-tune ``steps_per_iteration`` steps at a constant learning
rate. The buffer accumulates across rounds.

Nothing is lost and nothing is redone: generated samples are appended to JSONL files as they are scored
(one file per rank and round), the round and its MORS results live in the callback state inside every
checkpoint, and ``fit --ckpt_path last`` continues a round where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from ric.cost import TrainingCost
from ric.data import prompt_key, read_jsonl
from ric.distributed import rank_and_world
from ric.interfaces import ConditionalPolicy
from ric.mors import mors_keep_mask, mors_thresholds, sample_original, sample_targets
from ric.rollout import rollout
from ric.signals import StopRequested, clear_stop
from ric.space import RangeSettingsMoved

log = logging.getLogger(__name__)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a buffer file (none if it does not exist yet); a torn last line (a kill mid-write) is dropped."""
    return read_jsonl(path, torn_tail=True) if path.is_file() else []


class OnlineLoop(RangeSettingsMoved, L.Callback):
    """The online iterations of RiC, configured in YAML like any callback.

    Args:
        iterations: number of online rounds K (paper: 2).
        offline_steps: steps of the offline stage; default: ``trainer.max_steps`` as configured (the
            callback then extends ``max_steps`` by ``iterations * steps_per_iteration``).
        steps_per_iteration: fine-tuning steps per round (paper: 4,000).
        prompts_per_iteration: generations per round (paper: 20,000), drawn with replacement from the
            training prompts.
        learning_rate: constant learning rate of the online rounds (paper: 1e-5).
        quantile, inclusive: MORS threshold quantile (0.7) and whether ties are kept.
        original_ratio: MORS-filtered original samples mixed in, as a share of the online buffer (0.5).
        target_variant: ``paper`` or ``authors`` target sampling (see :func:`ric.mors.sample_targets`);
            targets lie in the reward space's range.
        sampling: generation overrides (default: the policy's online settings, e.g. temperature 0.7, top_p 0.9
            for text).
        chunk_size: samples generated and scored between two appends to the buffer file.
        buffer_dir: where the buffer lives (default ``<log_dir>/online``).
        seed: the rounds' prompts and targets.
    """

    def __init__(
        self,
        iterations: int = 2,
        offline_steps: int | None = None,
        steps_per_iteration: int = 4000,
        prompts_per_iteration: int = 20000,
        learning_rate: float = 1e-5,
        quantile: float = 0.7,
        inclusive: bool = False,
        original_ratio: float = 0.5,
        target_variant: Literal["paper", "authors"] = "paper",
        sampling: dict[str, Any] | None = None,
        chunk_size: int = 64,
        buffer_dir: str | None = None,
        seed: int = 0,
        **moved: Any,
    ) -> None:
        super().__init__(**moved)
        for key, value, low in (
            ("iterations", iterations, 0),
            ("steps_per_iteration", steps_per_iteration, 1),
            ("prompts_per_iteration", prompts_per_iteration, 1),
            ("chunk_size", chunk_size, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"OnlineLoop.{key} must be an integer >= {low}, got {value!r}")
        if offline_steps is not None and offline_steps < 0:
            raise ValueError(
                f"OnlineLoop.offline_steps must be >= 0 (or null for trainer.max_steps), got {offline_steps}"
            )
        if target_variant not in ("paper", "authors"):
            raise ValueError(f"OnlineLoop.target_variant must be 'paper' or 'authors', got {target_variant!r}")
        if not 0 <= quantile <= 1:
            raise ValueError(f"OnlineLoop.quantile must be in [0, 1], got {quantile}")
        if not original_ratio >= 0:
            raise ValueError(
                f"OnlineLoop.original_ratio must be >= 0 (a share of the online buffer), got {original_ratio}"
            )
        if not learning_rate > 0:
            raise ValueError(f"OnlineLoop.learning_rate must be > 0, got {learning_rate}")
        self.iterations = iterations
        self.offline_steps = offline_steps
        self.steps_per_iteration = steps_per_iteration
        self.prompts_per_iteration = prompts_per_iteration
        self.learning_rate = learning_rate
        self.quantile = quantile
        self.inclusive = inclusive
        self.original_ratio = original_ratio
        self.target_variant = target_variant
        self.sampling = dict(sampling or {})
        self.chunk_size = chunk_size
        self.buffer_dir = buffer_dir
        self.seed = seed
        # state saved in checkpoints
        self.phase = 0  # number of finished generation rounds
        self.summaries: list[dict[str, Any]] = []
        # rows of an unfinished round whose generation time the checkpoint's cost ledger already holds
        self.rows_in_ledger: dict[str, int] = {}
        self._resolved_offline: int | None = None
        self._phase_started = time.perf_counter()

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "summaries": self.summaries, "offline_steps": self._resolved_offline,
                "rows_in_ledger": self.rows_in_ledger}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = int(state_dict.get("phase", 0))
        self.summaries = list(state_dict.get("summaries", []))
        self._resolved_offline = state_dict.get("offline_steps")
        self.rows_in_ledger = dict(state_dict.get("rows_in_ledger", {}))

    # ---- schedule -------------------------------------------------------------------------------
    def boundaries(self) -> list[int]:
        """Global steps at which each round's generation happens."""
        return [self._resolved_offline + i * self.steps_per_iteration for i in range(self.iterations)]

    def batches_left_in_pass(self, trainer: L.Trainer, batches_done: int) -> int | None:
        """Batches left in the running pass (for the progress bar): the next round replaces the pool at its step,
        after the batch already drawn from this pass, which still trains. ``None`` once every round has run."""
        if self._resolved_offline is None or self.iterations == 0:
            return None
        bounds, step = self.boundaries(), trainer.global_step
        if self.phase > 0 and bounds[self.phase - 1] == step:
            return 1  # this step's round has run (a resume at a round, with this hook first): its batch ends the pass
        if self.phase >= self.iterations:
            return None
        return max(bounds[self.phase] - step, 0) * trainer.accumulate_grad_batches + 1

    def folder(self, trainer: L.Trainer) -> Path:
        return (
            Path(self.buffer_dir) if self.buffer_dir else Path(trainer.log_dir or trainer.default_root_dir) / "online"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        clear_stop()  # a stop request belongs to one run
        if not isinstance(pl_module, ConditionalPolicy):
            raise TypeError("OnlineLoop needs a ConditionalPolicy")
        if self._resolved_offline is None:
            offline = self.offline_steps if self.offline_steps is not None else trainer.max_steps
            if offline is None or offline < 0:
                raise ValueError("OnlineLoop needs trainer.max_steps (the offline steps) or offline_steps to be set")
            self._resolved_offline = int(offline)
        trainer.fit_loop.epoch_loop.max_steps = self._resolved_offline + self.iterations * self.steps_per_iteration

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a resume inside the online stage: the data pool and the constant learning rate come back
        if self.phase > 0:
            self.install_pool(trainer, pl_module, self.phase)
            self.constant_lr(trainer)
        self._phase_started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        bounds = self.boundaries()
        while self.phase < self.iterations and trainer.global_step >= bounds[self.phase]:
            train_time = time.perf_counter() - self._phase_started
            self.run_round(trainer, pl_module, self.phase, train_time)

    # ---- one round ------------------------------------------------------------------------------
    def round_plan(self, trainer: L.Trainer, round_idx: int) -> tuple[list[Any], np.ndarray]:
        """Prompts and targets of a round: a pure function of the seed, so a resume draws the same."""
        dm = trainer.datamodule
        prompts = list(dict.fromkeys(prompt_key(r["prompt"]) for r in dm.train_records))
        rng = np.random.default_rng([self.seed, round_idx])
        idx = rng.integers(0, len(prompts), size=self.prompts_per_iteration)
        space = dm.space
        targets = sample_targets(
            self.prompts_per_iteration, space.r_min, space.r_max, variant=self.target_variant, rng=rng
        )
        return [json.loads(prompts[i]) for i in idx], targets

    def generate_shard(self, trainer: L.Trainer, policy: ConditionalPolicy, round_idx: int) -> int:
        """Generate and score this rank's share of the round, appending each chunk to its buffer file as it is
        scored (flushed and fsynced, so a kill loses nothing finished); returns the number of new samples."""
        rank, world = rank_and_world()
        dm = trainer.datamodule
        prompts, targets = self.round_plan(trainer, round_idx)
        path = self.folder(trainer) / f"round{round_idx}" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_rows(path)
        done = {row["index"] for row in rows}
        if path.is_file():  # rewrite without a torn tail, so appends start on a clean line
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        # the samples a killed process left carry the seconds they took, which no checkpoint's ledger holds
        counted = self.rows_in_ledger.get(f"{round_idx}/{rank}", 0)
        carried = sum(float(r.get("seconds", 0.0)) for r in rows[counted:])
        for callback in trainer.callbacks:
            if isinstance(callback, TrainingCost) and carried:
                callback.add_seconds(carried)
        todo = [k for k in range(rank, self.prompts_per_iteration, world) if k not in done]
        made = 0
        last = time.perf_counter()
        with path.open("a", encoding="utf-8") as fh:

            def append(chunk: list[int], responses: list[Any], raw: np.ndarray | None) -> None:
                nonlocal made, last
                # images etc. are written to files before their rows, so a row never points at nothing
                stored = policy.store_samples(responses, path.parent / "samples", [f"{k:07d}" for k in chunk])
                now = time.perf_counter()
                share = (now - last) / len(chunk)  # the chunk's generation and scoring, per sample
                last = now
                for j, k in enumerate(chunk):
                    row = {"index": k, "prompt": prompts[k], "response": stored[j], "target": targets[k].tolist(),
                           "raw": raw[j].tolist(), "seconds": share}  # fmt: skip
                    fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                made += len(chunk)

            rollout(
                policy,
                prompts,
                targets,
                indices=todo,
                settings={**policy.sampling_defaults("online"), **self.sampling},
                rewards=dm.rewards,
                chunk_size=self.chunk_size,
                on_chunk=append,
                progress=f"online round {round_idx + 1} generation",
            )
        return made

    def round_rows(self, trainer: L.Trainer, round_idx: int) -> list[dict[str, Any]]:
        """Every rank's samples of a round, each index once, in index order."""
        folder = self.folder(trainer) / f"round{round_idx}"
        rows: dict[int, dict[str, Any]] = {}
        for path in sorted(folder.glob("rank*.jsonl")):
            for row in read_rows(path):
                rows.setdefault(int(row["index"]), row)
        return [rows[k] for k in sorted(rows)]

    def select(self, trainer: L.Trainer, round_idx: int) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """MORS on a round: kept rows, their normalized scores, and the thresholds."""
        dm = trainer.datamodule
        rows = self.round_rows(trainer, round_idx)
        if not rows:
            raise RuntimeError(f"online round {round_idx + 1} produced no samples")
        z = dm.space.normalize(np.array([r["raw"] for r in rows], dtype=float))
        thresholds = mors_thresholds(z, self.quantile)
        keep = mors_keep_mask(z, thresholds, self.inclusive)
        if not keep.any():
            # all samples tie at the thresholds: nothing tells them apart, so none is rejected
            log.warning("online round %d: every sample ties at the MORS thresholds; keeping all", round_idx + 1)
            keep[:] = True
        return [r for r, k in zip(rows, keep) if k], z[keep], thresholds

    def install_pool(self, trainer: L.Trainer, policy: ConditionalPolicy, rounds: int) -> tuple[int, int]:
        """Give the DataModule the buffer of rounds ``< rounds`` plus MORS-filtered original data."""
        dm = trainer.datamodule
        records, scores = [], []
        for i in range(rounds):
            kept, z, _ = self.select(trainer, i)
            records += [{"prompt": r["prompt"], "response": r["response"]} for r in kept]
            scores.append(z)
        online_scores = np.vstack(scores)
        z_orig = dm.space.normalize(dm.train_scores)
        rng = np.random.default_rng([self.seed, rounds, 7])
        pick = sample_original(z_orig, len(records), self.original_ratio, self.quantile, self.inclusive, rng=rng)
        if len(pick) == 0 and self.original_ratio > 0:
            # the original data ties at its thresholds (e.g. rounded rewards): sample it unfiltered
            want = min(len(z_orig), int(round(self.original_ratio * len(records))))
            pick = np.sort(rng.choice(len(z_orig), size=want, replace=False))
        records += [dm.train_records[i] for i in pick]
        dm.set_train_pool(records, np.vstack([online_scores, z_orig[pick]]), normalized=True, version=rounds)
        return len(records) - len(pick), len(pick)

    def constant_lr(self, trainer: L.Trainer) -> None:
        for config in trainer.lr_scheduler_configs:
            for group in config.scheduler.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = self.learning_rate
            config.scheduler = torch.optim.lr_scheduler.LambdaLR(config.scheduler.optimizer, lambda _: 1.0)
        if not trainer.lr_scheduler_configs:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate

    def run_round(self, trainer: L.Trainer, policy: ConditionalPolicy, round_idx: int, train_time: float) -> None:
        started = time.perf_counter()
        try:
            made = self.generate_shard(trainer, policy, round_idx)
        except StopRequested as stop:
            rank = rank_and_world()[0]
            own = self.folder(trainer) / f"round{round_idx}" / f"rank{rank}.jsonl"
            self.rows_in_ledger[f"{round_idx}/{rank}"] = len(read_rows(own))  # this process's time is in the ledger
            where = save_for_resume(trainer)
            rows = len(self.round_rows(trainer, round_idx))
            resume = (
                f"checkpoint {where}; continue with --ckpt_path last" if where else "continue from the last checkpoint"
            )
            total, folder = self.prompts_per_iteration, self.folder(trainer) / f"round{round_idx}"
            print(f"stopped by {stop.name} during online round {round_idx + 1}: {rows} of {total} samples are kept "
                  f"in {folder}; {resume}", flush=True)  # fmt: skip
            raise
        trainer.strategy.barrier("ric-online-generation")
        gen_time = time.perf_counter() - started
        kept, z, thresholds = self.select(trainer, round_idx)
        total = len(self.round_rows(trainer, round_idx))
        online, original = self.install_pool(trainer, policy, round_idx + 1)
        self.constant_lr(trainer)
        names = [r.name for r in trainer.datamodule.rewards]
        summary = {
            "round": round_idx + 1,
            "generated": total,
            "generated_this_run": made,
            "kept_by_mors": len(kept),
            "thresholds": dict(zip(names, thresholds.tolist())),
            "mean_obtained": dict(zip(names, np.mean(z, axis=0).tolist())) if len(z) else {},
            "buffer_online": online,
            "buffer_original": original,
            "left_out_cut": trainer.datamodule.cut_examples["train"],
            "seconds_generating": gen_time,
            "seconds_generating_all_runs": sum(
                float(r.get("seconds", 0.0)) for r in self.round_rows(trainer, round_idx)
            ),
            "seconds_training_before": train_time,
            "global_step": trainer.global_step,
        }
        self.summaries.append(summary)
        self.phase = round_idx + 1
        if trainer.is_global_zero:
            (self.folder(trainer) / f"round{round_idx}" / "summary.json").write_text(json.dumps(summary, indent=2))
            print(
                f"online round {round_idx + 1}: generated {total}, kept {len(kept)} by MORS, buffer "
                f"{online} online + {original} original ({summary['left_out_cut']} left out, longer than a "
                f"training row), {gen_time:.1f}s generating, {train_time:.1f}s training"
            )
        metrics = {f"online/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        metrics.update({f"online/mean_{n}": v for n, v in summary["mean_obtained"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._phase_started = time.perf_counter()


def save_for_resume(trainer: L.Trainer) -> Path | None:
    """After a stop request, a checkpoint ``fit --ckpt_path last`` resumes from: ``last.ckpt`` beside the
    run's other checkpoints. Only in a single process (saving is collective, and the other ranks may not have
    stopped)."""
    if rank_and_world()[1] > 1:
        return None
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = [c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    folder = Path(folders[0]) if folders else Path(trainer.default_root_dir) / "checkpoints"
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path

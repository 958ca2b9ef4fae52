"""What a training cost, counted as it runs and kept in its checkpoints: the sweep reports it beside the front,
and ``ric compare`` sets fronts side by side with it, so a method that trains longer is seen to."""

from __future__ import annotations

import time
from typing import Any

import lightning as L

#: where a checkpoint keeps the training's cost (seconds, steps, tokens), so a fit started from it adds to it
LEDGER_KEY = "ric_training_ledger"


class TrainingCost(L.Callback):
    """The training's wall seconds, optimizer steps, and the tokens and examples the policy trained on (as the
    policy counts them: :meth:`~ric.interfaces.ConditionalPolicy.training_cost`). A fit resumed from a
    checkpoint adds to what the checkpoint carried; ``counted_from_step`` is where counting began (0, or a
    checkpoint written without a ledger). One ledger per trainer: :meth:`of` finds or attaches it."""

    def __init__(self) -> None:
        self._running: dict[str, Any] = {}
        self._carried: dict[str, Any] = {}

    @classmethod
    def of(cls, trainer: L.Trainer) -> TrainingCost:
        """The trainer's ledger, attached now if it has none (before the fit or test starts: it then sees every
        hook from ``setup`` on, checkpoint loading included)."""
        for callback in trainer.callbacks:
            if isinstance(callback, cls):
                return callback
        ledger = cls()
        trainer.callbacks.append(ledger)
        return ledger

    def ledger(self) -> dict[str, Any]:
        """The training so far: this process's part plus what its starting checkpoint carried."""
        if not self._running:
            return dict(self._carried)
        out = {k: v for k, v in self._running.items() if not k.startswith("_")}
        if "_start" in self._running:
            out["train_seconds"] += time.perf_counter() - self._running["_start"]
            out["training_steps"] += self._running["_step"] - self._running["_first_step"]
        return out

    def finish(self, trainer: L.Trainer) -> dict[str, Any]:
        """Stop the clock (the sweep after a fit is not training) and return the ledger."""
        if "_start" in self._running:
            self._running["_step"] = trainer.global_step
            self._running = self.ledger()
        elif self._carried:  # resumed from the final checkpoint: nothing trained here, all of it carried
            self._running, self._carried = self._carried, {}
        return self.ledger()

    def add_seconds(self, seconds: float) -> None:
        """Count work an earlier process did for this training that no checkpoint's ledger holds (an online
        round's samples generated before a kill and kept on disk)."""
        target = self._running if self._running else self._carried
        target["train_seconds"] = target.get("train_seconds", 0.0) + float(seconds)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        zero = {"train_seconds": 0.0, "training_steps": 0, "training_tokens": 0, "training_examples": 0,
                "counted_from_step": trainer.global_step}  # fmt: skip
        self._running = {**zero, **self._carried, "_first_step": trainer.global_step,
                         "_step": trainer.global_step, "_start": time.perf_counter()}  # fmt: skip
        self._carried = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "_start" not in self._running:
            return
        self._running["_step"] = trainer.global_step
        cost = pl_module.training_cost(batch) if hasattr(pl_module, "training_cost") else {}
        for key in ("training_tokens", "training_examples"):
            self._running[key] += int(cost.get(key, 0))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # one top-level key, not callback state: it stays readable whatever callbacks a later run has
        if self._running or self._carried:
            checkpoint[LEDGER_KEY] = self.ledger()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fitting = trainer.state.fn == "fit"  # a test from a checkpoint trains nothing and carries nothing
        self._carried = dict(checkpoint.get(LEDGER_KEY, {})) if fitting else {}

"""The training progress bar, right in an epoch resumed from a mid-epoch checkpoint and in the online stage.

Lightning (2.5 and later) does not call ``on_train_epoch_start`` when a fit resumes in the middle of an epoch,
and its TQDM bar only learns the epoch's length and number there, so a resumed run showed ``Training: n/?``
with no time left until the epoch ended (Lightning issue 20603). Our runs resume mid-epoch often: every
SIGTERM, kill and online round checkpoints where it stopped. And Lightning counts the loader's length once, at
the fit's start, while the online loop's pools differ in size and each round ends the running pass early, so the
online stage's bar had the offline data's length, and its time left was off by as much."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


@runtime_checkable
class BoundsThePass(Protocol):
    """A callback or DataModule that knows where the running pass over the training data ends."""

    def batches_left_in_pass(self, trainer: L.Trainer, batches_done: int) -> int | None:
        """Batches the running pass trains from the trainer's current step on, ``batches_done`` of it trained
        (0 at an epoch's start, more in one resumed), or ``None`` where it does not know."""


class ResumableProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, which sets the resumed epoch's length, number and position at its first batch, and
    ends each epoch's bar where its pass ends: at the current pool's end or at the online loop's next round."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._epoch_started = False

    @property
    def total_train_batches(self) -> int | float:
        """An epoch's length, read at its start."""
        return self.batches_left(0)

    def batches_left(self, batches_done: int) -> int | float:
        """Lightning's count, or less where the pass ends first (a smaller pool, or a round that replaces it)."""
        left = super().total_train_batches
        for owner in [*self.trainer.callbacks, self.trainer.datamodule]:
            bound = owner.batches_left_in_pass(self.trainer, batches_done) if isinstance(owner, BoundsThePass) else None
            left = left if bound is None else min(left, bound)
        return left

    def on_train_start(self, *args: Any) -> None:
        super().on_train_start(*args)
        self._epoch_started = False

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # after a resumed epoch: Lightning draws the new epoch before it zeroes the start, which made a rate of
        # (0 - start) / 0 s
        self.train_progress_bar.initial = 0
        super().on_train_epoch_start(trainer, *args)
        self._epoch_started = True

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, module, batch, batch_idx)
        if self._epoch_started:
            return
        self._epoch_started = True
        # the batches done before the stop, and those left, capped by the steps left when max_steps ends the fit
        total = min(trainer.num_training_batches, batch_idx + self.batches_left(batch_idx))
        bar = self.train_progress_bar
        bar.reset()
        bar.total = convert_inf(total)
        bar.initial = bar.n = batch_idx  # the rate and the time left count this run's batches only
        bar.set_description(f"Epoch {trainer.current_epoch}")


def resumable_bars(callbacks: Any, enabled: bool = True) -> list[Any]:
    """The trainer's callbacks with each plain :class:`TQDMProgressBar` (our configs name it) swapped for a
    :class:`ResumableProgressBar` of the same settings, and one added where the bar is on and none is named:
    Lightning's own default is its Rich bar where ``rich`` is installed, which has neither fix."""
    given = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    swapped = [
        ResumableProgressBar(c.refresh_rate, c.process_position, c._leave) if type(c) is TQDMProgressBar else c
        for c in given
    ]
    named = any(isinstance(c, ProgressBar) for c in swapped)
    return swapped if named or not enabled else [*swapped, ResumableProgressBar()]

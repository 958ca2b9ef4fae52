"""The optimizer every policy uses: AdamW over trainable parameters with a transformers LR schedule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from transformers import get_scheduler

from ric.distributed import attached_trainer


def adamw_with_schedule(
    module: L.LightningModule, learning_rate: float, weight_decay: float, schedule: str, warmup_steps: int
) -> dict[str, Any]:
    """``configure_optimizers`` result: AdamW on parameters that require grad, stepped per batch; the
    schedule spans the trainer's estimated steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    trainer = attached_trainer(module)
    total = trainer.estimated_stepping_batches if trainer is not None else 1
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(int(total), 1))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""Text policies steered through their weights: a preference selects (MORLHF) or mixes (Rewarded Soups)
LoRA adapters trained by RL on a shared base, instead of writing reward markers into the prompt."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ric.interfaces import Steered
from ric.space import check_preference
from ric.text.policy import TextPolicy, trainable_flags_kept


class AdapterPolicy(TextPolicy):
    """A :class:`~ric.text.policy.TextPolicy` without reward markers whose extra LoRA adapters (same rank and
    targets as its own, which stays unused) are the RL-trained policies. ``adapters``: folders saved by peft
    (``adapter_config.json`` + weights), loaded frozen under the names ``policy0``, ``policy1``, ..."""

    def __init__(self, adapters: Sequence[str] = (), **kwargs: Any) -> None:
        kwargs["conditioned"] = False
        if kwargs.get("lora_r", 64) <= 0:
            raise ValueError(f"{type(self).__name__} holds LoRA adapters: set lora_r > 0, got {kwargs['lora_r']}")
        super().__init__(**kwargs)
        self.adapter_names: list[str] = []
        self._preference_active = False
        for path in adapters:
            self.add_trained_adapter(path)

    @property
    def steerable(self) -> bool:
        return True  # through its weights: preference_context

    def streams(self, sampling: dict[str, Any]) -> bool:
        """Only inside :meth:`preference_context`: one engine over requests of different preferences (a
        server's) would run them all with the weights of none."""
        return self._preference_active and super().streams(sampling)

    @torch.no_grad()
    def steer(self, prompts: str | Sequence[Any], preference: Any = None, **kwargs: Any) -> list[Steered]:
        """Samples with the weights for ``preference``: one preference for all prompts (the weights are the
        policy's), no desired rewards (nothing is written into the prompt)."""
        if (
            preference is None
            or np.asarray(preference, dtype=float).ndim != 1
            or kwargs.get("desired_rewards") is not None
        ):
            raise ValueError(f"{type(self).__name__} is steered by one preference for all prompts, got {preference!r}")
        w = check_preference(preference, self.conditioning.reward_names)
        with self.preference_context(w):
            results = super().steer(prompts, None, **kwargs)
        for result in results:
            result.preference = w.tolist()
        return results

    def add_trained_adapter(self, path: str | Path) -> str:
        """Load one trained adapter (frozen); returns its name."""
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {folder}")
        name = f"policy{len(self.adapter_names)}"
        self.lm.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        self.lm.set_adapter("default")
        self.adapter_names.append(name)
        return name

    @contextlib.contextmanager
    def active_adapter(self, name: str) -> Iterator[None]:
        with trainable_flags_kept(self.lm):
            self.lm.set_adapter(name)
            self._preference_active = True
            try:
                yield
            finally:
                self._preference_active = False
                self.lm.set_adapter("default")


class MORLHFPolicy(AdapterPolicy):
    """MORLHF: one adapter per preference, each trained on ``sum_i w_i r_i``; a preference runs the adapter
    trained for it. ``preferences[k]`` is the preference ``adapters[k]`` was trained for."""

    def __init__(self, adapters: Sequence[str] = (), preferences: Sequence[Sequence[float]] = (), **kwargs: Any):
        if len(adapters) != len(preferences):
            raise ValueError(f"{len(adapters)} adapters for {len(preferences)} preferences")
        super().__init__(adapters, **kwargs)
        self.trained_preferences = [np.asarray(w, dtype=float) for w in preferences]

    def add_policy(self, path: str | Path, preference: Sequence[float]) -> str:
        self.trained_preferences.append(np.asarray(preference, dtype=float))
        return self.add_trained_adapter(path)

    def preference_context(self, preference: Sequence[float]) -> contextlib.AbstractContextManager:
        w = np.asarray(preference, dtype=float)
        for name, trained in zip(self.adapter_names, self.trained_preferences):
            if trained.shape == w.shape and np.allclose(trained, w, atol=1e-6):
                return self.active_adapter(name)
        raise ValueError(
            f"MORLHF has no policy trained for preference {w.tolist()}; it was trained for "
            f"{[t.tolist() for t in self.trained_preferences]} (one RL run per preference)"
        )


class SoupPolicy(AdapterPolicy):
    """Rewarded Soups: one adapter per reward (``adapters[i]`` trained on reward ``i`` alone); preference
    ``w`` runs the interpolated weights ``W0 + sum_i w_i dW_i`` with ``dW_i = B_i A_i * scale_i``. peft's
    ``cat`` combination builds exactly this as one adapter of the summed rank (``A = [w_i scale_i A_i]``,
    ``B = [B_i]``, scale 1), merged into the base for generation like any adapter; the authors' script
    averages ``A`` and ``B`` separately, which gives ``(sum w_i B_i)(sum w_i A_i)``, not the interpolation."""

    def preference_context(self, preference: Sequence[float]) -> contextlib.AbstractContextManager:
        w = [float(v) for v in preference]
        if len(w) != len(self.adapter_names):
            raise ValueError(f"preference {w} has {len(w)} weights for {len(self.adapter_names)} experts")
        return self._soup(w)

    @contextlib.contextmanager
    def _soup(self, weights: list[float]) -> Iterator[None]:
        self.lm.add_weighted_adapter(self.adapter_names, weights, adapter_name="soup", combination_type="cat")
        try:
            with self.active_adapter("soup"):
                yield
        finally:
            self.lm.delete_adapter("soup")

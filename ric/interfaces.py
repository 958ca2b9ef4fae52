"""The two abstractions everything else talks to.

* :class:`RewardModel` scores a batch of (prompt/condition, sample) pairs and returns one float per pair.
  Add a reward by subclassing it and implementing :meth:`RewardModel.score_batch`.
* :class:`ConditionalPolicy` is a LightningModule that learns ``pi(sample | prompt, rewards)`` with a
  conditioned training step, and generates samples for prompts and desired rewards.

The online loop, relabeling DataModule and evaluation only use these interfaces, which is why a new
modality is a subclass plus a config entry.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ric.conditioning import RewardConditioning
from ric.normalization import RewardNormalizer


class RewardModel(nn.Module, ABC):
    """A named reward: ``(prompts, samples) -> tensor [B]``, higher is better.

    Subclasses implement :meth:`score_batch` for one batch; :meth:`score` handles splitting into batches,
    progress, shape and NaN checks, and returns a float32 CPU tensor. Register weights as submodules so
    ``.to(device)`` moves them; inputs are moved by the subclass (use :attr:`device`).

    Example::

        class Length(RewardModel):
            def score_batch(self, prompts, samples):
                return torch.tensor([len(s.split()) for s in samples], dtype=torch.float32)

        Length("verbosity").score(["q1", "q2"], ["a b", "c"])  # tensor([2., 1.])

    Args:
        name: the reward's name; it names the conditioning dimension and every column of results.
        batch_size: how many pairs :meth:`score` passes to :meth:`score_batch` at once.
    """

    def __init__(self, name: str, batch_size: int = 16) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"a reward needs a non-empty string name, got {name!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size} for reward {name!r}")
        self.name = name
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> RewardModel:
        """Reward models only score: they stay in eval mode (no dropout), whatever a caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @abstractmethod
    def score_batch(self, prompts: Sequence[Any], samples: Sequence[Any]) -> torch.Tensor:
        """Scores of one batch, shape ``[len(samples)]``."""

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Any],
        samples: Sequence[Any],
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Score every pair, in batches; returns a float32 CPU tensor of shape ``[len(samples)]``."""
        if len(prompts) != len(samples):
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts for {len(samples)} samples")
        size = batch_size or self.batch_size
        starts = range(0, len(samples), size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"scoring {self.name}", unit="batch")
        self.eval()
        out = []
        for start in starts:
            batch_p, batch_s = prompts[start : start + size], samples[start : start + size]
            scores = torch.as_tensor(self.score_batch(batch_p, batch_s)).detach().float().cpu().reshape(-1)
            if scores.shape[0] != len(batch_s):
                raise ValueError(
                    f"reward {self.name!r} returned {scores.shape[0]} scores for a batch of {len(batch_s)}"
                )
            bad = ~torch.isfinite(scores)
            if bad.any():
                k = int(bad.nonzero()[0])
                raise ValueError(
                    f"reward {self.name!r} returned {scores[k].item()} for sample {start + k}: "
                    f"{str(batch_s[k])[:120]!r}"
                )
            out.append(scores)
        return torch.cat(out) if out else torch.zeros(0)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, batch_size={self.batch_size}"

    def identity(self) -> str:
        """Stable description of what this reward computes; keys the on-disk score cache. Include every
        setting that changes scores (the default covers the class, the name and :meth:`extra_repr`)."""
        return f"{type(self).__module__}.{type(self).__qualname__}({self.extra_repr()})"


def score_all(rewards: Sequence[RewardModel], prompts: Sequence[Any], samples: Sequence[Any]) -> np.ndarray:
    """Raw scores of every reward, shape ``[len(samples), len(rewards)]``."""
    return np.stack([r.score(prompts, samples).numpy() for r in rewards], axis=1)


class FunctionReward(RewardModel):
    """A reward from a plain function ``(prompts, samples) -> sequence of floats``: the quickest way to
    add a pure, weight-free reward."""

    def __init__(self, name: str, fn: Callable[[Sequence[Any], Sequence[Any]], Any], batch_size: int = 64) -> None:
        super().__init__(name, batch_size)
        self.fn = fn

    def score_batch(self, prompts: Sequence[Any], samples: Sequence[Any]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.fn(prompts, samples), dtype=np.float32))


#: what FSDP, activation checkpointing and torch.compile insert into parameter names (state dicts omit them)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as state dicts show it, whatever wrappers a strategy put around its modules."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class ConditionalPolicy(L.LightningModule, ABC):
    """A policy ``pi(sample | prompt, rewards)`` trained by conditioned supervised learning.

    Subclasses set :attr:`conditioning` (how reward values enter the prompt), implement
    :meth:`training_step` (the conditioned loss on a batch from the relabeling DataModule) and
    :meth:`generate` (samples for raw prompts at desired rewards). ``desired_rewards=None`` generates
    without reward markers, which is how the base model and plain SFT are evaluated.
    """

    conditioning: RewardConditioning
    #: ``False`` trains and samples without reward markers (plain SFT / base-model baselines)
    conditioned: bool = True
    #: normalization statistics of the rewards, set by the DataModule and stored in every checkpoint
    normalizer: RewardNormalizer | None = None

    def set_normalizer(self, normalizer: RewardNormalizer) -> None:
        names = list(self.conditioning.reward_names)
        if list(normalizer.reward_names) != names:
            raise ValueError(
                f"normalization statistics are for rewards {list(normalizer.reward_names)}, but the policy is "
                f"conditioned on {names}"
            )
        self.normalizer = normalizer

    def format_prompt(self, prompt: Any, values: np.ndarray | None) -> Any:
        """Prompt plus reward markers (``values=None``: no markers) through the one conditioning format.
        Override to fit a modality's limits (e.g. CLIP's 77 tokens), for training and sampling alike."""
        if values is None:
            return self.conditioning.format_unconditioned(prompt)
        return self.conditioning.format(prompt, values)

    def training_prompt(self, prompt: Any, normalized_rewards: np.ndarray) -> Any:
        """The prompt a training example is shown with: markers carry the rewards its sample earned."""
        return self.format_prompt(prompt, normalized_rewards if self.conditioned else None)

    def sampling_defaults(self, purpose: str) -> dict[str, Any]:
        """Generation settings the online loop (``purpose="online"``) and the evaluation sweep
        (``"evaluation"``) use unless their ``sampling`` overrides them."""
        return {}

    def generation_session(self) -> contextlib.AbstractContextManager:
        """Held around a loop of ``generate`` calls (an online round, a sweep): set-up that every call would
        otherwise repeat, such as merging a LoRA adapter into the weights, happens once. Nothing by default."""
        return contextlib.nullcontext()

    def store_samples(self, samples: Sequence[Any], folder: Path, names: Sequence[str]) -> list[Any]:
        """JSON-storable form of generated samples, for the online buffer and evaluation results. Text is
        stored as is; an image policy writes files under ``folder`` (one per name) and returns their paths."""
        return list(samples)

    def save_gallery(
        self, prompts: Sequence[Any], preferences: np.ndarray, samples: Sequence[Sequence[Any]], folder: Path
    ) -> Path | None:
        """Write a visual summary of a preference sweep (``samples[k][i]`` = preference k, prompt i) if the
        modality has one; returns its path."""
        return None

    def accepts(self, prompt: Any, sample: Any) -> bool:
        """Whether an example is usable for training (e.g. within a token-length range)."""
        return True

    def collate(self, examples: Sequence[dict]) -> Any:
        """Turn ``{"prompt": conditioned prompt, "response": sample}`` examples into a training batch."""
        return list(examples)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluation is a preference sweep run by :class:`ric.evaluation.PreferenceSweep`."""

    def ric_metadata(self) -> dict[str, Any]:
        """What inference needs besides the weights: conditioning format and normalization."""
        c = self.conditioning
        return {
            "conditioning": {
                "reward_names": list(c.reward_names),
                "template": c.template,
                "markers": list(c.markers),
                "decimals": c.decimals,
                "separator": c.separator,
            },
            "conditioned": self.conditioned,
            "normalization": self.normalizer.to_dict() if self.normalizer is not None else None,
        }

    def save_ric_metadata(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ric.json").write_text(json.dumps(self.ric_metadata(), indent=2))

    def keep_trained_weights(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights from a checkpoint's state dict: they come back from the base model, so a
        checkpoint holds only what training changed (e.g. a LoRA adapter)."""
        trained = {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k in trained}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ric"] = self.ric_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("ric") or {}
        saved = (meta.get("conditioning") or {}).get("reward_names")
        if saved is not None and list(saved) != list(self.conditioning.reward_names):
            raise ValueError(
                f"checkpoint was trained on rewards {saved}, the policy is configured for "
                f"{list(self.conditioning.reward_names)}"
            )
        if meta.get("normalization"):
            self.normalizer = RewardNormalizer.from_dict(meta["normalization"], self.conditioning.reward_names)

    @abstractmethod
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Conditioned supervised loss on one batch."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Any],
        desired_rewards: np.ndarray | None = None,
        **sampling: Any,
    ) -> list[Any]:
        """One sample per prompt; ``desired_rewards`` is ``[len(prompts), N]`` (or ``[N]`` for all)."""

    def condition(self, prompts: Sequence[Any], desired_rewards: np.ndarray | None) -> list[Any]:
        """Raw prompts -> conditioned prompts, through the one conditioning format."""
        if desired_rewards is None:
            return [self.format_prompt(p, None) for p in prompts]
        values = np.asarray(desired_rewards, dtype=float)
        if values.ndim == 1:
            values = np.broadcast_to(values, (len(prompts), values.shape[0]))
        if values.shape != (len(prompts), self.conditioning.num_rewards):
            raise ValueError(
                f"desired_rewards has shape {values.shape}, expected ({len(prompts)}, "
                f"{self.conditioning.num_rewards}) for rewards {list(self.conditioning.reward_names)}"
            )
        return [self.format_prompt(p, v) for p, v in zip(prompts, values)]

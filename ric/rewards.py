"""The reward interface: a named function of (prompt or condition, sample) pairs, higher is better.

Rewards live apart from the policy interface so that scoring code (the rollout, the relabeling cache, the
server) needs no policy import; add a reward by subclassing :class:`RewardModel` and implementing
:meth:`RewardModel.score_batch`.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


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

    def __new__(cls, *args: Any, **kwargs: Any) -> RewardModel:
        # the constructor's arguments, recorded so the reward can be rebuilt from a saved reward space
        self = super().__new__(cls)
        object.__setattr__(self, "_init_args", _keyword_arguments(cls.__init__, args, kwargs))
        return self

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

    def config(self) -> dict[str, Any] | None:
        """``{"class_path", "init_args"}`` that rebuild this reward, or ``None`` when its arguments are not
        plain JSON values (a function, a module)."""
        init_args = getattr(self, "_init_args", None)
        try:
            json.dumps(init_args)
        except TypeError:
            return None
        if init_args is None:
            return None
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def identity(self) -> str:
        """Stable description of what this reward computes; keys the on-disk score cache. Include every
        setting that changes scores (the default covers the class, the name and :meth:`extra_repr`)."""
        return f"{type(self).__module__}.{type(self).__qualname__}({self.extra_repr()})"


def _keyword_arguments(init: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A constructor call's arguments by keyword, defaults filled in; ``None`` when they cannot be bound
    (copying and unpickling create objects without them) or include extra positional ones."""
    signature = inspect.signature(init)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            out[name] = value
    return out


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

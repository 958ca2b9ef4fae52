"""The policy interface: :class:`ConditionalPolicy` is a LightningModule that learns
``pi(sample | prompt, rewards)`` with a conditioned training step and generates samples for prompts and
desired rewards; its reward counterpart is :class:`ric.rewards.RewardModel`.

The online loop, the relabeling DataModule and evaluation only use these two interfaces, which is why a new
modality is a subclass plus a config entry.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch

from ric.conditioning import RewardConditioning
from ric.rewards import RewardModel
from ric.rollout import rollout
from ric.space import GUIDANCE_REFERENCES, RewardSpace, check_desired

#: ``RewardModel`` stays importable from here, where it lived before :mod:`ric.rewards`
__all__ = ["ConditionalPolicy", "RewardModel", "Steered"]

#: the dtype names policy settings accept
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: what FSDP, activation checkpointing and torch.compile insert into parameter names (state dicts omit them)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as state dicts show it, whatever wrappers a strategy put around its modules."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


#: ``ric.json`` / checkpoint metadata: 1 held the normalization alone, 2 the policy class and the reward space
METADATA_SCHEMA = 2


@dataclass
class Steered:
    """One steered sample: the prompt, the preference asked for (``None`` for explicit desired rewards),
    the desired rewards (normalized units; ``None`` without markers) and the sample (text, or a PIL image).
    ``written_rewards`` are the values the prompt carried: the desired ones, or through the reward space's
    calibration what achieves them. ``obtained_rewards`` is filled when the sample is scored."""

    prompt: Any
    preference: list[float] | None
    desired_rewards: list[float] | None
    sample: Any
    obtained_rewards: dict[str, float] | None = None
    written_rewards: list[float] | None = None


class ConditionalPolicy(L.LightningModule, ABC):
    """A policy ``pi(sample | prompt, rewards)`` trained by conditioned supervised learning.

    Subclasses set :attr:`conditioning` (how reward values enter the prompt), implement
    :meth:`training_step` (the conditioned loss on a batch from the relabeling DataModule),
    :meth:`generate` (samples for raw prompts at desired rewards), :meth:`export` and :meth:`from_export`.
    ``desired_rewards=None`` generates without reward markers, which is how the base model and plain SFT
    are evaluated. Users steer a trained policy with :meth:`steer`.
    """

    conditioning: RewardConditioning
    #: ``False`` trains and samples without reward markers (plain SFT / base-model baselines)
    conditioned: bool = True
    #: the reward space (normalization, range, mapping), set by the DataModule and stored in every checkpoint
    reward_space: RewardSpace | None = None
    #: init arguments a policy loaded for inference sets: training-only switches off
    inference_overrides: ClassVar[dict[str, Any]] = {}

    @property
    def steerable(self) -> bool:
        """Whether a preference changes this policy's samples (a sweep then evaluates every preference, not
        one point). RiC's preference lives in the prompt's markers, so a policy trained without them is not."""
        return self.conditioned

    def preference_context(self, preference: Sequence[float]) -> contextlib.AbstractContextManager:
        """The policy for ``preference`` for the duration, for policies steered by something other than the
        prompt (the RL baselines swap in weights trained or mixed for it). RiC's markers need nothing here."""
        return contextlib.nullcontext()

    def set_reward_space(self, space: RewardSpace) -> None:
        names = list(self.conditioning.reward_names)
        if list(space.reward_names) != names:
            raise ValueError(
                f"the reward space is for rewards {list(space.reward_names)}, but the policy is conditioned on {names}"
            )
        self.reward_space = space

    def format_prompt(self, prompt: Any, values: np.ndarray | None) -> Any:
        """Prompt plus reward markers (``values=None``: no markers) through the one conditioning format.
        Override to fit a modality's limits (e.g. CLIP's 77 tokens), for training and sampling alike."""
        if values is None:
            return self.conditioning.format_unconditioned(prompt)
        return self.conditioning.format(prompt, values)

    def training_prompt(self, prompt: Any, normalized_rewards: np.ndarray | None) -> Any:
        """The prompt a training example is shown with: markers carry the rewards its sample earned (``None``:
        no markers, for marker dropout)."""
        return self.format_prompt(prompt, normalized_rewards if self.conditioned else None)

    #: sampling settings this policy's ``generate`` takes (``None``: any, e.g. passed on to transformers)
    sampling_keys: ClassVar[frozenset[str] | None] = None

    @classmethod
    def check_sampling(cls, settings: dict[str, Any], where: str = "sampling") -> dict[str, Any]:
        """Refuse sampling settings this policy does not take or values out of range, naming them
        (``where`` says where they were set); returns the settings."""
        if not isinstance(settings, dict):
            raise ValueError(f"{where} must be a mapping of setting names to values, got {settings!r}")
        if cls.sampling_keys is not None:
            unknown = sorted(set(settings) - cls.sampling_keys)
            if unknown:
                raise ValueError(
                    f"{where}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(cls.sampling_keys)}"
                )
        for key, value in settings.items():
            check = SAMPLING_CHECKS.get(key)
            if check is not None and not _passes(check[0], value):
                raise ValueError(f"{where}.{key} must be {check[1]}, got {value!r}")
        return settings

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

    def fits(self, conditioned_prompt: Any, sample: Any) -> bool:
        """Whether a conditioned example's training row holds all of it: a row cut short would teach the
        rewards of the whole response on a part of it (and, for text, never show its end)."""
        return True

    def check_prompt(self, prompt: Any) -> None:
        """Refuse a prompt generation cannot take (empty, too long for the model), naming it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {prompt!r} is empty or not text")

    def collate(self, examples: Sequence[dict]) -> Any:
        """Turn ``{"prompt": conditioned prompt, "response": sample}`` examples into a training batch."""
        return list(examples)

    def training_cost(self, batch: Any) -> dict[str, int]:
        """What one training batch cost, for :class:`ric.cost.TrainingCost`: ``training_examples`` and
        ``training_tokens`` (tokens through the model). Only the policy knows its batch's layout; by default a
        batch is a list of examples and tokens are not counted."""
        return {"training_examples": len(batch) if isinstance(batch, (list, tuple)) else 0, "training_tokens": 0}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluation is a preference sweep run by :class:`ric.evaluation.PreferenceSweep`."""

    # ---- metadata, checkpoints and exports ------------------------------------------------------
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments this policy was built with, as JSON values."""
        args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # LightningCLI adds _class_path
        return json.loads(json.dumps(args, default=str))

    def ric_metadata(self) -> dict[str, Any]:
        """What inference needs besides the weights: the policy class and its settings, the conditioning
        format and the reward space."""
        c = self.conditioning
        return {
            "schema_version": METADATA_SCHEMA,
            "policy": {
                "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": self.init_args(),
            },
            "conditioning": {
                "reward_names": list(c.reward_names),
                "template": c.template,
                "markers": list(c.markers),
                "decimals": c.decimals,
                "separator": c.separator,
            },
            "conditioned": self.conditioned,
            "reward_space": self.reward_space.to_dict() if self.reward_space is not None else None,
        }

    def save_ric_metadata(self, folder: str | Path, **extra: Any) -> Path:
        """``ric.json`` (the metadata plus ``extra``, e.g. how the export was made) and a model card."""
        from ric.model_card import model_card

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**self.ric_metadata(), **extra}
        (folder / "ric.json").write_text(json.dumps(meta, indent=2))
        (folder / "README.md").write_text(model_card(meta, folder))
        return folder / "ric.json"

    def keep_trained_weights(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights from a checkpoint's state dict: they come back from the base model, so a
        checkpoint holds only what training changed (e.g. a LoRA adapter)."""
        trained = self.trained_weight_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k in trained}

    def trained_weight_names(self) -> set[str]:
        """State-dict names of the weights training changes (what a checkpoint holds)."""
        return {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}

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
        space = read_reward_space(meta, self.conditioning.reward_names)
        if space is None:
            return
        if self.reward_space is not None:
            # a run (fit or test) from a checkpoint: the statistics are the checkpoint's, as its labels were
            # written in them; the range and mapping are this run's settings, so a sweep or an online stage can
            # ask for other values than the training did (a schema-1 checkpoint holds the statistics only). A
            # range of data quantiles keeps the raw values it names, restated in the checkpoint's units
            configured = self.reward_space
            space = configured.with_statistics(space.mean, space.std, space.fitted_on)
            source = configured.range_source
            if source.get("kind") == "data" and "r_min" not in source and "r_max" not in source:
                lo, hi = (
                    space.normalize(configured.denormalize(b[None]))[0] for b in (configured.r_min, configured.r_max)
                )
                space = replace(space, r_min=lo, r_max=hi)
        self.reward_space = space

    def export(self, path: str | Path, merge: bool = True) -> Path:
        """A standalone model folder with ``ric.json`` and a model card, loadable by :func:`ric.load`; the
        live policy is left as it was."""
        raise NotImplementedError(f"{type(self).__name__} does not implement export()")

    @classmethod
    def from_export(cls, folder: Path, meta: dict[str, Any], **overrides: Any) -> ConditionalPolicy:
        """The policy of an export folder written by :meth:`export` (``meta``: its ``ric.json``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from an export folder")

    # ---- generation -----------------------------------------------------------------------------
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

    def streams(self, sampling: dict[str, Any]) -> bool:
        """Whether :meth:`generate_stream` yields samples one by one as they finish at these settings (a
        rollout then hands on chunks as they finish instead of generating chunk by chunk)."""
        return False

    def generate_stream(
        self, prompts: Sequence[Any], desired_rewards: np.ndarray | None = None, **sampling: Any
    ) -> Iterator[tuple[int, Any]]:
        """``(position, sample)`` pairs as samples finish, so a caller can use them before the rest are done
        (a continuous batch finishes short answers first). By default every sample at once, in order."""
        yield from enumerate(self.generate(prompts, desired_rewards, **sampling))

    def log_likelihood(
        self, prompts: Sequence[Any], responses: Sequence[Any], desired_rewards: np.ndarray | None
    ) -> np.ndarray:
        """Log-likelihood (nats) of each response after its prompt conditioned on ``desired_rewards``; what
        :func:`ric.marker_effects.marker_effects` measures with. Policies without a tractable likelihood
        (diffusion) do not give one."""
        raise NotImplementedError(f"{type(self).__name__} does not give response log-likelihoods")

    def reference_rewards(self, desired_rewards: np.ndarray | None, reference: str) -> np.ndarray | None:
        """The condition reward guidance steers away from, for each row of ``desired_rewards`` (``None``: no
        markers). See :data:`GUIDANCE_REFERENCES`."""
        if desired_rewards is None or not self.conditioned:
            raise ValueError("reward guidance needs reward markers: give desired rewards to a conditioned policy")
        values = np.asarray(desired_rewards, dtype=float)
        if reference == "neutral":
            return np.zeros_like(values)
        if reference == "mirror":
            return -values
        if reference == "none":
            return None
        raise ValueError(f"guidance_reference must be one of {list(GUIDANCE_REFERENCES)}, got {reference!r}")

    def condition(self, prompts: Sequence[Any], desired_rewards: np.ndarray | None) -> list[Any]:
        """Raw prompts -> conditioned prompts, through the one conditioning format; without markers for an
        unconditioned policy (plain SFT, the base model) or ``desired_rewards=None``."""
        if desired_rewards is None or not self.conditioned:
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

    def targets(
        self, num_prompts: int, preference: Any = None, desired_rewards: Any = None, method: str | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(preferences, desired rewards)``, one row per prompt, from one preference (or desired-reward
        vector) for all prompts or one per prompt; ``(None, None)`` for an unconditioned policy."""
        if preference is not None and desired_rewards is not None:
            raise ValueError("give a preference or desired_rewards, not both")
        if not self.conditioned:
            return None, None
        space = self.reward_space
        if desired_rewards is not None:
            values = check_desired(desired_rewards, self.conditioning.reward_names)
            return None, _rows("desired_rewards", values, num_prompts)
        if preference is None:
            raise ValueError("steering needs a preference (weights on the simplex) or desired_rewards")
        if space is None:
            raise RuntimeError("this policy has no reward space: it was not trained or loaded with one")
        desired = space.desired(preference, method)
        prefs = np.asarray(preference, dtype=float)
        return _rows("preference", prefs, num_prompts), _rows("preference", desired, num_prompts)

    @torch.no_grad()
    def steer(
        self,
        prompts: str | Sequence[Any],
        preference: Any = None,
        *,
        desired_rewards: Any = None,
        method: str | None = None,
        num_samples: int = 1,
        seed: int | None = None,
        **sampling: Any,
    ) -> list[Steered]:
        """Samples for ``prompts`` at a preference: preference -> desired rewards (through the reward space's
        mapping, or ``method``) -> conditioned prompt -> samples. ``preference`` (or ``desired_rewards``) is
        one vector for every prompt or one per prompt; ``num_samples`` samples per prompt, in prompt order;
        the same ``seed`` gives the same samples. ``sampling`` overrides the policy's generation settings."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to steer")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        for prompt in prompts:
            self.check_prompt(prompt)
        prefs, desired = self.targets(len(prompts), preference, desired_rewards, method)
        written = self.marker_values(desired)
        rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
        targets = None if written is None else written[rows]
        samples = rollout(self, [prompts[i] for i in rows], targets, settings=sampling, seed=seed).samples
        return [
            Steered(
                prompt=prompts[i],
                preference=None if prefs is None else prefs[i].tolist(),
                desired_rewards=None if desired is None else desired[i].tolist(),
                sample=sample,
                written_rewards=None if written is None else written[i].tolist(),
            )
            for i, sample in zip(rows, samples)
        ]

    def marker_values(self, desired: np.ndarray | None) -> np.ndarray | None:
        """The values written into prompts for desired rewards at inference: through the reward space's
        calibration when it has one (``ric calibrate``), as they are otherwise."""
        if desired is None or self.reward_space is None:
            return desired
        return self.reward_space.markers(desired)


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except TypeError:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


#: checks of common sampling settings: name -> (test, what it must be)
SAMPLING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "guidance": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = no reward guidance)"),
    "guidance_reference": (lambda v: v in GUIDANCE_REFERENCES, f"one of {list(GUIDANCE_REFERENCES)}"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "num_inference_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "guidance_scale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "eta": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def read_reward_space(meta: dict[str, Any], reward_names: Sequence[str] | None = None) -> RewardSpace | None:
    """The reward space of checkpoint or ``ric.json`` metadata of either schema (1: statistics only)."""
    if meta.get("reward_space"):
        return RewardSpace.from_dict(meta["reward_space"], reward_names)
    if meta.get("normalization"):
        return RewardSpace.from_dict(meta["normalization"], reward_names)
    return None


def _rows(name: str, values: np.ndarray, n: int) -> np.ndarray:
    """One row per prompt: a single vector is repeated, a batch must have a row for every prompt."""
    if values.ndim == 1:
        return np.broadcast_to(values, (n, values.shape[0])).copy()
    if values.shape[0] != n:
        raise ValueError(f"{values.shape[0]} {name} rows for {n} prompts (give one for all, or one per prompt)")
    return values

"""The one place where reward values become prompt text and prompt text becomes reward values.

Every stage (relabeling, online generation, evaluation, diffusion captions) formats conditions through
:class:`RewardConditioning`, so the training prompts and the inference prompts can never drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ric.space import check_desired

PROMPT_SLOT = "{prompt}"
REWARDS_SLOT = "{rewards}"


def _value_pattern(decimals: int) -> str:
    """Exactly what :meth:`RewardConditioning.format_value` writes (no leading zeros, fixed decimals), so a
    prompt that starts with a digit right after the markers still parses unambiguously."""
    integer = r"-?(?:0|[1-9]\d*)"
    return integer + (rf"\.\d{{{decimals}}}" if decimals > 0 else "")


@dataclass(frozen=True)
class RewardConditioning:
    """Formats ``N`` reward values as markers (``<R1> 0.3 <R2> -1.2``) inside a task's prompt template.

    Args:
        reward_names: one name per reward dimension, in the order the values are given.
        template: the task's prompt with a ``{prompt}`` slot for the raw prompt and a ``{rewards}`` slot
            where the markers go, e.g. ``"{prompt} {rewards}\\n\\nAssistant:"``.
        markers: marker text per dimension; defaults to ``<R1>``, ``<R2>``, ...
        decimals: digits after the decimal point (the paper rounds to 0.1).
        separator: text between a marker and its value, and between consecutive marker/value pairs.
    """

    reward_names: Sequence[str]
    template: str = PROMPT_SLOT + " " + REWARDS_SLOT
    markers: Sequence[str] | None = None
    decimals: int = 1
    separator: str = " "
    _pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.reward_names)
        if not names:
            raise ValueError("reward_names is empty: conditioning needs at least one reward")
        if len(set(names)) != len(names):
            raise ValueError(f"reward_names has duplicates: {list(names)}")
        object.__setattr__(self, "reward_names", names)
        markers = tuple(self.markers) if self.markers is not None else tuple(f"<R{i + 1}>" for i in range(len(names)))
        if len(markers) != len(names):
            raise ValueError(f"{len(markers)} markers {list(markers)} for {len(names)} rewards {list(names)}")
        if len(set(markers)) != len(markers) or any(not m.strip() for m in markers):
            raise ValueError(f"markers must be distinct and non-blank, got {list(markers)}")
        object.__setattr__(self, "markers", markers)
        for slot in (PROMPT_SLOT, REWARDS_SLOT):
            if self.template.count(slot) != 1:
                raise ValueError(f"template must contain {slot} exactly once: {self.template!r}")
        if REWARDS_SLOT + PROMPT_SLOT in self.template:
            raise ValueError(
                f"template {self.template!r} puts {{prompt}} right after {{rewards}}: a prompt starting with a digit "
                "would read as part of the last value; put a space or other text between them"
            )
        if self.decimals < 0:
            raise ValueError(f"decimals must be >= 0, got {self.decimals}")
        sep = re.escape(self.separator)
        number = _value_pattern(self.decimals)
        rewards_re = sep.join(f"{re.escape(m)}{sep}(?P<v{i}>{number})" for i, m in enumerate(markers))
        head, tail = self.template.split(PROMPT_SLOT)
        if REWARDS_SLOT in head:
            before, after = head.split(REWARDS_SLOT)
            regex = re.escape(before) + rewards_re + re.escape(after) + "(?P<prompt>.*)" + re.escape(tail)
        else:
            before, after = tail.split(REWARDS_SLOT)
            regex = re.escape(head) + "(?P<prompt>.*)" + re.escape(before) + rewards_re + re.escape(after)
        object.__setattr__(self, "_pattern", re.compile(regex, re.DOTALL))

    @property
    def num_rewards(self) -> int:
        return len(self.reward_names)

    def _check_values(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        return check_desired(np.ravel(np.asarray(values, dtype=object)).tolist(), self.reward_names, "reward values")

    def format_value(self, value: float) -> str:
        text = f"{value:.{self.decimals}f}"
        # "-0.0" and "0.0" are the same condition; one spelling keeps training and inference prompts equal
        return text[1:] if text.startswith("-") and float(text) == 0 else text

    def format_rewards(self, values: Sequence[float] | np.ndarray) -> str:
        """Only the markers and values, e.g. ``<R1> 0.3 <R2> -1.2``."""
        arr = self._check_values(values)
        return self.separator.join(f"{m}{self.separator}{self.format_value(v)}" for m, v in zip(self.markers, arr))

    def format(self, prompt: str, values: Sequence[float] | np.ndarray) -> str:
        """The conditioned prompt: the template with the raw prompt and the reward markers inserted."""
        return self.template.replace(REWARDS_SLOT, self.format_rewards(values)).replace(PROMPT_SLOT, prompt, 1)

    def format_unconditioned(self, prompt: str) -> str:
        """The task prompt without markers: plain SFT and the base model see this."""
        template = self.template
        for slot in (self.separator + REWARDS_SLOT, REWARDS_SLOT + self.separator, REWARDS_SLOT):
            if slot in template:
                template = template.replace(slot, "", 1)
                break
        return template.replace(PROMPT_SLOT, prompt, 1)

    def parse(self, text: str) -> tuple[str, np.ndarray]:
        """Inverse of :meth:`format`: returns the raw prompt and the reward values written in ``text``."""
        match = self._pattern.fullmatch(text)
        if match is None:
            raise ValueError(
                f"text does not follow the conditioning template {self.template!r} with markers "
                f"{list(self.markers)}: {text[:200]!r}"
            )
        values = np.array([float(match.group(f"v{i}")) for i in range(self.num_rewards)])
        return match.group("prompt"), values

    def round(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """The values exactly as the policy reads them back after formatting."""
        arr = np.asarray(values, dtype=float)
        return np.array([float(self.format_value(v)) for v in arr.reshape(-1)]).reshape(arr.shape)

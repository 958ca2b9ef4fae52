"""The model card (``README.md``) written beside every export's ``ric.json``: what a person needs to know
to steer the model, in words rather than JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def model_card(meta: dict[str, Any], folder: Path) -> str:
    """Markdown describing an export: the rewards and their normalization, the mapping, the training data,
    the prompt format and how to steer it."""
    cond = meta.get("conditioning") or {}
    space = meta.get("reward_space") or {}
    policy = (meta.get("policy") or {}).get("class_path", "?")
    names = list(cond.get("reward_names") or space.get("reward_names") or [])
    export = meta.get("export") or {}
    lines = [
        f"# {folder.name}: a Rewards-in-Context model",
        "",
        f"A `{policy}` trained with Rewards-in-Context (Yang et al., ICML 2024): one model, steered at inference "
        "time by a preference over its rewards. The preference is mapped to desired rewards, which are written "
        "into the prompt.",
        "",
        "## Rewards",
        "",
        "| reward | raw mean | raw std | range (normalized) | model |",
        "|---|---|---|---|---|",
    ]
    rewards = space.get("rewards") or [None] * len(names)
    for i, name in enumerate(names):
        mean = _at(space.get("mean"), i)
        std = _at(space.get("std"), i)
        lo, hi = _at(space.get("r_min"), i), _at(space.get("r_max"), i)
        source = (rewards[i] or {}).get("class_path", "not recorded") if i < len(rewards) else "not recorded"
        rng = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "-"
        lines.append(f"| {name} | {_num(mean)} | {_num(std)} | {rng} | `{source}` |")
    mapping = space.get("mapping") or {}
    method = mapping.get("method", "p_inf")
    p = f", p = {mapping.get('p')}" if method in ("p_norm", "solver") else ""
    fitted = space.get("fitted_on") or {}
    lines += [
        "",
        "Rewards are normalized to zero mean and unit std over the training data: a desired reward of +1.0 "
        "asks for one standard deviation above the training mean.",
        "",
        f"- Default mapping of a preference to desired rewards: `{method}`{p}; reward range: "
        f"{_range_text(space.get('range_source') or {'kind': 'normal'})}.",
        f"- Statistics fitted on: {fitted.get('dataset', 'not recorded')} ({fitted.get('num_samples', '?')} samples, "
        f"split `{fitted.get('split', '?')}`).",
        f"- Prompt template: `{json.dumps(cond.get('template', '?'))}` (JSON-escaped) with the markers "
        f"`{' '.join(cond.get('markers') or [])}`, values with {cond.get('decimals', 1)} decimal(s).",
        f"- Export: {'adapter merged into the base weights' if export.get('merged') else 'adapter only'}"
        + (f" (base `{export['base']}`)" if export.get("base") else "")
        + ".",
        "",
        *_calibration_text(space.get("calibration"), names),
        "## Steer it",
        "",
        "```bash",
        f'ric generate {folder} --preference {_example_preference(len(names))} --prompt "..."',
        f"ric chat {folder}",
        f"ric serve {folder}",
        "```",
        "",
        "```python",
        "import ric",
        "",
        f'policy = ric.load("{folder}")',
        f'for s in policy.steer(["..."], preference=[{_example_preference(len(names))}], seed=0):',
        "    print(s.desired_rewards, s.sample)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _calibration_text(calibration: dict[str, Any] | None, names: list[str]) -> list[str]:
    """The calibration's section: the achievable range per reward and its measured error."""
    if not calibration:
        return []
    lo = [row[0] for row in calibration["obtained"]]
    hi = [row[-1] for row in calibration["obtained"]]
    error = calibration.get("error") or {}
    lines = ["## Calibration", "",
             "`ric calibrate` measured what the model obtains for the values written in its prompt: a desired reward "
             "means the reward expected, preferences map onto the achievable range and the prompt carries the value "
             "that achieves it.", "", "| reward | achievable (normalized) |", "|---|---|"]  # fmt: skip
    lines += [f"| {n} | [{a:+.3f}, {b:+.3f}] |" for n, a, b in zip(names, lo, hi)]
    if error:
        before, after = error.get("mean_before", float("nan")), error.get("mean_after", float("nan"))
        lines += ["", f"Mean |obtained - asked| on {error.get('held_out_prompts')} held-out prompts: "
                  f"{before:.3f} before, {after:.3f} after."]  # fmt: skip
    return [*lines, ""]


def _range_text(source: dict[str, Any]) -> str:
    if source.get("kind") == "data":
        lo, hi = source.get("quantiles", [0.0, 1.0])
        text = f"the {lo:g} to {hi:g} quantiles of the normalized training rewards"
    else:
        text = "the paper's, +-4.23 (the expected extremes of 50,000 standard-normal draws)"
    overrides = [f"{k} = {source[k]}" for k in ("r_min", "r_max") if k in source]
    return text + (f", with {', '.join(overrides)}" if overrides else "")


def _at(values: Any, i: int) -> float | None:
    return float(values[i]) if values is not None and i < len(values) else None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _example_preference(n: int) -> str:
    if n <= 1:
        return "1.0"
    return ",".join(["0.5", "0.5"] + ["0"] * (n - 2)) if n > 2 else "0.2,0.8"

"""Reward guidance: how far ``l + g (l - l_ref)`` moves each reward, at what cost in quality and time.

A trained checkpoint is swept at the 5 preferences for every ``g`` and reference (neutral point, mirror, no
markers), with the sampling of its config's sweep, on its split's validation prompts: that is where the
setting is chosen, by a rule fixed here (every reward's Spearman >= 0.9 and at most 5 points more degenerate
answers than without guidance; among those, the largest mean spread ratio). The chosen setting and ``g = 0``
are then measured once on the held-out prompts. Per cell: Spearman and spread ratio per reward, the share of
degenerate answers (empty, a 3-word run four times or more, or reward markers and marker-like numbers leaking
into the answer), the answers' perplexity under the base model (the adapter switched off, no markers), and
seconds per sample.

    python -m benchmarks.guidance --config quickstart_text \
        --checkpoint runs/quickstart_text/lightning_logs/version_0/checkpoints/last.ckpt --name quickstart

With ``--train``, the config is first trained with those dotted overrides (through ``ric fit``, in
``--out/<name>/train``) and that run's last checkpoint is measured: the recipe retrained with marker dropout is

    python -m benchmarks.guidance --config steer_hh_cpu --train data.marker_dropout=0.1 --name hh_dropout

Every finished cell is kept under ``--out`` and reused; results go to ``benchmarks/results/guidance_<name>``.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.experiment import (
    PREFERENCES,
    build_data_module,
    cached,
    checkpoints,
    command,
    fit,
    get,
    load_config,
    override,
    pyplot,
    rooted,
    save_figure,
    write_results,
)

GUIDANCE = [0.0, 0.5, 1.0, 2.0, 4.0]
REFERENCES = ["neutral", "mirror", "none"]
#: the rule that chooses a setting on validation prompts, fixed before any run
MIN_SPEARMAN, MAX_DEGENERATE = 0.9, 0.05
LOOP_REPEATS = 4
MARKER_LEAK = re.compile(r"<R\d+>|(^|\s)[-+]?\d\.\d(\s|$)")


def degenerate(answer: str) -> bool:
    """Empty, a loop (some 3-word run four times or more: three is common in lists), or markers or
    marker-like values leaking into the answer."""
    words = answer.split()
    if not words:
        return True
    runs = collections.Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return (bool(runs) and max(runs.values()) >= LOOP_REPEATS) or bool(MARKER_LEAK.search(answer))


def base_perplexity(policy: Any, prompts: list[str], answers: list[str]) -> float:
    """Perplexity of the answers (with their end token) under the base model, prompted without markers."""
    with policy.lm.disable_adapter():
        nats = -policy.log_likelihood(prompts, answers, None).sum()
    tokens = sum(len(policy.tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in answers)
    return float(np.exp(nats / tokens))


def measure(policy: Any, prompts: list[str], folder: Path, sampling: dict, g: float, reference: str) -> dict:
    """One sweep at one setting and what it gives."""
    from ric.report import steering_measures
    from ric.sweep import run_sweep

    settings = {**sampling, "guidance": g, "guidance_reference": reference} if g else dict(sampling)
    rewards = policy.reward_space.build_rewards()
    result = run_sweep(policy, rewards, prompts, PREFERENCES, folder, settings=settings, seed=0)
    seconds = result.seconds  # (a sweep resumed from its kept preferences counts the first run's seconds)
    answers = [a for stored in result.samples for a in stored]
    return {
        "guidance": g,
        "reference": reference if g else None,
        "steering": steering_measures(result.reward_names, result.preferences, result.desired, result.means),
        "desired": result.desired.tolist(),
        "obtained": result.means.tolist(),
        "degenerate": float(np.mean([degenerate(a) for a in answers])),
        "perplexity_base": base_perplexity(policy, prompts * len(PREFERENCES), answers),
        "mean_words": float(np.mean([len(a.split()) for a in answers])),
        "seconds_per_sample": seconds / len(answers),
        "samples": len(answers),
    }


def choose(cells: list[dict]) -> dict | None:
    """The rule: every reward's Spearman >= 0.9 and at most 5 points more degenerate answers than ``g = 0``
    (the model's own share: a small model loops without any guidance); then the largest mean spread."""
    plain = next(c["degenerate"] for c in cells if c["guidance"] == 0)
    ok = [c for c in cells if c["degenerate"] <= plain + MAX_DEGENERATE
          and all(m["spearman"] >= MIN_SPEARMAN for m in c["steering"].values())]  # fmt: skip
    return max(ok, key=lambda c: np.mean([m["spread_ratio"] for m in c["steering"].values()]), default=None)


def plot(cells: list[dict], names: list[str], references: list[str], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names) + 2, figsize=(4.2 * (len(names) + 2), 3.6))
    base = next(c for c in cells if c["guidance"] == 0)
    for reference in references:
        row = [base] + sorted((c for c in cells if c["reference"] == reference), key=lambda c: c["guidance"])
        gs = [c["guidance"] for c in row]
        for ax, name in zip(axes, names):
            ax.plot(gs, [c["steering"][name]["spread_ratio"] for c in row], "o-", label=reference)
            ax.set_title(f"{name}: spread ratio")
        axes[-2].plot(gs, [100 * c["degenerate"] for c in row], "o-", label=reference)
        axes[-1].plot(gs, [c["seconds_per_sample"] / base["seconds_per_sample"] for c in row], "o-", label=reference)
    axes[-2].set_title("degenerate answers (%)")
    axes[-1].set_title("seconds per sample / g = 0")
    for ax in axes:
        ax.set_xlabel("guidance g")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["data.marker_dropout=0.1"]`` -> ``{"data.marker_dropout": 0.1}`` (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--train takes dotted key=value overrides, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def retrain(config: dict[str, Any], overrides: dict[str, Any], folder: Path) -> Path:
    """The config trained with ``overrides`` in ``folder`` (kept and resumed like every study's runs, without the
    config's own sweep: this study measures its own); its last checkpoint."""
    steps = get(override(config, overrides), "trainer.max_steps")
    run = {"trainer.default_root_dir": str(folder), "trainer.callbacks": [checkpoints(folder, steps)],
           "data.output_dir": str(folder)}  # fmt: skip
    fit(folder, override(config, {**overrides, **run}), record={"overrides": overrides})
    return folder / "ckpt" / "last.ckpt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart_text", help="the shipped config the checkpoint was trained by")
    parser.add_argument("--checkpoint", help="the trained checkpoint (.ckpt) or export folder")
    parser.add_argument(
        "--train",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="train the config with these dotted overrides first and measure that run instead",
    )
    parser.add_argument("--name", required=True, help="names the results file: benchmarks/results/guidance_<name>")
    parser.add_argument("--prompts", type=int, default=16, help="validation (and held-out) prompts, at most")
    parser.add_argument("--samples", type=int, default=2, help="answers per prompt and preference")
    parser.add_argument("--out", default="runs/guidance", help="where finished cells are kept")
    parser.add_argument("--g-values", default=",".join(f"{g:g}" for g in GUIDANCE), help="the g swept (0 first)")
    parser.add_argument("--references", default=",".join(REFERENCES), help="the references swept")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.train):
        parser.error("give either --checkpoint or --train")
    grid = [float(v) for v in args.g_values.split(",") if v.strip()]
    references = [r for r in args.references.split(",") if r.strip()]

    import ric

    config = rooted(load_config(args.config))
    sweep = next(c for c in get(config, "trainer.callbacks") if c["class_path"].endswith("PreferenceSweep"))
    sampling = dict(sweep["init_args"].get("sampling") or {})
    dm = build_data_module(config["data"])
    train, val, held_out = dm.split(dm.dataset.load())
    # validation prompts choose g; a recipe without a validation split lends the training split's first prompts
    tuning = list(dict.fromkeys(r["prompt"] for r in (val or train)))[: args.prompts]
    tuning_split = "validation" if val else "training"
    held_out = held_out[: args.prompts]
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.train)
    checkpoint = args.checkpoint or retrain(config, overrides, out.resolve() / "train")
    policy = ric.load(checkpoint)
    names = list(policy.reward_space.reward_names)

    def cell(prompts: list[str], split: str, g: float, reference: str) -> dict:
        key = f"{split}-g{g:g}-{reference if g else 'plain'}"
        print(f"{args.name}: {key}", flush=True)
        folder = out / key
        return cached(out / f"{key}.json", measure, policy, [p for p in prompts for _ in range(args.samples)],
                      folder, sampling, g, reference)  # fmt: skip

    cells = [cell(tuning, tuning_split, 0.0, "neutral")]
    cells += [cell(tuning, tuning_split, g, ref) for ref in references for g in grid if g]
    chosen = choose(cells)
    final = [cell(held_out, "held_out", 0.0, "neutral")]
    if chosen is not None and chosen["guidance"]:
        final.append(cell(held_out, "held_out", chosen["guidance"], chosen["reference"]))
    results = {
        "command": command(),
        "checkpoint": str(checkpoint),
        "config": args.config,
        "trained_with": overrides or None,
        "sampling": sampling,
        "rule": f"every reward's Spearman >= {MIN_SPEARMAN}, degenerate <= g=0's + {MAX_DEGENERATE:.0%}; "
        "then the largest mean spread",
        "tuning_split": tuning_split,
        "tuning_prompts": len(tuning),
        "held_out_prompts": len(held_out),
        "samples_per_prompt": args.samples,
        "grid": {"guidance": grid, "references": references},
        "tuning": cells,
        "chosen": None if chosen is None else {"guidance": chosen["guidance"], "reference": chosen["reference"]},
        "held_out": final,
    }
    path = write_results(f"guidance_{args.name}", results)
    plot(cells, names, references, path.with_suffix(".png"))
    for c in cells + final:
        shown = ", ".join(
            f"{n} rho {m['spearman']:+.2f} spread {m['spread_ratio']:.2f}" for n, m in c["steering"].items()
        )
        print(f"g {c['guidance']:<4g} {str(c['reference']):<8} {shown}; degenerate {c['degenerate']:.0%}, "
              f"ppl {c['perplexity_base']:.1f}, {c['seconds_per_sample']:.2f} s/sample")  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()

"""Which offline reward pair can RiC steer on hh-rlhf? Before training for an hour, measure what the data
gives each candidate reward: how reliable a response's label is, how much of it differs between the
responses to one prompt (the part a marker can explain), and which pairs conflict. No model is trained.

Per candidate (the offline rewards: verbosity, readability and each of its two Flesch terms alone, sentiment,
relevance), on the training split the steering recipe sees (the examples that fit its token budget):
- split-half reliability: the reward of a response's odd sentences against that of its even sentences,
  Spearman-Brown corrected, over responses with at least 2 sentences;
- the share of the variance between the responses to one prompt;
- the Pearson correlation of every pair, over responses and over the differences within a prompt (a
  trade-off shows as a negative value).

    .venv/bin/python -m benchmarks.reward_candidates          # about 3 min; hh-rlhf and the quickstart data
    .venv/bin/python -m benchmarks.reward_candidates --task tldr   # the Reddit summaries (reward_candidates_tldr)

A summary is mostly one sentence: on the TL;DR task the halves are a summary's odd and even words instead, and
the candidates are conciseness, coverage of the post and relevance (the summaries' own length varies less than
an hh answer's, so the within-prompt share is between a post's human and model summary).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment import (
    RESULTS,
    ROOT,
    build_data_module,
    command,
    load_config,
    pyplot,
    rooted,
    save_figure,
    write_results,
)
from benchmarks.steering import quickstart_data, recipe_config
from ric.data import prompt_key
from ric.text.rewards import Conciseness, Coverage, Readability, Relevance, Sentiment, Verbosity


class FleschPart(Readability):
    """One of Flesch's two terms alone (higher = easier, as Flesch): is either a steadier label than the sum?"""

    def __init__(self, part: str) -> None:
        super().__init__(name=part)
        self.part = part

    def one(self, text: str) -> float:
        terms = self.terms(text)
        return 0.0 if terms is None else -terms[self.part == "short words"]


CANDIDATES = (
    Verbosity,
    Readability,
    lambda: FleschPart("short sentences"),
    lambda: FleschPart("short words"),
    Sentiment,
    Relevance,
)


#: the TL;DR task's candidates (``configs/steer_tldr_cpu.yaml`` trains on the first two)
SUMMARY_CANDIDATES = (Conciseness, Coverage, Relevance)


def word_halves(text: str) -> tuple[str, str] | None:
    words = text.split()
    return (" ".join(words[0::2]), " ".join(words[1::2])) if len(words) >= 4 else None


def sentence_halves(text: str) -> tuple[str, str] | None:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    return (" ".join(sentences[0::2]), " ".join(sentences[1::2])) if len(sentences) >= 2 else None


def examples(data: str) -> list[dict]:
    """The training split of ``data`` as the steering recipe reads it, filtered to its token budget."""
    from ric.text.policy import TextPolicy

    if data == "tldr":
        config = rooted(load_config("steer_tldr_cpu"))
    else:
        config = recipe_config(ROOT / "runs" / "steering", {} if data == "hh-rlhf" else quickstart_data(), 0)
    dm = build_data_module(config["data"])
    policy = TextPolicy(**config["model"]["init_args"])
    train, _, _ = dm.split(dm.dataset.load())
    return [r for r in train if policy.accepts(r["prompt"], r["response"])]


def candidates(records: list[dict], makers: tuple = CANDIDATES, split: Any = sentence_halves) -> dict[str, Any]:
    prompts = [str(r["prompt"]) for r in records]
    texts = [str(r["response"]) for r in records]
    halves = [(p, h) for p, t in zip(prompts, texts) if (h := split(t))]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(prompt_key(p), []).append(i)
    pairs = [idx[:2] for idx in groups.values() if len(idx) > 1]
    scores, out = (
        {},
        {"responses": len(records), "prompts_with_2_or_more": len(pairs), "halves": split.__name__, "rewards": {}},
    )
    for make in makers:
        reward = make()
        start = time.perf_counter()
        raw = reward.score(prompts, texts).numpy().astype(float)
        seconds = time.perf_counter() - start
        z = (raw - raw.mean()) / raw.std()
        scores[reward.name] = z
        members = np.array([z[i] for idx in groups.values() if len(idx) > 1 for i in idx])
        within = np.concatenate([z[idx] - z[idx].mean() for idx in groups.values() if len(idx) > 1])
        odd = reward.score([p for p, _ in halves], [h[0] for p, h in halves]).numpy()
        even = reward.score([p for p, _ in halves], [h[1] for p, h in halves]).numpy()
        r = float(np.corrcoef(odd, even)[0, 1])
        out["rewards"][reward.name] = {
            "split_half_r": r,
            "spearman_brown": 2 * r / (1 + r),
            "within_prompt_variance_share": float((within**2).sum() / ((members - members.mean()) ** 2).sum()),
            "mean_abs_difference_within_prompt": float(np.mean([abs(z[a] - z[b]) for a, b in pairs])),
            "seconds_per_1000": 1000 * seconds / len(records),
        }
    out["pearson"], out["pearson_within_prompt_differences"] = {}, {}
    for a, b in itertools.combinations(scores, 2):
        da = np.array([scores[a][i] - scores[a][j] for i, j in pairs])
        db = np.array([scores[b][i] - scores[b][j] for i, j in pairs])
        out["pearson"][f"{a}/{b}"] = float(np.corrcoef(scores[a], scores[b])[0, 1])
        out["pearson_within_prompt_differences"][f"{a}/{b}"] = float(np.corrcoef(da, db)[0, 1])
    return out


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    sets = list(results["data"])
    names = list(results["data"][sets[0]]["rewards"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(sets)
    for i, data in enumerate(sets):
        rw = results["data"][data]["rewards"]
        x = np.arange(len(names)) + i * width
        axes[0].bar(x, [rw[n]["spearman_brown"] for n in names], width, label=data)
        axes[1].bar(x, [rw[n]["within_prompt_variance_share"] for n in names], width, label=data)
    for ax, title in zip(axes, ("split-half reliability (Spearman-Brown)", "variance between responses to one prompt")):
        ax.set_xticks(np.arange(len(names)) + width * (len(sets) - 1) / 2, names)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("hh", "tldr"), default="hh")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"command": command(), "data": {}}
    if args.task == "tldr":
        results["data"]["tldr"] = candidates(examples("tldr"), SUMMARY_CANDIDATES, word_halves)
    else:
        for data in ("hh-rlhf", "quickstart"):
            results["data"][data] = candidates(examples(data))
    print(json.dumps(results["data"], indent=1), flush=True)
    name = "reward_candidates" + ("_tldr" if args.task == "tldr" else "")
    write_results(name, results)
    plot(results, RESULTS / f"{name}.png")
    print(RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()

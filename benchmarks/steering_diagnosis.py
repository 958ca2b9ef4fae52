"""Why readability does not steer on hh-rlhf while verbosity does: what the data gives each reward, and how
much a trained model reads each reward's marker. No generation, so it takes minutes, not hours.

Data (per reward, normalized units, the training split of each data set):
- the share of the variance that lies between the responses to one prompt (what a marker can explain: the
  prompt itself explains the rest);
- the Pearson correlation of the two rewards, over responses and over the differences within a prompt;
- a split-half reliability of each reward (and of sentiment, a candidate replacement): the reward of the odd
  and of the even sentences of a response, correlated (Spearman-Brown corrected). A label that is mostly
  noise cannot be followed.

Model (per checkpoint, held-out responses): the marker effect of reward k is how many nats of the response's
log-likelihood it loses when only reward k's marker is moved from the value the response earned to the far
end of the desired range. Zero means the model ignores that marker.

    .venv/bin/python -m benchmarks.steering_diagnosis \\
        --hh runs/steering/recipe/recipe-seed0/ckpt/step50.ckpt,...step100.ckpt,...step200.ckpt \\
        --control runs/quickstart_text/lightning_logs/version_0/checkpoints/last.ckpt
    .venv/bin/python -m benchmarks.steering_diagnosis --alone readability [--alone-steps 480] [--alone-set decimals=0]
"""

from __future__ import annotations

import argparse
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
    cached,
    command,
    fit,
    load_config,
    pyplot,
    save_figure,
)
from benchmarks.steering import evaluate, quickstart_data, recipe_config, rewards
from ric.data import RelabelDataModule, prompt_key
from ric.text.rewards import Sentiment


def data_modules() -> dict[str, RelabelDataModule]:
    """hh-rlhf as the steering recipe reads it, and the quickstart data (the positive control)."""
    hh = recipe_config(ROOT / "runs" / "steering", {}, 0)
    control = recipe_config(ROOT / "runs" / "steering", quickstart_data(), 0)
    return {"hh-rlhf": build_data_module(hh["data"]), "quickstart": build_data_module(control["data"])}


def grouped(records: list[dict], z: np.ndarray) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(prompt_key(r["prompt"]), []).append(i)
    return [z[idx] for idx in groups.values() if len(idx) > 1]


def split_half_reliability(reward: Any, responses: list[str]) -> dict[str, float]:
    """The reward of the odd vs the even sentences, over responses with at least 2 sentences."""
    odd, even = [], []
    for text in responses:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
        if len(sentences) >= 2:
            odd.append(" ".join(sentences[0::2]))
            even.append(" ".join(sentences[1::2]))
    a, b = (reward.score_batch([""] * len(h), h).numpy() for h in (odd, even))
    r = float(np.corrcoef(a, b)[0, 1])
    return {"split_half_r": r, "spearman_brown": 2 * r / (1 + r), "responses_with_2_sentences": len(odd),
            "share_with_2_sentences": len(odd) / max(1, len(responses))}  # fmt: skip


def data_contrast(dm: RelabelDataModule, policy: Any) -> dict[str, Any]:
    """The training split as ``policy`` accepts it (the examples training sees), scored and normalized."""
    train, _, _ = dm.split(dm.dataset.load())
    train = [r for r in train if policy.accepts(r["prompt"], r["response"])]
    raw = dm.cache.scores(dm.rewards, train, progress=False)
    z = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    groups = grouped(train, z)
    within = np.concatenate([g - g.mean(axis=0) for g in groups])
    members = np.concatenate(groups)
    diffs = np.array([g[0] - g[1] for g in groups])
    names = dm.reward_names
    out: dict[str, Any] = {"responses": len(train), "prompts_with_2_or_more": len(groups), "rewards": {}}
    spread = ((members - members.mean(axis=0)) ** 2).sum(axis=0)
    for k, name in enumerate(names):
        out["rewards"][name] = {
            "within_prompt_variance_share": float((within[:, k] ** 2).sum() / spread[k]),
            "mean_abs_difference_within_prompt": float(np.abs(diffs[:, k]).mean()),
        }
    out["pearson"] = float(np.corrcoef(z[:, 0], z[:, 1])[0, 1])
    out["pearson_within_prompt_differences"] = float(np.corrcoef(diffs[:, 0], diffs[:, 1])[0, 1])
    # verbosity is a count, exact by definition: its split half says how consistent a response's length is
    texts = [str(r["response"]) for r in train]
    out["split_half"] = {r.name: split_half_reliability(r, texts) for r in [*dm.rewards, Sentiment()]}
    return out


def held_out_records(dm: RelabelDataModule, n_prompts: int) -> list[dict]:
    records = dm.dataset.load()
    _, _, test = dm.split(records)
    keep = {prompt_key(p) for p in test[:n_prompts]}
    return [r for r in records if prompt_key(r["prompt"]) in keep]


def marker_effects_of(ckpt: Path, dm: RelabelDataModule, n_prompts: int) -> dict[str, Any]:
    """:func:`ric.marker_effects.marker_effects` of a checkpoint on the held-out responses it accepts."""
    import ric
    from ric.marker_effects import marker_effects

    policy = ric.load(ckpt)
    blank = np.zeros(len(policy.reward_space.reward_names))  # responses that fit whole after their markers
    records = [r for r in held_out_records(dm, n_prompts)
               if policy.accepts(policy.training_prompt(r["prompt"], blank), r["response"])]  # fmt: skip
    start = time.perf_counter()
    effects = marker_effects(policy, [r["prompt"] for r in records], [str(r["response"]) for r in records])
    return {"checkpoint": str(ckpt), "prompts": n_prompts, "responses": len(records), "rewards": effects,
            "seconds": time.perf_counter() - start}  # fmt: skip


def quickstart_alone(
    reward: str, steps: int | None = None, model: dict[str, Any] | None = None, out: Path | None = None
) -> list[Path]:
    """The README's text quickstart (``configs/quickstart_text.yaml``) trained with ``reward`` alone (no sweep),
    once: its marker effect beside the two-reward quickstart's says whether a marker is ignored on its own or
    crowded out by the other. ``steps`` trains longer than the quickstart's 120, with a checkpoint every 120
    steps (a curve); ``model`` overrides the policy's settings (e.g. ``decimals``: how the value is written);
    runs go under ``out`` (default ``runs/steering/alone``)."""
    tag = "".join(f"-{k}={v}" for k, v in (model or {}).items()) + (f"-{steps}steps" if steps else "")
    folder = (out or ROOT / "runs" / "steering" / "alone") / f"quickstart-{reward}{tag}"
    saved = [folder / "checkpoints" / f"step{n}.ckpt" for n in range(120, steps + 1, 120)] if steps else []
    callbacks = []
    for c in load_config("quickstart_text")["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"]["dirpath"] = str(folder / "checkpoints")
            if steps:
                c["init_args"].update(filename="step{step}", every_n_train_steps=120, save_top_k=-1,
                                      auto_insert_metric_name=False)  # fmt: skip
        if not c["class_path"].endswith("PreferenceSweep"):
            callbacks.append(c)
    overrides = {"trainer.default_root_dir": str(folder), "trainer.logger": False, "trainer.callbacks": callbacks,
                 **({"trainer.max_steps": steps} if steps else {}), **rewards(reward),
                 **{f"model.init_args.{k}": v for k, v in (model or {}).items()}}  # fmt: skip
    fit(folder, load_config("quickstart_text", overrides), record={"steps": steps})
    return saved or [folder / "checkpoints" / "last.ckpt"]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 2.6]})
    sets = list(results["data"])
    names = list(results["data"][sets[0]]["rewards"])
    width = 0.35
    for i, name in enumerate(names):
        axes[0].bar(np.arange(len(sets)) + i * width, [results["data"][s]["rewards"][name]
                    ["within_prompt_variance_share"] for s in sets], width, label=name)  # fmt: skip
    axes[0].set_xticks(np.arange(len(sets)) + width / 2, sets)
    axes[0].set_title("variance between responses to one prompt (share)")
    axes[0].legend()
    rows = results["models"]
    labels = [m["label"] for m in rows]
    for i, name in enumerate(names):
        effect = [m["rewards"].get(name, {"nats_mean": np.nan, "nats_sem": 0.0}) for m in rows]  # (one-reward models)
        axes[1].bar(np.arange(len(rows)) + i * width, [e["nats_mean"] for e in effect], width,
                    yerr=[e["nats_sem"] for e in effect], capsize=3, label=name)  # fmt: skip
    axes[1].set_xticks(np.arange(len(rows)) + width / 2, labels, rotation=35, ha="right", fontsize=8)
    axes[1].set_title("marker effect: nats lost when one marker is moved")
    axes[1].axhline(0, color="grey", lw=1)
    axes[1].legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hh", default="", help="comma-separated checkpoints trained on hh-rlhf")
    parser.add_argument("--control", default="", help="comma-separated checkpoints trained on the quickstart data")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts per checkpoint (all responses)")
    parser.add_argument("--alone", default="", help="also train the quickstart with this reward alone, and measure it")
    parser.add_argument("--alone-steps", type=int, default=None, help="train it this long (a checkpoint every 120)")
    parser.add_argument("--alone-set", action="append", default=[], metavar="KEY=VALUE", help="a policy setting")
    parser.add_argument("--steer", default="", help="DATA:CKPT,... (DATA: hh-rlhf or quickstart): also steer these "
                        "at the benchmark's 5 points (one reward: its desired value swept over the range)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out prompt when steering")
    args = parser.parse_args(argv)
    import yaml

    import ric

    if args.alone:
        settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.alone_set)}
        alone = [str(p) for p in quickstart_alone(args.alone, args.alone_steps, settings)]
        args.control = ",".join(p for p in (args.control, *alone) if p)

    target = RESULTS / "steering_diagnosis.json"
    before = json.loads(target.read_text()) if target.is_file() else {}
    earlier = before.get("models", [])
    done = {(m["checkpoint"], m.get("prompts")): m for m in earlier}  # a measured checkpoint is not measured again
    dms = data_modules()
    # earlier measurements stay in the results (their checkpoints may be gone); this run's replace their twins
    commands = before.get("commands", [before["command"]] if "command" in before else [])
    results: dict[str, Any] = {
        "commands": [*commands, command()],
        "data": before.get("data", {}),
        "models": list(earlier),
    }
    for data, paths in (("hh-rlhf", args.hh), ("quickstart", args.control)):
        paths = [p for p in paths.split(",") if p]
        if not paths:
            continue
        results["data"][data] = data_contrast(dms[data], ric.load(paths[0]))
        print(data, json.dumps(results["data"][data], indent=1), flush=True)
        for path in paths:
            key = (path, args.prompts)
            effect = done.get(key) or marker_effects_of(Path(path), dms[data], args.prompts)
            effect["data"], effect["label"] = data, f"{data}: {Path(path).parent.parent.name}/{Path(path).stem}"
            results["models"] = [m for m in results["models"] if (m["checkpoint"], m.get("prompts")) != key]
            results["models"].append(effect)
            print(json.dumps(effect, indent=1), flush=True)
    # steering by generation (the benchmark's evaluation: 5 points, its sampling, one seed) where a marker is read
    results.setdefault("steered", before.get("steered", {}))
    for item in [i for i in args.steer.split(",") if i]:
        data, path = item.split(":", 1)
        dm = dms[data]
        prompts = dm.split(dm.dataset.load())[2][: args.prompts]
        tag = f"steer-p{len(prompts)}x{args.samples}.json"
        evaluation = cached(Path(path).with_suffix("." + tag), evaluate, Path(path), prompts, args.samples, 0)
        results["steered"][f"{data}: {Path(path).parent.parent.name}/{Path(path).stem}"] = evaluation
        print(path, json.dumps(evaluation["steering"]), evaluation["obtained"], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    if results["data"]:
        plot(results, RESULTS / "steering_diagnosis.png")
        print(RESULTS / "steering_diagnosis.png")


if __name__ == "__main__":
    main()

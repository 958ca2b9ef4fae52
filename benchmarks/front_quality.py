"""Front quality on hh-rlhf (harmless-base): base model vs plain SFT vs RiC offline vs RiC + 1 online
round vs the RL baselines (MORLHF at 3 preferences, Rewarded Soups with 2 experts, both GRPO on TRL), with
the cost of each, and the mapping ablation (linear vs p = 2 vs p = inf) on the RiC model.

SmolLM2-135M-Instruct with the quickstart's offline rewards (verbosity, readability), data from
``../shared/data/hh-rlhf``. Every arm is evaluated on the same held-out prompts; hypervolumes share one
reference point. Expected from the paper: online > offline > SFT / base, and p = 2 ~ p = inf > linear.

    .venv/bin/python benchmarks/front_quality.py --scale cpu --out runs/front_quality   # about 35 min on 2 cores
    .venv/bin/python benchmarks/front_quality.py --scale gpu --out runs/front_quality   # minutes on one GPU
    .venv/bin/python benchmarks/front_quality.py --scale smoke                          # wiring check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ric.cli import RiCCLI
from ric.compare import compare

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SCALES = {
    # dialogues, offline steps, online steps, online generations, held-out prompts, new tokens
    # (and GRPO steps per baseline policy)
    "smoke": dict(
        limit=200, offline=4, online=2, generations=16, test_prompts=6, new_tokens=16, accelerator="cpu", rl_steps=2
    ),
    "cpu": dict(
        limit=1000,
        offline=100,
        online=40,
        generations=192,
        test_prompts=24,
        new_tokens=48,
        accelerator="cpu",
        rl_steps=40,
    ),
    "gpu": dict(
        limit=2312,
        offline=2000,
        online=500,
        generations=4096,
        test_prompts=200,
        new_tokens=128,
        accelerator="gpu",
        rl_steps=500,
    ),
}


def config(out: Path, s: dict, *, conditioned: bool = True, online: bool = False, steps: int | None = None) -> dict:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(out / "ckpt"), "save_last": True},
        }
    ]
    if online:
        callbacks.append(
            {
                "class_path": "ric.online.OnlineLoop",
                "init_args": {
                    "iterations": 1,
                    "steps_per_iteration": s["online"],
                    "prompts_per_iteration": s["generations"],
                    "learning_rate": 1e-4,
                    "buffer_dir": str(out / "online"),
                    "chunk_size": 64,
                    "sampling": {"max_new_tokens": s["new_tokens"]},
                },
            }
        )
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": s["accelerator"], "devices": 1, "max_steps": steps or s["offline"], "logger": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "default_root_dir": str(out),
                    "callbacks": callbacks},
        "model": {"class_path": "ric.text.policy.TextPolicy", "init_args": {
            "model": "smollm2", "reward_names": ["verbosity", "readability"],
            "template": "{prompt} {rewards}\n\nAssistant:", "conditioned": conditioned,
            "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-3, "warmup_steps": 10,
            "max_length": 256, "max_tokens": 256, "max_new_tokens": s["new_tokens"],
            "dtype": "bfloat16" if s["accelerator"] == "gpu" else "float32", "generation_batch_size": 64}},
        "data": {"dataset": {"class_path": "ric.text.datasets.HHRLHF",
                             "init_args": {"path": str(HH), "limit": s["limit"]}},
                 "rewards": [{"class_path": "ric.text.rewards.Verbosity"},
                             {"class_path": "ric.text.rewards.Readability"}],
                 "batch_size": 8, "val_fraction": 0.0, "test_fraction": 0.1, "max_test_prompts": s["test_prompts"],
                 "cache_dir": str(ROOT / ".ric_cache"), "output_dir": str(out), "reward_range": "data",
                 "range_quantiles": [0.05, 0.95]},
    }  # fmt: skip


def sweep_callback(out: Path, s: dict, method: str, unconditioned: bool = False, **extra: object) -> dict:
    return {"class_path": "ric.evaluation.PreferenceSweep", "init_args": {
        "num_points": 5, "method": method, "unconditioned": unconditioned, "output_dir": str(out),
        "label": out.name, "sampling": {"temperature": 0.7, "max_new_tokens": s["new_tokens"]}, **extra}}  # fmt: skip


def sweep_args(out: Path, s: dict, method: str, unconditioned: bool = False) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps(sweep_callback(out, s, method, unconditioned))]


def baseline(name: str, out: Path, s: dict) -> Path:
    """MORLHF or Rewarded Soups with the RiC arm's policy settings, data and sampling; returns its sweep."""
    from ric.baselines.methods import main as run_baseline

    dest = out / "sweeps" / name
    if (dest / "metrics.json").exists():
        print(f"skipping: {dest / 'metrics.json'} exists")
        return dest
    ric = config(out / name, s)
    policy = {k: v for k, v in ric["model"]["init_args"].items() if k not in ("reward_names", "conditioned")}
    three = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    cfg = {
        "policy": policy,
        "data": {"class_path": "ric.data.RelabelDataModule", "init_args": ric["data"]},
        "grpo": {"steps": s["rl_steps"], "max_new_tokens": s["new_tokens"], "save_steps": max(1, s["rl_steps"] // 4)},
        "sweep": sweep_callback(dest, s, "p_inf", **({"preferences": three} if name == "morlhf" else {})),
        "output_dir": str(out / name),
    }
    path = out / name / "baseline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    if run_baseline([name, "--config", str(path)]) != 0:
        raise RuntimeError(f"ric baseline {name} failed")
    return dest


def run(args: list[str], done: Path | None = None) -> None:
    """Run one CLI step unless ``done`` exists (a re-run of the benchmark continues where it stopped)."""
    if done is not None and done.exists():
        print(f"skipping: {done} exists")
        return
    RiCCLI(args=args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "front_quality")
    args = parser.parse_args()
    s, out = SCALES[args.scale], args.out.resolve()
    if not HH.is_file():
        raise FileNotFoundError(f"hh-rlhf data not found at {HH} (../shared/data beside the checkout)")
    arms = {}

    def write(name: str, cfg: dict) -> Path:
        path = out / name / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        return path

    def sweep(name: str, cfg: Path, method: str, ckpt: Path | None = None, unconditioned: bool = False) -> Path:
        dest = out / "sweeps" / name
        ckpt_args = ["--ckpt_path", str(ckpt)] if ckpt else []
        run(["test", "--config", str(cfg), *ckpt_args, *sweep_args(dest, s, method, unconditioned)],
            done=dest / "metrics.json")  # fmt: skip
        return dest

    base = write("base", config(out / "base", s, conditioned=False))
    arms["base"] = sweep("base", base, "p_inf", unconditioned=True)

    sft = write("sft", config(out / "sft", s, conditioned=False))
    run(["fit", "--config", str(sft)], done=out / "sft" / "ckpt" / "last.ckpt")
    arms["plain SFT"] = sweep("sft", sft, "p_inf", out / "sft" / "ckpt" / "last.ckpt", unconditioned=True)

    ric = write("ric", config(out / "ric", s))
    ric_ckpt = out / "ric" / "ckpt" / "last.ckpt"
    run(["fit", "--config", str(ric)], done=ric_ckpt)
    for method in ("linear", "p_norm", "p_inf"):
        sweep(f"ric_{method}", ric, method, ric_ckpt)
    arms["RiC offline"] = out / "sweeps" / "ric_p_inf"

    # the online arm continues from the offline checkpoint: the same offline steps, then one round; a killed
    # online run resumes from its own last checkpoint and reuses the samples already in its buffer
    online = write("online", config(out / "online", s, online=True))
    online_ckpt = out / "online" / "ckpt" / "last.ckpt"
    online_done = out / "online" / "ckpt" / f"step={s['offline'] + s['online']}.done"
    run(["fit", "--config", str(online), "--ckpt_path", str(online_ckpt if online_ckpt.exists() else ric_ckpt)],
        done=online_done)  # fmt: skip
    online_done.touch()
    arms["RiC + 1 online"] = sweep("online", online, "p_inf", online_ckpt)

    # control: offline training for as many steps as the online arm took in all
    long = write("ric_long", config(out / "ric_long", s, steps=s["offline"] + s["online"]))
    long_ckpt = out / "ric_long" / "ckpt" / "last.ckpt"
    run(["fit", "--config", str(long)], done=long_ckpt)
    arms["RiC offline, same steps"] = sweep("ric_long", long, "p_inf", long_ckpt)

    arms["MORLHF (3 policies)"] = baseline("morlhf", out, s)
    arms["Rewarded Soups"] = baseline("soups", out, s)

    main_cmp = compare(list(arms.values()), list(arms), out / "compare_methods")
    maps = {"linear": "ric_linear", "p = 2": "ric_p_norm", "p = inf": "ric_p_inf"}
    map_cmp = compare([out / "sweeps" / v for v in maps.values()], list(maps), out / "compare_mappings")
    hv = {r["run"]: r["hypervolume"] for r in main_cmp["runs"]}
    hm = {r["run"]: r["hypervolume"] for r in map_cmp["runs"]}
    print("\narm                        hypervolume  train s  generated  reward calls")
    for r in main_cmp["runs"]:
        cells = [f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("train_seconds", "generated_samples",
                                                                             "reward_calls")]  # fmt: skip
        print(f"{r['run']:<27}{r['hypervolume']:>11.4f}{cells[0]:>9}{cells[1]:>11}{cells[2]:>14}")
    print("\nmapping             hypervolume")
    for name, value in hm.items():
        print(f"{name:<20}{value:.4f}")
    checks = {
        "online > offline": hv["RiC + 1 online"] > hv["RiC offline"],
        "online > offline with the same steps": hv["RiC + 1 online"] > hv["RiC offline, same steps"],
        "offline > SFT and base": hv["RiC offline"] > max(hv["plain SFT"], hv["base"]),
        "p=2 and p=inf > linear": min(hm["p = 2"], hm["p = inf"]) > hm["linear"],
    }
    for name, ok in checks.items():
        print(f"{name}: {'held' if ok else 'did not hold'}")
    (out / "front_quality.json").write_text(
        json.dumps(
            {"scale": args.scale, "arms": hv, "runs": main_cmp["runs"], "mappings": hm, "expectations": checks},
            indent=2,
        )  # fmt: skip
    )
    print(out / "compare_methods" / "front.png")


if __name__ == "__main__":
    main()

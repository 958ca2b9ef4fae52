"""The experiments compose the shipped configs with overrides instead of restating them: every config a study
runs is the one it ran when its settings lived in its own dicts (``tests/data/benchmark_configs_before.json``,
recorded from that code), setting for setting once each class's defaults are filled in; only where a run
writes may differ."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import experiment, front_quality, sd_noise, sd_paper_arch, steering, steering_diagnosis

ROOT = Path(__file__).resolve().parents[1]
BEFORE: dict[str, dict] = json.loads((ROOT / "tests" / "data" / "benchmark_configs_before.json").read_text())
#: what a section of a ``ric fit`` config builds (the sections without a ``class_path``)
SECTIONS = {"trainer": "lightning.pytorch.Trainer", "data": "ric.data.RelabelDataModule"}


def with_defaults(class_path: str, args: dict) -> dict:
    """``args`` with every other parameter of the class at its default (what jsonargparse hands the class)."""
    module, _, name = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    defaults = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}  # fmt: skip
    return {**defaults, **args}


def resolved(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: resolved(v) for k, v in node.items()}
        if "class_path" in node:
            node["init_args"] = with_defaults(node["class_path"], node.get("init_args") or {})
        return node
    return [resolved(v) for v in node] if isinstance(node, list | tuple) else node


def normalized(config: dict, paths: dict[str, str]) -> dict[str, Any]:
    """Dotted key -> value of a config with its classes' defaults filled in, its run folders named as in the
    recording (``paths``: this run's folder -> the recorded one) and the checkout's root as ``<root>``."""
    config = resolved(config)
    for section, class_path in SECTIONS.items():
        if isinstance(config.get(section), dict) and "class_path" not in config[section]:
            config[section] = with_defaults(class_path, config[section])
    if "policy" in config:  # a baseline's policy: TextPolicy's settings
        config["policy"] = with_defaults("ric.text.policy.TextPolicy", config["policy"])
    text = json.dumps(config, default=repr)
    paths = {**paths, str(ROOT.parent / "shared"): "<root>/../shared", str(ROOT): "<root>"}
    for path, name in sorted(paths.items(), key=lambda p: -len(p[0])):
        text = text.replace(path, name)
    return experiment.flatten(json.loads(text))


def assert_same(key: str, config: dict, paths: dict[str, str] | None = None) -> None:
    before = normalized(BEFORE[key], {})
    now = normalized(config, paths or {})
    differ = {k: (before.get(k, "<absent>"), now.get(k, "<absent>")) for k in before.keys() | now.keys()
              if before.get(k, "<absent>") != now.get(k, "<absent>")}  # fmt: skip
    assert not differ, f"{key}: (before, now) {differ}"


@pytest.fixture
def ric_fit(monkeypatch):
    """Every ``ric fit`` (and ``ric export``) an experiment starts, recorded instead of run: the configs."""
    fits: list[dict] = []

    def run(cmd: list[str], **kwargs) -> None:
        if "export" in cmd:
            Path(cmd[-1]).mkdir(parents=True, exist_ok=True)
            (Path(cmd[-1]) / "ric.json").write_text("{}")
        else:
            fits.append(yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text()))

    monkeypatch.setattr(subprocess, "run", run)
    return fits


@pytest.mark.parametrize("smoke", [False, True])
def test_studies_run_the_recorded_configs(smoke, ric_fit, monkeypatch, tmp_path):
    tag = "steering-smoke" if smoke else "steering"
    recorded = {tuple(k.split("/", 2)[1:]) for k in BEFORE if k.startswith(tag + "/")}
    planned = set()
    for study in steering.STUDIES:
        for run in steering.planned(study, Path("/RUN"), [3], smoke):
            planned.add((study, run["variant"]))
            assert_same(f"{tag}/{study}/{run['variant']}", run["config"],
                        {str(run["folder"]): f"/RUN/{study}/{run['variant']}"})  # fmt: skip
    assert planned == recorded - {("online", "+1 online round")}

    # the online round continues the recipe's final checkpoint
    if smoke:
        monkeypatch.setitem(steering.EVAL, "max_new_tokens", 16)
    overrides = {**steering.RECIPE, **(steering.SMOKE if smoke else {})}
    online = tmp_path / "online"
    steps = overrides["trainer.max_steps"]
    steering.online_round(tmp_path / "last.ckpt", online, overrides, 0, steps)
    assert_same(f"{tag}/online/+1 online round", ric_fit[-1], {str(online): "/RUN"})


@pytest.mark.parametrize("scale", ["cpu", "gpu", "smoke"])
def test_front_quality_arms_run_the_recorded_configs(scale, ric_fit, monkeypatch, tmp_path):
    tests, baselines = [], []
    monkeypatch.setattr(front_quality, "run_cli", lambda args: tests.append(yaml.safe_load(Path(args[2]).read_text())))

    def run_baseline(argv: list[str]) -> int:
        baselines.append((argv[0], json.loads(Path(argv[2]).read_text())))
        return 0

    monkeypatch.setattr("ric.baselines.methods.main", run_baseline)
    monkeypatch.setitem(steering.EVAL, "max_new_tokens", 16 if scale == "smoke" else 128)
    out = tmp_path / "seed1"
    front_quality.run_seed(out, front_quality.SCALES[scale], 1)
    paths = {str(out): "/RUN"}
    assert len(ric_fit) == 3 and len(tests) == 3 and len(baselines) == 2
    for name, config in zip(("sft", "ric", "online"), ric_fit):
        assert_same(f"front_quality/{scale}/fit/{name}", config, paths)
    for config in tests:
        assert_same(f"front_quality/{scale}/test/{config['trainer']['callbacks'][0]['init_args']['label']}", config,
                    paths)  # fmt: skip
    for name, config in baselines:
        assert_same(f"front_quality/{scale}/baseline/{name}", config, paths)


def test_diagnoses_read_the_recorded_data():
    """reward_candidates and steering_diagnosis read the recipe's data and the control's, as the studies train."""
    folder = ROOT / "runs" / "steering"
    for data, overrides in (("hh-rlhf", {}), ("quickstart", steering.quickstart_data())):
        config = steering.recipe_config(folder, overrides, 0)
        assert_same(f"diagnosis/{data}", {"data": config["data"], "model": config["model"]})


def test_quickstart_alone_runs_the_recorded_configs(ric_fit, tmp_path):
    steering_diagnosis.quickstart_alone("readability", out=tmp_path)
    steering_diagnosis.quickstart_alone("readability", 480, {"decimals": 0}, out=tmp_path)
    assert_same("steering_diagnosis/alone/plain", ric_fit[0], {str(tmp_path): "/RUN"})
    assert_same("steering_diagnosis/alone/480steps-decimals0", ric_fit[1], {str(tmp_path): "/RUN"})


def test_image_studies_run_the_recorded_configs(tmp_path):
    for name in sd_noise.VARIANTS:
        assert_same(f"sd_noise/{name}", sd_noise.variant_config(name, Path("/RUN")))
    for train_text_encoder in (False, True):
        work = tmp_path / str(train_text_encoder)
        config = yaml.safe_load(sd_paper_arch.run_config(Path("/MODEL"), work, train_text_encoder).read_text())
        assert_same(f"sd_paper_arch/train_text_encoder={train_text_encoder}", config, {str(work): "/RUN"})


def test_the_comparison_sees_a_changed_setting():
    """A variant that changed a setting, or left one at another default, is caught."""
    run = steering.planned("lr", Path("/RUN"), [3])[0]
    paths = {str(run["folder"]): "/RUN/lr/lr=5e-4"}
    changed = experiment.override(run["config"], {"model.init_args.learning_rate": 1e-3})
    with pytest.raises(AssertionError, match="learning_rate"):
        assert_same("steering/lr/lr=5e-4", changed, paths)
    defaulted = experiment.override(run["config"], {"model.init_args.lora_target_modules": ["q_proj"]})
    with pytest.raises(AssertionError, match="lora_target_modules"):
        assert_same("steering/lr/lr=5e-4", defaulted, paths)


def test_overrides_are_dotted_and_replace_what_they_name():
    base = {"model": {"init_args": {"lr": 1, "keep": 2}}, "trainer": {"callbacks": [1, 2]}}
    out = experiment.override(base, {"model.init_args.lr": 3, "trainer.callbacks": [], "data.seed": 0})
    assert out == {"model": {"init_args": {"lr": 3, "keep": 2}}, "trainer": {"callbacks": []}, "data": {"seed": 0}}
    assert base["model"]["init_args"]["lr"] == 1  # the input is left as it was
    assert experiment.get(out, "model.init_args.keep") == 2 and experiment.get(out, "a.b", None) is None
    with pytest.raises(KeyError):
        experiment.get(out, "model.init_args.missing")
    shipped = experiment.load_config("steer_hh_cpu", {"trainer.max_steps": 7})
    assert shipped["trainer"]["max_steps"] == 7 and shipped["model"]["init_args"]["lora_r"] == 16


def test_a_finished_run_is_not_run_again(ric_fit, tmp_path):
    config = experiment.load_config("steer_hh_cpu", {"trainer.callbacks": [experiment.checkpoints(tmp_path, 5)]})
    experiment.fit(tmp_path, config, record={"steps": 200})
    assert len(ric_fit) == 1 and ric_fit[0] == json.loads(json.dumps(config))
    assert json.loads((tmp_path / "trained.json").read_text())["steps"] == 200
    experiment.fit(tmp_path, config)
    assert len(ric_fit) == 1
    assert experiment.saved_config(tmp_path) == ric_fit[0]


def test_guidance_study_quality_guard_and_choice_rule():
    from benchmarks.guidance import choose, degenerate

    assert degenerate("") and degenerate("   ")
    assert degenerate("water it well water it well water it well water it well and then stop")  # a loop
    assert not degenerate("A frog is a type of frog, a toad is a type of toad, and a frog is a type of toad.")
    assert degenerate("Keep the soil moist. <R1> 0.3") and degenerate("Use a watering can. -1.0")  # leaked markers
    assert not degenerate("Water it twice a week, about 2 cups each time.")
    steering = {"a": {"spearman": 1.0, "spread_ratio": 0.4}, "b": {"spearman": 0.95, "spread_ratio": 0.2}}
    cells = [
        {"guidance": 0.0, "reference": None, "degenerate": 0.0, "steering": steering},
        {"guidance": 1.0, "reference": "neutral", "degenerate": 0.02,
         "steering": {"a": {"spearman": 1.0, "spread_ratio": 0.9}, "b": {"spearman": 0.9, "spread_ratio": 0.5}}},
        {"guidance": 4.0, "reference": "neutral", "degenerate": 0.2,  # spreads most, but degenerate
         "steering": {"a": {"spearman": 1.0, "spread_ratio": 2.0}, "b": {"spearman": 1.0, "spread_ratio": 1.0}}},
        {"guidance": 2.0, "reference": "mirror", "degenerate": 0.0,  # spreads, but a reward falls out of order
         "steering": {"a": {"spearman": 1.0, "spread_ratio": 1.5}, "b": {"spearman": 0.5, "spread_ratio": 0.9}}},
    ]  # fmt: skip
    assert choose(cells)["guidance"] == 1.0
    assert choose([cells[0], *cells[2:]])["guidance"] == 0.0  # g = 0 is a setting too
    noisy = [{**cells[0], "degenerate": 0.18}, *cells[1:]]  # the guard is relative to g = 0's own share
    assert choose(noisy)["guidance"] == 4.0

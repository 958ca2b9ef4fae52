"""What the experiments in ``benchmarks/`` share: a shipped config of ``configs/`` with dotted overrides, run
through the library's own ``ric fit`` beside its results, finished runs and evaluations kept, results and
plots written the same way.

A study's variant is a dict of overrides of a shipped config rather than a restatement of it, so what a study
measures is what a user runs. Run the experiments from the checkout's root (``python -m benchmarks.<name>``).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RESULTS = ROOT / "benchmarks" / "results"
#: the preferences every sweep of a two-reward study is evaluated at
PREFERENCES = [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
#: relative paths of a config that the library reads from the working directory: made absolute for runs
PATH_KEYS = ("data.cache_dir", "data.dataset.init_args.path")
_MISSING = object()


def config_path(name: str | Path) -> Path:
    """A shipped config by name (``steer_hh_cpu``) or any config file by path."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml", ".json") else CONFIGS / f"{name}.yaml"


def load_config(name: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config ``name`` (see :func:`config_path`) with ``overrides`` applied (:func:`override`)."""
    return override(yaml.safe_load(config_path(name).read_text()), overrides or {})


def override(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each dotted key of ``overrides`` set in order (``"trainer.max_steps": 200``).

    A value replaces what the key held, a dict or list included; nested settings merge only through their own
    dotted keys, so a variant says exactly what it changes."""
    config = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = copy.deepcopy(value)
    return config


def get(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """The value at a dotted key; ``default`` where a part is missing (a KeyError without one)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (lists are leaves): two configs compared key by key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rooted(config: dict[str, Any], keys: Iterable[str] = PATH_KEYS) -> dict[str, Any]:
    """``config`` with the relative paths at ``keys`` made absolute from the checkout's root (where the shipped
    configs are meant to run), so a run reads the same data and cache whatever the working directory."""
    updates = {}
    for key in keys:
        value = get(config, key, None)
        if isinstance(value, str) and not Path(value).is_absolute():
            updates[key] = str((ROOT / value).resolve())
    return override(config, updates)


def checkpoints(folder: Path, every: int) -> dict[str, Any]:
    """A ModelCheckpoint keeping a checkpoint every ``every`` steps (``step<N>.ckpt``) and the last one, in
    ``folder/ckpt``; also where a stop (SIGTERM) ends training, so a killed run resumes from there."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(folder / "ckpt"), "filename": "step{step}", "every_n_train_steps": every,
                          "save_top_k": -1, "save_last": True, "auto_insert_metric_name": False,
                          "save_on_exception": True}}  # fmt: skip


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """``config`` as YAML at ``path`` (the file ``ric fit --config`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False))
    return path


def saved_config(folder: Path) -> dict[str, Any]:
    """The config a run in ``folder`` was started with (``run.yaml``; ``run.json`` in runs made before it)."""
    for name in ("run.yaml", "run.json"):
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text())
    raise FileNotFoundError(f"no run.yaml in {folder}")


def fit(folder: Path, config: Mapping[str, Any], ckpt_path: str | Path | None = None,
        record: Mapping[str, Any] | None = None) -> float:  # fmt: skip
    """``ric fit --config folder/run.yaml`` in a subprocess from the checkout's root, unless the run finished
    before (``folder/trained.json``, written with the seconds it took and ``record``); returns those seconds.

    A run killed after a checkpoint resumes from its last one; otherwise it starts from ``ckpt_path``."""
    done = folder / "trained.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    path = write_config(folder / "run.yaml", config)
    resume = any((Path(d) / "last.ckpt").is_file() for d in checkpoint_dirs(config))
    start_from = "last" if resume else ckpt_path
    cmd = [sys.executable, "-m", "ric.cli", "fit", "--config", str(path)]
    start = time.perf_counter()
    subprocess.run(cmd + (["--ckpt_path", str(start_from)] if start_from else []), check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"seconds": seconds, **(record or {})}))
    return seconds


def checkpoint_dirs(config: Mapping[str, Any]) -> list[str]:
    """The folders the config's ModelCheckpoint callbacks write to (where they name one)."""
    callbacks = get(config, "trainer.callbacks", None) or []
    return [c["init_args"]["dirpath"] for c in callbacks
            if c["class_path"].endswith("ModelCheckpoint") and (c.get("init_args") or {}).get("dirpath")]  # fmt: skip


def cached(path: Path, compute: Callable[..., dict], *args: Any) -> dict:
    """``compute(*args)``, kept in ``path``: a finished evaluation is not run again."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute(*args)
    path.write_text(json.dumps(value, indent=2))
    return value


def sweep_callback(
    dest: Path, seed: int, samples: int, sampling: Mapping[str, Any], **init_args: Any
) -> dict[str, Any]:
    """The ``PreferenceSweep`` callback a study evaluates a run with: the study's preferences, ``samples``
    answers per prompt, written to ``dest`` and labeled with its name."""
    return {"class_path": "ric.evaluation.PreferenceSweep", "init_args": {
        "preferences": PREFERENCES, "samples_per_prompt": samples, "seed": seed, "sampling": dict(sampling),
        "output_dir": str(dest), "label": dest.name, **init_args}}  # fmt: skip


def export_once(ckpt: Path, export: Path) -> Path:
    """``ric export`` of ``ckpt`` (its LoRA merged) into ``export``, unless a finished export is there; a
    killed export, without its ``ric.json``, is written again."""
    if not (export / "ric.json").is_file():
        shutil.rmtree(export, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ric.cli", "export", str(ckpt), str(export)], check=True, cwd=ROOT)
    return export


def run_dir(out: Path, study: str, name: str, seed: int) -> Path:
    """The folder of one variant and seed of a study (the variant's name made safe for a path)."""
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in name)
    return out / study / f"{safe}-seed{seed}"


def seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (the ``--seeds`` of every study)."""
    return [int(v) for v in text.split(",") if v.strip()]


def command() -> str:
    """The command line that produced a result, recorded beside it."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def write_results(name: str, results: Mapping[str, Any]) -> Path:
    """``results`` as ``benchmarks/results/<name>.json`` (numpy numbers written as floats)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def build_data_module(config: Mapping[str, Any]) -> Any:
    """A ``RelabelDataModule`` from the ``data`` section of a ``ric fit`` config (no model is loaded)."""
    import importlib

    from ric.data import RelabelDataModule

    def build(spec: Mapping[str, Any]) -> Any:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))

    settings = {k: v for k, v in config.items() if k not in ("dataset", "rewards")}
    return RelabelDataModule(build(config["dataset"]), [build(r) for r in config["rewards"]], **settings)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (the experiments run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def diagonal(ax: Any, lo: float, hi: float) -> None:
    """The line where an obtained reward equals the desired one, from ``lo`` to ``hi``."""
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="obtained = desired")

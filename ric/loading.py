"""``ric.load``: a trained policy, ready to steer, from an export folder or a Lightning checkpoint.

Both record the policy class and its settings (``ric.json`` in a folder, the ``ric`` entry and the
hyper-parameters in a checkpoint), so text and diffusion models load the same way. :func:`read_model_info`
reads only that metadata (no weights), so a command can check its inputs before loading anything.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ric.interfaces import METADATA_SCHEMA, ConditionalPolicy, read_reward_space
from ric.space import RewardSpace

log = logging.getLogger(__name__)

#: ``ric.json`` schema versions this ric reads
KNOWN_SCHEMAS = (1, METADATA_SCHEMA)


class ModelFileError(ValueError):
    """A path that is not a usable ric model (missing, truncated, not a checkpoint, no metadata)."""


class UntrustedCheckpointError(ModelFileError):
    """A checkpoint that holds a Python object ric's own checkpoints never hold: unpickling it could run
    code, so it is opened only when the user says they trust it."""


#: how the user says they trust a checkpoint, per entry point (named in the refusal)
TRUST_HINT = "--trust-checkpoint on the command line, ric.load(..., trust=True) in Python, --weights_only false for fit"


def open_checkpoint(path: Path, trust: bool = False) -> Any:
    """A checkpoint's contents, memory-mapped (the tensors are read when used). Opened with torch's
    ``weights_only`` unpickler, which builds tensors, numbers, strings and containers and nothing else (all
    that ric's checkpoints hold), unless ``trust`` opens it the old way, which runs whatever it holds."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if not found:  # not a refused type: a damaged file, reported by the caller
            raise
        raise UntrustedCheckpointError(
            f"checkpoint {path} holds the Python object {found.group(1)}, which ric's own checkpoints never do: "
            "opening it could run code. "
            f"If you trust where it came from, open it anyway ({TRUST_HINT})"
        ) from None


@dataclass
class ModelInfo:
    """What a model path holds, without its weights: its kind, metadata and (for checkpoints) the run's
    config found beside it."""

    path: Path
    kind: str  # "export" or "checkpoint"
    meta: dict[str, Any]
    class_path: str
    init_args: dict[str, Any]
    checkpoint: dict[str, Any] | None = None
    config_path: Path | None = None

    @property
    def reward_names(self) -> list[str]:
        return list((self.meta.get("conditioning") or {}).get("reward_names") or self.init_args.get("reward_names", []))

    @property
    def reward_space(self) -> RewardSpace | None:
        return read_reward_space(self.meta, self.reward_names or None)

    @property
    def conditioned(self) -> bool:
        return bool(self.meta.get("conditioned", self.init_args.get("conditioned", True)))


def read_model_info(path: str | Path, trust: bool = False) -> ModelInfo:
    """The metadata of an export folder or a checkpoint file, or a :class:`ModelFileError` naming the
    file and what is wrong with it. A checkpoint holding more than tensors and plain data is refused unless
    ``trust`` (:func:`open_checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no model at {path}: give an export folder (with ric.json) or a .ckpt file")
    if path.is_dir():
        return _export_info(path)
    return _checkpoint_info(path, trust)


def _export_info(folder: Path) -> ModelInfo:
    meta_path = folder / "ric.json"
    if not meta_path.is_file():
        hint = " (a Lightning checkpoint is a .ckpt file inside it)" if any(folder.rglob("*.ckpt")) else ""
        raise ModelFileError(f"{folder} is not a ric model folder: it has no ric.json{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path} must hold a JSON object")
    schema = meta.get("schema_version", 1)
    if schema not in KNOWN_SCHEMAS:
        raise ModelFileError(f"{meta_path} has schema_version {schema!r}; this ric reads {list(KNOWN_SCHEMAS)}")
    policy = meta.get("policy") or {}
    class_path = policy.get("class_path") or _guess_policy(folder)
    return ModelInfo(folder, "export", meta, class_path, dict(policy.get("init_args") or {}))


def _guess_policy(folder: Path) -> str:
    """Schema-1 exports did not record their class: a diffusers pipeline folder is a diffusion policy."""
    if (folder / "model_index.json").is_file():
        return "ric.diffusion.policy.DiffusionPolicy"
    return "ric.text.policy.TextPolicy"


def _checkpoint_info(path: Path, trust: bool = False) -> ModelInfo:
    if path.stat().st_size == 0:
        raise ModelFileError(f"checkpoint {path} is empty")
    try:
        ckpt = open_checkpoint(path, trust)
    except UntrustedCheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = "truncated or corrupt" if zipfile.is_zipfile(path) or path.suffix == ".ckpt" else "not a checkpoint"
        raise ModelFileError(f"checkpoint {path} cannot be read ({reason}): {str(err).splitlines()[0]}") from None
    except Exception as err:  # unpickling arbitrary bytes raises anything
        raise ModelFileError(f"{path} is not a checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelFileError(f"{path} is not a Lightning checkpoint (no state_dict)")
    meta = ckpt.get("ric")
    if not isinstance(meta, dict):
        raise ModelFileError(f"checkpoint {path} lacks the ric metadata: it was not written by a ric policy")
    config_path = find_config(path)
    config = _read_config(config_path) if config_path else {}
    model = config.get("model") or {}
    policy = meta.get("policy") or {}
    class_path = policy.get("class_path") or model.get("class_path")
    if not class_path:
        raise ModelFileError(
            f"checkpoint {path} does not record its policy class and no config.yaml was found beside it"
        )
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    init_args = dict(policy.get("init_args") or hparams)
    saved = (meta.get("conditioning") or {}).get("reward_names")
    configured = (model.get("init_args") or {}).get("reward_names")
    if saved is not None and configured is not None and list(saved) != list(configured):
        raise ModelFileError(
            f"checkpoint {path} was trained on rewards {list(saved)}, but its config {config_path} names {configured}"
        )
    return ModelInfo(path, "checkpoint", meta, class_path, init_args, ckpt, config_path)


def check_checkpoint(
    path: str | Path, class_path: str | None, reward_names: list[str] | None, trust: bool = False
) -> None:
    """A checkpoint to resume or test from, checked before any model loads: readable (without unpickling
    code unless ``trust``), written by a ric policy of the configured class and for the configured rewards."""
    info = read_model_info(path, trust)
    if info.kind != "checkpoint":
        raise ModelFileError(f"ckpt_path {path} is a folder; give a .ckpt file")
    if class_path and info.class_path != class_path:
        raise ModelFileError(
            f"checkpoint {path} was written by a {info.class_path}, but model.class_path is {class_path}"
        )
    if reward_names is not None and info.reward_names and list(info.reward_names) != list(reward_names):
        raise ModelFileError(
            f"checkpoint {path} was trained on rewards {info.reward_names}, but the config names {list(reward_names)}"
        )


def find_config(checkpoint: Path, levels: int = 3) -> Path | None:
    """The ``config.yaml`` LightningCLI saved for the run: in the checkpoint's folder or up to ``levels``
    folders above it (``<log_dir>/checkpoints/last.ckpt`` beside ``<log_dir>/config.yaml``)."""
    folder = checkpoint.resolve().parent
    for _ in range(levels + 1):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
        folder = folder.parent
    return None


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ModelFileError(f"{path} is not valid YAML: {err}") from None
    return data if isinstance(data, dict) else {}


def policy_class(class_path: str) -> type[ConditionalPolicy]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ModelFileError(f"the recorded policy class {class_path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, ConditionalPolicy)):
        raise ModelFileError(f"the recorded policy class {class_path!r} is not a ConditionalPolicy")
    return cls


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust: bool = False,
) -> ConditionalPolicy:
    """The trained policy at ``path`` (an export folder, merged or adapter-only, or a ``.ckpt`` file), in eval
    mode with gradients off, on ``device`` (default CPU) in ``dtype`` (default as saved). A checkpoint that
    holds more than tensors and plain data is refused unless ``trust`` (it could run code when opened)."""
    return load_from_info(read_model_info(path, trust), device, dtype)


def load_from_info(
    info: ModelInfo, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> ConditionalPolicy:
    """:func:`load` for metadata already read by :func:`read_model_info`."""
    cls = policy_class(info.class_path)
    try:
        with quiet_loading():
            if info.kind == "export":
                policy = cls.from_export(info.path, info.meta)
            else:
                policy = _from_checkpoint(cls, info)
    except OSError as err:  # a base model or tokenizer that is not where the settings say
        base = info.init_args.get("model")
        raise ModelFileError(
            f"{info.path}: the {cls.__name__} cannot be rebuilt from its recorded settings (model {base!r}): "
            f"{str(err).splitlines()[0]}"
        ) from None
    if info.kind == "export" or policy.reward_space is None:
        space = info.reward_space
        if space is not None:
            policy.set_reward_space(space)
    if policy.reward_space is None and policy.conditioned:
        log.warning("%s holds no reward space: steer it with explicit desired rewards", info.path)
    policy.requires_grad_(False).eval()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    policy.to(device=torch.device(device) if device is not None else None, dtype=dtype)
    return policy


def _from_checkpoint(cls: type[ConditionalPolicy], info: ModelInfo) -> ConditionalPolicy:
    """Build the policy from its recorded settings and load the trained weights; the frozen base weights a
    checkpoint leaves out are expected missing, anything else missing or unexpected is an error."""
    init = dict(info.init_args)
    init.update({k: v for k, v in cls.inference_overrides.items() if k in init})
    policy = cls(**init)
    ckpt = info.checkpoint or {}
    policy.on_load_checkpoint(ckpt)
    result = policy.load_state_dict(ckpt["state_dict"], strict=False)
    trained = policy.trained_weight_names()
    missing = [k for k in result.missing_keys if k in trained]
    if result.unexpected_keys or missing:
        raise ModelFileError(
            f"checkpoint {info.path} does not fit a {cls.__name__} built from its settings: "
            f"unexpected weights {result.unexpected_keys[:5]}, missing trained weights {missing[:5]}"
        )
    return policy


class quiet_loading:
    """Known-harmless notices of the libraries while a trained model is rebuilt (transformers' note on how
    new embedding rows are initialized, its GGUF conversion bar); warnings stay visible."""

    def __enter__(self) -> quiet_loading:
        import functools

        import transformers
        from transformers import modeling_gguf_pytorch_utils as gguf

        self._verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        self._bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        self._gguf_tqdm = gguf.tqdm  # its GGUF conversion bar is a plain tqdm
        gguf.tqdm = functools.partial(gguf.tqdm, disable=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        import transformers
        from transformers import modeling_gguf_pytorch_utils as gguf

        transformers.logging.set_verbosity(self._verbosity)
        if self._bars:
            transformers.utils.logging.enable_progress_bar()
        gguf.tqdm = self._gguf_tqdm

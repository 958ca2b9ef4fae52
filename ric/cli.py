"""The ``ric`` command, one dispatcher for all of it: ``ric fit|validate|test --config ...`` (LightningCLI),
``ric baseline``, and the commands on a trained model of :mod:`ric.commands` (``export``, ``generate``,
``chat``, ``serve``, ``desired``, ``compare``). ``python -m ric.cli ...`` is the same command.

LightningCLI runs over any :class:`~ric.interfaces.ConditionalPolicy` (``model.class_path``) and the shared
:class:`~ric.data.RelabelDataModule`; ``ric fit --print_config`` shows every setting with its default. A
setting that is wrong is reported in one line naming it, before any weights load; ``--verbose`` (or
``RIC_VERBOSE=1``) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ric.data import RelabelDataModule
from ric.interfaces import ConditionalPolicy
from ric.progress import resumable_bars
from ric.strategies import check_packages, check_strategy, setting

#: subcommands that LightningCLI runs
LIGHTNING_COMMANDS = ("fit", "validate", "test")


class ConfigError(ValueError):
    """A setting that cannot work, found before any training: reported in one line."""


class RiCCLI(LightningCLI):
    """LightningCLI with the policy as a subclass choice and configs saved beside each run. Before any class
    is built, the settings that can be checked without a model are: the strategy against the model's
    quantization and the installed packages, the callbacks' settings against the rewards, the data's reward
    names against the model's, and the checkpoint to resume from."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        quiet_dependencies()
        super().__init__(
            ConditionalPolicy,
            RelabelDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            check_strategy(config.get("trainer.strategy"), config.get("model.init_args.quantization"))
            check_packages(config.get("trainer.strategy"))
            reward_names = config.get("model.init_args.reward_names")
            if reward_names is not None:
                reward_names = list(reward_names)
                check_data_rewards(config.get("data.rewards") or [], reward_names)
                for k, callback in enumerate(config.get("trainer.callbacks") or []):
                    class_path = str(setting(callback, "class_path"))
                    if class_path.startswith("ric."):
                        instance = build(callback, f"trainer.callbacks[{k}]")
                        if hasattr(instance, "check_rewards"):
                            where = f"trainer.callbacks[{k}] ({class_path.rpartition('.')[2]})"
                            _prefixed(instance.check_rewards, where, reward_names)
            for key in ("data.dataset", "data.test_dataset"):  # data sources only record settings: cheap to build
                if config.get(key) is not None:
                    build(config.get(key), key)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
            raise ConfigError(str(err)) from err

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyper-parameters here, before any other check: a broken or foreign
        # checkpoint is named first
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt = config.get("ckpt_path") if subcommand else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
            from ric.loading import check_checkpoint

            names = config.get("model.init_args.reward_names")
            try:
                trust = config.get("weights_only") is False  # Lightning's own flag for a checkpoint it may unpickle
                check_checkpoint(ckpt, config.get("model.class_path"), list(names) if names else None, trust)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"--ckpt_path: {err}") from err
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Lightning's TQDM bar, replaced by one that is right in an epoch resumed mid-way
        settings = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        bars = resumable_bars(settings.get("callbacks"), settings.get("enable_progress_bar") is not False)
        return super().instantiate_trainer(**{**kwargs, "callbacks": bars})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, ImportError, OSError, RuntimeError) as err:
            raise ConfigError(
                config_cause(err, self.config[self.subcommand] if self.subcommand else self.config)
            ) from err


#: logger -> what of its messages is a known-harmless notice our runs trigger (a substring)
QUIET_LOGS = {
    # Lightning's advertisements for its cloud services, printed at every fit
    "lightning.pytorch": "\U0001f4a1 Tip:",
    "lightning.pytorch.utilities.rank_zero": "\U0001f4a1 Tip:",
    # the tiny VAE keeps no modules in float32, and diffusers says so when it is moved to a dtype
    "diffusers.models.modeling_utils": "should be kept in float32: []",
}
#: warnings (message regexes) our runs trigger in dependencies by design
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6 asks torch 2.14 a deprecated pytree question per batch
    r"Your `IterableDataset` has `__len__` defined",  # the data module's epoch length, read with num_workers <= 1
    r"Found \d+ module\(s\) in eval mode at the start of training",  # frozen parts kept in eval mode on purpose
    r"`gradient_checkpointing_enable` is deprecated",  # peft's k-bit preparation calls transformers' old name
)


def quiet_dependencies() -> None:
    """Known-harmless notices our runs trigger in dependencies, silenced; real warnings stay visible."""
    import logging
    import warnings

    for name, notice in QUIET_LOGS.items():

        def not_the_notice(record: logging.LogRecord, notice: str = notice) -> bool:
            return notice not in record.getMessage()

        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(getattr(f, "__name__", "") == "not_the_notice" for f in getattr(target, "filters", [])):
                target.addFilter(not_the_notice)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def check_data_rewards(rewards: Sequence[Any], reward_names: Sequence[str]) -> None:
    """The data's reward models, by the names their settings give, against the policy's ``reward_names``."""
    names = [setting(setting(r, "init_args") or {}, "name") for r in rewards]
    if len(names) != len(reward_names) or (None not in names and list(names) != list(reward_names)):
        raise ValueError(
            f"model.init_args.reward_names {list(reward_names)} and the data's rewards {names} must list the same "
            "rewards in the same order"
        )


def build(component: Any, where: str) -> Any:
    """A configured class built from its ``class_path`` and ``init_args`` (its ``__init__`` checks them), with
    ``where`` (the setting's path) in any error."""
    class_path = setting(component, "class_path")
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: class {class_path!r} cannot be imported: {err}") from None
    init_args = setting(component, "init_args")
    kwargs = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
    return _prefixed(cls, f"{where} ({name})", **kwargs)


def _prefixed(fn: Any, where: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise type(err)(f"{where}: {err}") from None


def config_cause(err: BaseException, config: Any) -> str:
    """The cause of a failure to build a configured class, in one line with the setting's path: jsonargparse
    wraps it in a report of every type it tried (``Given value: Namespace(...)``)."""
    text = str(err)
    if "Given value" not in text:
        return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    block = text.split("Errors:", 1)[1].split("Given value type:", 1)[0] if "Errors:" in text else text
    causes = [
        line.strip()[2:] for line in block.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]  # fmt: skip
    cause = causes[0] if causes else text.splitlines()[0]
    match = re.search(r"class_path='([\w.]+)'", text)
    where = _find_class(config, match.group(1)) if match else None
    return f"{where}: {cause}" if where else cause


def _find_class(config: Any, class_path: str, prefix: str = "") -> str | None:
    """The config key whose ``class_path`` is ``class_path`` (``model``, ``data.rewards[1]``, ...)."""
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    if isinstance(config, dict):
        if config.get("class_path") == class_path:
            return f"{prefix} ({class_path.rpartition('.')[2]})" if prefix else class_path
        for key, value in config.items():
            found = _find_class(value, class_path, f"{prefix}.{key}" if prefix else key)
            if found:
                return found
    if isinstance(config, list):
        for k, value in enumerate(config):
            found = _find_class(value, class_path, f"{prefix}[{k}]")
            if found:
                return found
    return None


def fit_validate_test(command: str, args: list[str], verbose: bool, from_command_line: bool) -> int:
    """``ric fit|validate|test``: LightningCLI over the policy and the relabeling DataModule."""
    if from_command_line:  # LightningCLI reads sys.argv itself (and warns when it is also given args)
        sys.argv = [sys.argv[0], command, *args]
    try:
        RiCCLI(args=None if from_command_line else [command, *args])
    except ConfigError as err:
        if verbose:
            raise
        print(f"ric {command}: error: {err}\n(add --verbose, or set RIC_VERBOSE=1, for the traceback)", file=sys.stderr)
        return 2
    except SIGTERMException:  # Lightning's stop at the next batch exits 0, as if the fit had finished: it did not
        print(f"ric {command}: stopped by SIGTERM before the run finished", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def baseline(command: str, args: list[str], verbose: bool, from_command_line: bool) -> int:
    """``ric baseline morlhf|soups --config FILE``: the RL baselines (TRL), an optional subpackage."""
    from ric.baselines.methods import main as run_baseline

    try:
        return run_baseline(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        if verbose:
            raise
        print(f"ric baseline: error: {err}", file=sys.stderr)
        return 2


#: commands whose arguments configure classes (jsonargparse): everything after the name goes to their parser
CONFIG_COMMANDS: dict[str, Callable[[str, list[str], bool, bool], int]] = {
    "fit": fit_validate_test,
    "validate": fit_validate_test,
    "test": fit_validate_test,
    "baseline": baseline,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ric`` command (and ``python -m ric.cli``): every subcommand, ``ric --help`` lists them."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("RIC_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    quiet_dependencies()
    if argv and argv[0] in CONFIG_COMMANDS:
        return CONFIG_COMMANDS[argv[0]](argv[0], argv[1:], verbose, from_command_line)
    from ric.commands import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())

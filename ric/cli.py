"""The ``ric`` command: ``ric fit|validate|test --config ...`` (LightningCLI), ``ric export``, ``ric generate``,
``ric chat``. ``python -m ric.cli ...`` is the same command.

LightningCLI runs over any :class:`~ric.interfaces.ConditionalPolicy` (``model.class_path``) and the shared
:class:`~ric.data.RelabelDataModule`; ``ric fit --print_config`` shows every setting with its default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from ric.data import RelabelDataModule
from ric.interfaces import ConditionalPolicy
from ric.strategies import check_strategy

#: subcommands that LightningCLI runs
LIGHTNING_COMMANDS = ("fit", "validate", "test")


class RiCCLI(LightningCLI):
    """LightningCLI with the policy as a subclass choice and configs saved beside each run; the strategy is
    checked against the model's settings before any weights load."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        check_strategy(config.get("trainer.strategy"), config.get("model.init_args.quantization"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ric`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        RiCCLI(args=argv)
        return 0
    from ric.commands import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())

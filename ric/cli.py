"""``python -m ric.cli fit|validate|test|predict --config configs/....yaml``

LightningCLI over any :class:`~ric.interfaces.ConditionalPolicy` (``model.class_path``) and the shared
:class:`~ric.data.RelabelDataModule`; ``--print_config`` shows every setting with its default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from ric.data import RelabelDataModule
from ric.interfaces import ConditionalPolicy
from ric.strategies import check_strategy


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


def main(args: Sequence[str] | None = None) -> RiCCLI:
    return RiCCLI(args=args)


if __name__ == "__main__":
    main()

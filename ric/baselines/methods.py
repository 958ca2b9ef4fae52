"""``ric baseline morlhf|soups``: train a baseline's RL policies, then sweep them like a RiC run.

Each runner takes the RiC run's policy settings (base model, LoRA, template, sampling) and its data module
(same split, rewards and reward space), trains its adapters with GRPO (finished ones are kept and not
retrained), and evaluates through :class:`~ric.evaluation.PreferenceSweep`, writing the same files as a RiC
sweep plus a ``cost`` entry in ``metrics.json``: training and generation seconds, generated samples, reward
calls and training tokens, summed over the method's RL runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ric.baselines.grpo import GRPOSettings, train_adapter
from ric.baselines.policy import AdapterPolicy, MORLHFPolicy, SoupPolicy
from ric.baselines.rewards import NormalizedReward
from ric.data import RelabelDataModule, prompt_key
from ric.evaluation import DEFAULT_LABEL, PreferenceSweep
from ric.space import check_preference


class Baseline:
    """What MORLHF and Rewarded Soups share: the data, the RL runs and the sweep.

    Args:
        policy: the RiC run's ``TextPolicy`` init arguments (model, LoRA settings, template, sampling);
            ``reward_names`` and ``conditioned`` are set here.
        data: the RiC run's data module: the same split, rewards and reward space (give its
            ``normalization: <run>/reward_space.json`` to use that run's statistics exactly).
        grpo: the RL run of each policy.
        sweep: the evaluation (default: the 5-point sweep); its ``output_dir`` defaults to
            ``<output_dir>/sweep`` and its label to the method's name.
        output_dir: where adapters, TRL checkpoints, the reward space and the sweep go (default
            ``runs/<method>``).
        max_train_prompts: RL prompts, taken from the training split in its order (``null``: all).
        at_step: sweep the adapters as they were at this GRPO step (a saved one: a multiple of
            ``grpo.save_steps``) instead of the finished ones, with the cost spent up to it, into
            ``<sweep folder>-step<N>``: a method's front against its training budget, from one run per policy.
    """

    label = "baseline"
    policy_class: type[AdapterPolicy] = AdapterPolicy

    def __init__(
        self,
        policy: dict[str, Any],
        data: RelabelDataModule,
        grpo: GRPOSettings | None = None,
        sweep: PreferenceSweep | None = None,
        output_dir: str | None = None,
        max_train_prompts: int | None = 256,
        at_step: int | None = None,
    ) -> None:
        if "model" not in policy:
            raise ValueError("policy needs at least 'model' (the RiC run's TextPolicy init arguments)")
        if max_train_prompts is not None and max_train_prompts < 1:
            raise ValueError(f"max_train_prompts must be >= 1 (or null for all), got {max_train_prompts}")
        self.grpo = grpo or GRPOSettings()
        if at_step is not None and not (1 <= at_step <= self.grpo.steps and at_step % self.grpo.save_steps == 0):
            raise ValueError(f"at_step {at_step} is not a saved GRPO step: a multiple of save_steps "
                             f"{self.grpo.save_steps} up to steps {self.grpo.steps}")  # fmt: skip
        self.at_step = at_step
        self.policy_args = {**policy, "reward_names": data.reward_names}
        self.policy_args.pop("conditioned", None)
        self.data = data
        self.sweep = sweep or PreferenceSweep(num_points=5)
        self.sweep.check_rewards(data.reward_names)
        self.output_dir = Path(output_dir or f"runs/{type(self).__name__.lower()}")
        self.max_train_prompts = max_train_prompts

    def training_preferences(self) -> list[np.ndarray]:
        raise NotImplementedError

    def build_policy(self, adapters: list[str], preferences: list[np.ndarray]) -> AdapterPolicy:
        raise NotImplementedError

    def run(self) -> Path:
        """Train what is not trained yet, sweep (the adapters at ``at_step`` where set), and return the
        sweep's ``front.csv``."""
        at_step = self.at_step
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.data.output_dir = self.data.output_dir or str(self.output_dir)
        base = self.build_policy([], [])
        self.data.prepare(base)
        space = base.reward_space
        rewards = [NormalizedReward(r, space) for r in self.data.rewards]
        prompts = list({prompt_key(r["prompt"]): r["prompt"] for r in self.data.train_records}.values())
        prompts = prompts[: self.max_train_prompts] if self.max_train_prompts else prompts
        prefs = self.training_preferences()
        costs, folders = [], []
        for k, w in enumerate(prefs):
            folder = self.output_dir / f"policy{k}"
            print(f"{self.label}: RL policy {k + 1} of {len(prefs)}, reward weights {w.tolist()}", flush=True)
            costs.append(train_adapter(base, f"rl{k}", rewards, w, prompts, self.grpo, folder))
            folders.append(str(folder / "adapter"))
            if at_step is not None:
                costs[-1], folders[-1] = checkpoint_cost(folder / "trl" / f"checkpoint-{at_step}", f"rl{k}", w)
        for path in folders:
            base.add_trained_adapter(path)
        if isinstance(base, MORLHFPolicy):
            base.trained_preferences = list(prefs)
        cost = {
            "method": self.label,
            "rl_runs": len(costs),
            "train_seconds": sum(c["train_seconds"] for c in costs),
            "generated_samples_training": sum(c["generated_samples"] for c in costs),
            "reward_calls_training": sum(c["reward_calls"] for c in costs),
            "training_tokens": sum(c["training_tokens"] for c in costs),
            "per_run": costs,
        }
        out = Path(self.sweep.output_dir or self.output_dir / "sweep")
        if at_step is not None:
            out, cost["at_step"] = out.with_name(f"{out.name}-step{at_step}"), at_step
        base.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return self.sweep.evaluate(
            base, self.data, out, training_cost=cost,
            label=self.label if self.sweep.label == DEFAULT_LABEL else self.sweep.label,
            preferences=self.sweep_preferences(),
        )  # fmt: skip

    def sweep_preferences(self) -> list[list[float]] | None:
        """The preferences the sweep evaluates (``None``: its own)."""
        return None


def checkpoint_cost(folder: Path, name: str, weights: np.ndarray) -> tuple[dict[str, Any], str]:
    """The cost of one RL run up to a TRL checkpoint (what its ledger wrote there) and the adapter saved in it."""
    import json

    from ric.baselines.grpo import CostLedger, run_cost

    adapter, ledger, state = folder / name, folder / CostLedger.FILE, folder / "trainer_state.json"
    if not (adapter / "adapter_config.json").is_file() or not ledger.is_file() or not state.is_file():
        raise FileNotFoundError(f"no finished checkpoint with adapter {name!r} and its cost in {folder}")
    spent, trainer_state = json.loads(ledger.read_text()), json.loads(state.read_text())
    batch = trainer_state.get("train_batch_size") or 0
    cost = run_cost(trainer_state["global_step"], batch, spent, trainer_state.get("log_history", []), weights)
    return cost, str(adapter)


class MORLHF(Baseline):
    """MORLHF: one GRPO policy per preference on ``sum_i w_i r_i`` (the sweep's preferences unless
    ``preferences`` is given); the sweep evaluates each preference with the policy trained for it."""

    label = "MORLHF"

    def __init__(
        self,
        policy: dict[str, Any],
        data: RelabelDataModule,
        preferences: list[list[float]] | None = None,
        **kwargs: Any,
    ) -> None:
        """``preferences``: one RL run for each (default: the sweep's); the rest as :class:`Baseline`."""
        super().__init__(policy, data, **kwargs)
        if preferences is not None:
            self.preferences = [check_preference(w, self.data.reward_names) for w in preferences]
        else:
            self.preferences = list(self.sweep.resolve_preferences(self.data.reward_names))

    def training_preferences(self) -> list[np.ndarray]:
        return self.preferences

    def sweep_preferences(self) -> list[list[float]]:
        return [w.tolist() for w in self.preferences]  # each evaluated with the policy trained for it

    def build_policy(self, adapters: list[str], preferences: list[np.ndarray]) -> AdapterPolicy:
        return MORLHFPolicy(adapters, preferences, **self.policy_args)


class RewardedSoups(Baseline):
    """Rewarded Soups: one GRPO policy per reward (weights ``e_i``), interpolated per preference."""

    label = "Rewarded Soups"

    def training_preferences(self) -> list[np.ndarray]:
        return list(np.eye(len(self.data.reward_names)))

    def build_policy(self, adapters: list[str], preferences: list[np.ndarray]) -> AdapterPolicy:
        return SoupPolicy(adapters, **self.policy_args)


METHODS: dict[str, type[Baseline]] = {"morlhf": MORLHF, "soups": RewardedSoups}


def from_args(argv: list[str]) -> Baseline:
    """The baseline ``ric baseline morlhf|soups --config FILE [--key value ...]`` describes (nothing loaded)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    if not argv or argv[0] not in METHODS:
        raise ValueError(f"name a baseline: ric baseline {{{'|'.join(METHODS)}}} --config FILE (got {argv[:1]}); "
                         f"ric baseline {next(iter(METHODS))} --help lists its settings")  # fmt: skip
    cls = METHODS[argv[0]]
    parser = ArgumentParser(prog=f"ric baseline {argv[0]}", description=cls.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(cls, as_positional=False, fail_untyped=False)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    init = instantiate(parser.parse_args(argv[1:]))
    return cls(**{k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")})


def main(argv: list[str]) -> int:
    """``ric baseline morlhf|soups --config FILE``: train and sweep; prints the sweep's front.csv."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ric baseline {{{'|'.join(METHODS)}}} --config FILE [--key value ...]\n")
        for name, cls in METHODS.items():
            print(f"  {name:<8} {cls.__doc__.splitlines()[0]}")
        print("\nric baseline NAME --help lists a baseline's settings.")
        return 0 if argv else 2
    print(from_args(argv).run(), flush=True)
    return 0

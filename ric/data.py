"""The relabeling DataModule shared by every modality.

dataset -> score every (prompt, response) with each reward (cached on disk) -> fit normalization on the
training split (saved as JSON) -> conditioned training examples through the policy's conditioning.
Modality specifics enter only through the :class:`ExampleSource` and the policy (``accepts``, ``collate``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from ric.interfaces import ConditionalPolicy, RewardModel
from ric.normalization import RewardNormalizer

log = logging.getLogger(__name__)


class ExampleSource(ABC):
    """A data set of ``{"prompt": ..., "response": ...}`` records (the response may be text, an image
    path, ...). Subclass it for a new data set; the DataModule does the rest."""

    @abstractmethod
    def load(self) -> list[dict[str, Any]]:
        """All records, in a deterministic order."""

    def identity(self) -> str:
        """Describes the data set for the score cache (class and settings)."""
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__module__}.{type(self).__qualname__}({settings})"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """JSON lines from a plain or gzipped file; a corrupt line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from None
    return rows


class JsonlExamples(ExampleSource):
    """Local JSONL (optionally .gz) with ``prompt`` and ``response`` fields."""

    def __init__(self, path: str, prompt_key: str = "prompt", response_key: str = "response", limit: int | None = None):
        self.path = str(path)
        self.prompt_key = prompt_key
        self.response_key = response_key
        self.limit = limit

    def load(self) -> list[dict[str, Any]]:
        rows = read_jsonl(self.path)
        out = []
        for i, row in enumerate(rows):
            if self.prompt_key not in row or self.response_key not in row:
                raise ValueError(f"{self.path}: record {i} lacks {self.prompt_key!r} or {self.response_key!r}: {row}")
            out.append({"prompt": row[self.prompt_key], "response": row[self.response_key]})
        return out[: self.limit] if self.limit else out


def _content_hash(records: Sequence[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        # a fingerprint (e.g. an image file's size and mtime) makes edited files re-score
        h.update(
            json.dumps([r["prompt"], r["response"], r.get("fingerprint")], default=str, ensure_ascii=False).encode()
        )
        h.update(b"\0")
    return h.hexdigest()


class ScoreCache:
    """Reward scores on disk, keyed by reward identity and data content: a second run does not re-score."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else None

    def path(self, reward: RewardModel, records: Sequence[dict[str, Any]]) -> Path | None:
        if self.folder is None:
            return None
        key = hashlib.sha256((reward.identity() + _content_hash(records)).encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in reward.name)
        return self.folder / f"{safe}-{key}.npy"

    def scores(
        self, rewards: Sequence[RewardModel], records: Sequence[dict[str, Any]], progress: bool = True
    ) -> np.ndarray:
        """``[len(records), len(rewards)]`` raw scores."""
        columns = []
        prompts = [r["prompt"] for r in records]
        samples = [r["response"] for r in records]
        for reward in rewards:
            path = self.path(reward, records)
            if path is not None and path.is_file():
                values = np.load(path)
                if values.shape == (len(records),) and np.all(np.isfinite(values)):
                    columns.append(values)
                    continue
                log.warning("ignoring a corrupt score cache entry %s", path)
            values = reward.score(prompts, samples, progress=progress).numpy().astype(np.float64)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                # a per-process temporary name: under DDP every rank may write the same entry at once
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, values)
                tmp.replace(path)
            columns.append(values)
        return np.stack(columns, axis=1) if columns else np.zeros((len(records), 0))


class ExamplePool(IterableDataset):
    """One shuffled pass over the DataModule's current training examples per epoch.

    When the online loop replaces the pool, the running pass ends early, so the next batches come from the
    new data without rebuilding the loader. Under DDP each rank takes an equal share of the pass."""

    def __init__(self, datamodule: RelabelDataModule) -> None:
        self.dm = datamodule

    def _share(self, n: int) -> tuple[int, int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        return rank, world, n // world

    def __len__(self) -> int:
        return self._share(len(self.dm.train_examples()))[2]

    def __iter__(self):
        version = self.dm.pool_version
        examples = self.dm.train_examples()
        epoch = self.dm.trainer.current_epoch if self.dm.trainer is not None else 0
        order = np.random.default_rng([self.dm.seed, epoch, version]).permutation(len(examples))
        rank, world, share = self._share(len(examples))
        for i in order[rank::world][:share]:
            if self.dm.pool_version != version:
                return
            yield examples[i]


class RelabelDataModule(L.LightningDataModule):
    """Scores a data set with the reward set, normalizes, and serves reward-conditioned examples.

    Args:
        dataset: the training data (``ExampleSource``).
        rewards: the reward models, in the order the policy's ``reward_names`` lists them.
        batch_size: training batch size.
        val_fraction, test_fraction: shares of the *prompts* held out for validation loss and for the
            preference-sweep evaluation (split by prompt, so no prompt leaks between splits).
        test_dataset: evaluate on these prompts instead of a held-out share.
        max_test_prompts: cap on evaluation prompts.
        cache_dir: where scores are cached (``null`` disables the cache).
        normalization: a saved statistics file to use instead of fitting on the training split.
        output_dir: where ``normalization.json`` is written (default: the trainer's log folder).
    """

    def __init__(
        self,
        dataset: ExampleSource,
        rewards: Sequence[RewardModel],
        batch_size: int = 8,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        test_dataset: ExampleSource | None = None,
        max_test_prompts: int | None = 64,
        cache_dir: str | None = ".ric_cache",
        normalization: str | None = None,
        output_dir: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("rewards is empty: RiC needs at least one reward model")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be distinct, got {names}")
        for frac_name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise ValueError(f"{frac_name} must be in [0, 1), got {frac}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")
        self.dataset = dataset
        self.test_dataset = test_dataset
        self.rewards = list(rewards)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_test_prompts = max_test_prompts
        self.cache = ScoreCache(cache_dir)
        self.normalization = normalization
        self.output_dir = output_dir
        self.seed = seed
        self.num_workers = num_workers
        self.progress = progress
        self.normalizer: RewardNormalizer | None = None
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.test_prompts: list[Any] = []
        self.train_scores = np.zeros((0, len(rewards)))
        self.val_scores = np.zeros((0, len(rewards)))
        self.pool_version = 0
        self._pool: list[dict[str, Any]] | None = None
        self._offline_examples: list[dict[str, Any]] | None = None
        self._ready = False

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def policy(self) -> ConditionalPolicy:
        if self.trainer is None or not isinstance(self.trainer.lightning_module, ConditionalPolicy):
            raise RuntimeError("RelabelDataModule needs a trainer running a ConditionalPolicy")
        return self.trainer.lightning_module

    def _output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        if self.trainer is not None and self.trainer.log_dir:
            return Path(self.trainer.log_dir)
        return Path(".")

    def split(self, records: list[dict[str, Any]]) -> tuple[list, list, list]:
        """Train / val records and test prompts, split by unique prompt with a fixed seed."""
        prompts = list(dict.fromkeys(json.dumps(r["prompt"], default=str) for r in records))
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(prompts))
        n_test = 0 if self.test_dataset is not None else int(round(self.test_fraction * len(prompts)))
        n_val = int(round(self.val_fraction * len(prompts)))
        test_keys = {prompts[i] for i in order[:n_test]}
        val_keys = {prompts[i] for i in order[n_test : n_test + n_val]}
        train, val, test = [], [], []
        for r in records:
            key = json.dumps(r["prompt"], default=str)
            (test if key in test_keys else val if key in val_keys else train).append(r)
        test_prompts = list(dict.fromkeys(json.dumps(r["prompt"], default=str) for r in test))
        return train, val, [json.loads(p) for p in test_prompts]

    def setup(self, stage: str) -> None:
        if self._ready:
            return
        policy = self.policy
        if list(policy.conditioning.reward_names) != self.reward_names:
            raise ValueError(
                f"the policy is conditioned on rewards {list(policy.conditioning.reward_names)}, but the data "
                f"module scores {self.reward_names}; list the same rewards in the same order"
            )
        records = self.dataset.load()
        if not records:
            raise ValueError(f"data set is empty: {self.dataset.identity()}")
        for i, r in enumerate(records):
            if "prompt" not in r or "response" not in r:
                raise ValueError(f"record {i} of {self.dataset.identity()} lacks 'prompt' or 'response': {r}")
        train, val, test_prompts = self.split(records)
        if self.test_dataset is not None:
            test_prompts = list(dict.fromkeys(r["prompt"] for r in self.test_dataset.load()))
        self.test_prompts = test_prompts[: self.max_test_prompts] if self.max_test_prompts else test_prompts
        n_before = len(train) + len(val)
        train = [r for r in train if policy.accepts(r["prompt"], r["response"])]
        val = [r for r in val if policy.accepts(r["prompt"], r["response"])]
        if len(train) + len(val) < n_before:
            log.info("dropped %d of %d examples the policy does not accept", n_before - len(train) - len(val), n_before)
        if not train:
            raise ValueError(f"no training examples left after splitting and filtering {self.dataset.identity()}")
        scores = self.cache.scores(self.rewards, train + val, progress=self.progress)
        self.train_records, self.val_records = train, val
        self.train_scores, self.val_scores = scores[: len(train)], scores[len(train) :]
        if self.normalization:
            self.normalizer = RewardNormalizer.load(self.normalization, expected_names=self.reward_names)
        else:
            self.normalizer = RewardNormalizer(self.reward_names).fit(
                self.train_scores, fitted_on={"dataset": self.dataset.identity(), "split": "train"}
            )
        if self.trainer is not None and self.trainer.is_global_zero:
            self.normalizer.save(self._output_dir() / "normalization.json")
        policy.set_normalizer(self.normalizer)
        self._ready = True

    def examples(self, records: Sequence[dict[str, Any]], scores: np.ndarray) -> list[dict[str, Any]]:
        """Conditioned training examples: each prompt carries the normalized rewards its response earned."""
        normalized = self.normalizer.transform(scores) if len(records) else scores
        return [
            {"prompt": self.policy.training_prompt(r["prompt"], z), "response": r["response"]}
            for r, z in zip(records, normalized)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"pool_version": self.pool_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the pool itself is rebuilt from the on-disk buffer by the online loop
        self.pool_version = int(state_dict.get("pool_version", 0))

    def set_train_pool(self, records: Sequence[dict[str, Any]], scores: np.ndarray, normalized: bool = False) -> None:
        """Replace the training examples (the online loop's buffer): each record is relabeled with the rewards
        it obtained; ``scores`` are raw unless ``normalized``."""
        z = np.asarray(scores, dtype=float) if normalized else self.normalizer.transform(scores)
        if len(records) != len(z):
            raise ValueError(f"{len(records)} records but {len(z)} score rows")
        if not records:
            raise ValueError("the new training pool is empty")
        self._pool = [
            {"prompt": self.policy.training_prompt(r["prompt"], v), "response": r["response"]}
            for r, v in zip(records, z)
        ]
        self.pool_version += 1

    def train_examples(self) -> list[dict[str, Any]]:
        """The current training examples: the online pool once there is one, else the relabeled data set."""
        if self._pool is not None:
            return self._pool
        if self._offline_examples is None:
            self._offline_examples = self.examples(self.train_records, self.train_scores)
        return self._offline_examples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            ExamplePool(self),
            batch_size=self.batch_size,
            collate_fn=self.policy.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_records:
            return []
        return DataLoader(
            self.examples(self.val_records, self.val_scores),
            batch_size=self.batch_size,
            collate_fn=self.policy.collate,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_prompts, batch_size=self.batch_size, collate_fn=list)

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
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from ric.distributed import rank_and_world
from ric.interfaces import ConditionalPolicy
from ric.mapping import RewardRange, check_mapping
from ric.rewards import RewardModel
from ric.space import RewardSpace

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


def read_jsonl(path: str | Path, torn_tail: bool = False) -> list[dict[str, Any]]:
    """JSON lines from a plain or gzipped file; a corrupt line is an error naming the file and line, except
    with ``torn_tail`` a corrupt last line (a process killed mid-write), which is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read as {'gzipped ' if path.suffix == '.gz' else ''}text: {err}") from None
    last = max((k for k, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail and k == last:
                log.warning("dropping a torn last line of %s", path)
                break
            raise ValueError(f"{path}:{k + 1} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{k + 1} holds {type(row).__name__} {str(row)[:60]!r}, not a JSON object")
        rows.append(row)
    return rows


def prompt_key(prompt: Any) -> str:
    """A prompt as a hashable string (prompts may be any JSON value): splits and online rounds deduplicate by it."""
    return json.dumps(prompt, default=str)


class JsonlExamples(ExampleSource):
    """Local JSONL (optionally .gz) with ``prompt`` and ``response`` fields."""

    def __init__(self, path: str, prompt_key: str = "prompt", response_key: str = "response", limit: int | None = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for all), got {limit}")
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
    new data without rebuilding the loader. Under DDP each rank takes an equal share of the pass. A run resumed
    in the middle of an epoch goes on where that epoch's pass stopped: the order is a pure function of the
    seed, the epoch and the pool, and the trainer's progress says how many batches of it were trained on."""

    def __init__(self, datamodule: RelabelDataModule) -> None:
        self.dm = datamodule
        self.running: int | None = None  # the pool of the pass in progress
        self.resumed_pass: int | None = None  # the pool of the pass a resumed checkpoint was in

    def _share(self, n: int) -> tuple[int, int, int]:
        rank, world = rank_and_world()
        return rank, world, n // world

    def __len__(self) -> int:
        return self._share(len(self.dm.train_examples()))[2]

    def __iter__(self):
        version = self.dm.pool_version
        resumed, self.resumed_pass = self.resumed_pass, None
        if resumed is not None and resumed != version:
            return  # the checkpoint's pass had ended with its pool's replacement, so this one ends too
        self.running = version
        examples = self.dm.train_examples()
        epoch = self.dm.trainer.current_epoch if self.dm.trainer is not None else 0
        order = np.random.default_rng([self.dm.shuffle_seed, epoch, version]).permutation(len(examples))
        rank, world, share = self._share(len(examples))
        done = self.dm.batches_done_this_epoch() * self.dm.batch_size
        for i in order[rank::world][done:share]:
            if self.dm.pool_version != version:
                return
            yield examples[i]


class PoolLoader(DataLoader):
    """The training loader: resumable in the middle of an epoch, as Lightning's ``state_dict`` interface
    declares. Its state names the pool of the pass a checkpoint was in; the position within the pass is the
    trainer's own progress, which :class:`ExamplePool` reads, so there is one count and not two."""

    def state_dict(self) -> dict[str, int]:
        pool = self.dataset
        return {"pool_version": pool.dm.pool_version if pool.running is None else pool.running}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.dataset.resumed_pass = int(state_dict["pool_version"])


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
        normalization: a saved ``reward_space.json`` (or older ``normalization.json``) whose statistics are
            used instead of fitting them on the training split.
        output_dir: where ``reward_space.json`` is written (default: the trainer's log folder).
        reward_range, range_quantiles, r_min, r_max: the reward range of the reward space, in normalized
            units: ``normal`` (the paper: the expected extremes of 50,000 standard-normal draws, +-4.23) or
            ``data`` (the ``range_quantiles`` of the normalized training scores); ``r_min`` / ``r_max``
            (scalars or per-reward lists) override either. Inference, the sweep and online targets use it.
        method, p, lam: the default preference-to-reward mapping of the reward space (see
            :mod:`ric.mapping`); the sweep and ``ric generate`` may override it per call.
        marker_dropout: the share of training examples shown without their rewards, so the model also
            learns the condition reward guidance contrasts with (0: the paper's training, every example
            conditioned); drawn per example from ``shuffle_seed`` and the pool (each online round draws afresh).
        marker_dropout_reference: what a dropped example's prompt carries instead: ``none`` (no markers) or
            ``neutral`` (every reward at the space's neutral point, 0).
        seed: the split into train, validation and held-out prompts.
        num_workers: loader processes for the validation examples (the training pool is served in the main
            process, where the online loop replaces it).
        shuffle_seed: the order of the training examples and the marker-dropout draws (default: ``seed``);
            runs that differ only in it train on the same split in another order.

    Conditioned examples whose training row would be cut (:meth:`ConditionalPolicy.fits`) are left out and
    counted per split in ``cut_examples`` (``train``: the current training set, offline or online; ``val``), kept
    in checkpoints: a cut response keeps the rewards of the whole one.
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
        reward_range: Literal["normal", "data"] = "normal",
        range_quantiles: tuple[float, float] = (0.0, 1.0),
        r_min: float | list[float] | None = None,
        r_max: float | list[float] | None = None,
        method: Literal["linear", "p_norm", "p_inf", "solver"] = "p_inf",
        p: float = 2.0,
        lam: list[float] | None = None,
        marker_dropout: float = 0.0,
        marker_dropout_reference: Literal["none", "neutral"] = "none",
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= marker_dropout < 1:
            raise ValueError(f"marker_dropout must be in [0, 1), got {marker_dropout}")
        if marker_dropout_reference not in ("none", "neutral"):
            raise ValueError(f"marker_dropout_reference must be 'none' or 'neutral', got {marker_dropout_reference!r}")
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_test_prompts is not None and max_test_prompts < 1:
            raise ValueError(f"max_test_prompts must be >= 1 (or null for all), got {max_test_prompts}")
        self.range = RewardRange(reward_range, tuple(range_quantiles), r_min, r_max)
        self.range.bounds(len(rewards))  # r_min / r_max of the wrong length or order fail here, not after scoring
        check_mapping(method, p, lam, len(rewards))
        self.method, self.p, self.lam = method, p, lam
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
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.cut_examples: dict[str, int] = {}
        self.marker_dropout = marker_dropout
        self.marker_dropout_reference = marker_dropout_reference
        self.num_workers = num_workers
        self.progress = progress
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.test_prompts: list[Any] = []
        self.test_records: list[dict[str, Any]] = []
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
    def space(self) -> RewardSpace:
        """The reward space, as the policy holds it (restored from a checkpoint where one was loaded)."""
        space = self.policy.reward_space
        if space is None:
            raise RuntimeError("the reward space is not built yet: the DataModule's setup has not run")
        return space

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
        prompts = list(dict.fromkeys(prompt_key(r["prompt"]) for r in records))
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(prompts))
        n_test = 0 if self.test_dataset is not None else int(round(self.test_fraction * len(prompts)))
        n_val = int(round(self.val_fraction * len(prompts)))
        test_keys = {prompts[i] for i in order[:n_test]}
        val_keys = {prompts[i] for i in order[n_test : n_test + n_val]}
        train, val, test = [], [], []
        for r in records:
            key = prompt_key(r["prompt"])
            (test if key in test_keys else val if key in val_keys else train).append(r)
        test_prompts = list(dict.fromkeys(prompt_key(r["prompt"]) for r in test))
        return train, val, [json.loads(p) for p in test_prompts]

    def setup(self, stage: str) -> None:
        self.prepare(self.policy)

    def prepare(self, policy: ConditionalPolicy) -> None:
        """Split, filter and score the data for ``policy`` and give it the reward space; what ``setup`` does
        under a trainer, callable without one (the RL baselines train outside Lightning)."""
        if self._ready:
            return
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
        held_out = records
        if self.test_dataset is not None:
            held_out = self.test_dataset.load()
            test_prompts = list(dict.fromkeys(r["prompt"] for r in held_out))
        self.test_prompts = test_prompts[: self.max_test_prompts] if self.max_test_prompts else test_prompts
        # the held-out responses (where the source has them): the sweep checks on them that each marker is read
        keep = {prompt_key(p) for p in self.test_prompts}
        self.test_records = [r for r in held_out if "response" in r and prompt_key(r["prompt"]) in keep]
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
        space = self.build_space()
        if self.trainer is None or self.trainer.is_global_zero:
            space.save(self._output_dir() / "reward_space.json")
        policy.set_reward_space(space)
        self._ready = True

    def build_space(self) -> RewardSpace:
        """The reward space of the training split (or of a saved one's statistics), with the configured
        range and mapping, and each reward model's configuration."""
        space = RewardSpace.fit(
            self.reward_names,
            self.train_scores,
            self.range,
            method=self.method,
            p=self.p,
            lam=self.lam,
            rewards=[r.config() for r in self.rewards],
            fitted_on={"dataset": self.dataset.identity(), "split": "train"},
        )
        if self.normalization:
            saved = RewardSpace.load(self.normalization, expected_names=self.reward_names)
            space = space.with_statistics(saved.mean, saved.std, {"file": str(self.normalization), **saved.fitted_on})
        return space

    def examples(
        self,
        records: Sequence[dict[str, Any]],
        scores: np.ndarray,
        normalized: bool = False,
        split: str = "train",
        version: int = 0,
    ) -> list[dict[str, Any]]:
        """Conditioned training examples: each prompt carries the normalized rewards its response earned
        (``scores`` are raw unless ``normalized``); those left out are counted as ``split``'s. ``version``, the
        pool's number (0: the data set), seeds the marker-dropout draws."""
        if len(records) != len(scores):
            raise ValueError(f"{len(records)} records but {len(scores)} score rows")
        z = np.asarray(scores, dtype=float) if normalized or not len(records) else self.space.normalize(scores)
        values: list[np.ndarray | None] = list(z)
        if self.marker_dropout > 0:  # (none drawn at 0: the paper's examples exactly)
            draw = np.random.default_rng([self.shuffle_seed, version]).random(len(records))
            dropped = draw < self.marker_dropout
            blank = None if self.marker_dropout_reference == "none" else np.zeros(z.shape[1])
            values = [blank if drop else v for v, drop in zip(values, dropped)]
            log.info("marker dropout: %d of %d examples shown without their rewards", int(dropped.sum()), len(records))
        examples = [
            {"prompt": self.policy.training_prompt(r["prompt"], v), "response": r["response"]}
            for r, v in zip(records, values)
        ]
        kept = [ex for ex in examples if self.policy.fits(ex["prompt"], ex["response"])]
        cut = self.cut_examples[split] = len(examples) - len(kept)
        if cut:
            log.info("left out %d of %d %s examples whose row would be cut", cut, len(examples), split)
        if not kept:
            raise ValueError(f"every one of {len(examples)} training examples is longer than a training row")
        return kept

    def state_dict(self) -> dict[str, Any]:
        return {"pool_version": self.pool_version, "cut_examples": dict(self.cut_examples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the pool itself is rebuilt from the on-disk buffer by the online loop
        self.pool_version = int(state_dict.get("pool_version", 0))

    def set_train_pool(
        self,
        records: Sequence[dict[str, Any]],
        scores: np.ndarray,
        normalized: bool = False,
        version: int | None = None,
    ) -> None:
        """Replace the training examples (the online loop's buffer): each record is relabeled with the rewards
        it obtained; ``scores`` are raw unless ``normalized``. ``version`` numbers the pool (default: the next
        number); it seeds the pool's order and marker dropout, so a resumed run that rebuilds the same pool under
        the same number draws them as the run it resumes did."""
        if not records:
            raise ValueError("the new training pool is empty")
        self.pool_version = self.pool_version + 1 if version is None else int(version)
        self._pool = self.examples(records, scores, normalized, version=self.pool_version)

    def batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch already trained on: zero when an epoch starts, and where the
        checkpoint stopped when a run resumes in the middle of one."""
        if self.trainer is None or not self.trainer.training:  # e.g. the loader read by hand after a fit
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def batches_left_in_pass(self, trainer: L.Trainer, batches_done: int) -> int:
        """Batches left in the running pass over the current pool, for the progress bar: Lightning counts the
        loader's length once, when the fit starts, and the online loop's pools differ in size from it. At least
        the batch in hand, which a round that has just replaced the pool still trains on."""
        share = len(ExamplePool(self))  # this rank's examples of the pass
        return max(-(-share // self.batch_size) - batches_done, 1)

    def train_examples(self) -> list[dict[str, Any]]:
        """The current training examples: the online pool once there is one, else the relabeled data set."""
        if self._pool is not None:
            return self._pool
        if self._offline_examples is None:
            self._offline_examples = self.examples(self.train_records, self.train_scores)
        return self._offline_examples

    def train_dataloader(self) -> DataLoader:
        # served in the main process: worker copies would not see the online loop replace the pool
        return PoolLoader(ExamplePool(self), batch_size=self.batch_size, collate_fn=self.policy.collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_records:
            return []
        return DataLoader(
            self.examples(self.val_records, self.val_scores, split="val"),
            batch_size=self.batch_size,
            collate_fn=self.policy.collate,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_prompts, batch_size=self.batch_size, collate_fn=list)

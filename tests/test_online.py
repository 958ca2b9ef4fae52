import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cli_config

from ric.cli import RiCCLI
from ric.compare import compare
from ric.mors import mors_keep_mask, mors_thresholds
from ric.online import read_rows


def _config(tmp_path, tiny_llama, data_path, *, offline_steps=2, online=None, checkpoint_every=1, sweep=False):
    online_args = {
        "iterations": 1,
        "steps_per_iteration": 2,
        "prompts_per_iteration": 16,
        "chunk_size": 4,
        "buffer_dir": str(tmp_path / "buffer"),
        "sampling": {"max_new_tokens": 8},
        **(online or {}),
    }
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": checkpoint_every}},
        {"class_path": "ric.online.OnlineLoop", "init_args": online_args},
        {"class_path": "ric.cost.TrainingCost"},  # the training's cost in every checkpoint
    ]  # fmt: skip
    if sweep:
        callbacks.append({"class_path": "ric.evaluation.PreferenceSweep", "init_args": {
            "num_points": 3, "after_fit": True, "output_dir": str(tmp_path / "sweep"),
            "sampling": {"max_new_tokens": 4}}})  # fmt: skip
    rewards = {"verbosity": "Verbosity", "readability": "Readability"}
    return tiny_cli_config(
        tmp_path, tiny_llama, data_path, rewards, callbacks, max_steps=offline_steps, limit_val_batches=0
    )


def _buffer(tmp_path):
    return [row for f in sorted((tmp_path / "buffer" / "round0").glob("rank*.jsonl")) for row in read_rows(f)]


def test_one_online_iteration(tmp_path, tiny_llama, text_data):
    cli = RiCCLI(args=["fit", "--config", str(_config(tmp_path, tiny_llama, text_data))])
    assert cli.trainer.global_step == 4  # 2 offline + 2 online
    rows = sorted(_buffer(tmp_path), key=lambda r: r["index"])  # the file holds them as they finished
    assert sorted(r["index"] for r in rows) == list(range(16))
    summary = json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())
    dm = cli.datamodule
    z = dm.space.normalize(np.array([r["raw"] for r in rows]))
    kept = mors_keep_mask(z, mors_thresholds(z, 0.7))
    assert summary["generated"] == 16 and summary["kept_by_mors"] == int(kept.sum())
    assert summary["buffer_online"] == int(kept.sum())
    # original data: MORS-filtered with its own thresholds, half the online buffer's size where enough pass
    z_orig = dm.space.normalize(dm.train_scores)
    passing = int(mors_keep_mask(z_orig, mors_thresholds(z_orig, 0.7)).sum())
    # (when the original data ties at its thresholds, none passes: it is then sampled unfiltered)
    available = passing if passing else len(z_orig)
    assert summary["buffer_original"] == min(round(0.5 * kept.sum()), available) > 0
    pool = dm.train_examples()
    assert len(pool) == summary["buffer_online"] + summary["buffer_original"] - summary["left_out_cut"]
    np.testing.assert_allclose(list(summary["thresholds"].values()), mors_thresholds(z, 0.7))
    # every prompt of the pool carries the rewards its sample obtained: the kept online samples first, in order
    conditioning = cli.model.conditioning
    parsed = np.array([conditioning.parse(ex["prompt"])[1] for ex in pool])
    np.testing.assert_allclose(parsed[: int(kept.sum())], conditioning.round(z[kept]))
    kept_rows = [r for r, k in zip(rows, kept) if k]
    assert [ex["response"] for ex in pool[: len(kept_rows)]] == [r["response"] for r in kept_rows]
    # the online learning rate is constant
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-5)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "OnlineLoop" in k)
    assert state["phase"] == 1 and state["summaries"][0]["kept_by_mors"] == summary["kept_by_mors"]


def crash_on_chunk(monkeypatch, policy_class, chunk):
    """Fault injection: the policy's ``store_samples`` raises when the online loop stores chunk ``chunk``
    (1-based), as a crash in the middle of a round would."""
    calls = []
    original = policy_class.store_samples

    def crashing(self, samples, folder, names):
        calls.append(len(samples))
        if len(calls) == chunk:
            raise RuntimeError("simulated crash")
        return original(self, samples, folder, names)

    monkeypatch.setattr(policy_class, "store_samples", crashing)


def test_killed_round_resumes_without_loss_or_duplicates(tmp_path, tiny_llama, text_data, monkeypatch):
    from ric.cost import LEDGER_KEY, TrainingCost
    from ric.text.policy import TextPolicy

    config = _config(tmp_path, tiny_llama, text_data)
    crash_on_chunk(monkeypatch, TextPolicy, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        RiCCLI(args=["fit", "--config", str(config)])
    monkeypatch.undo()
    first = _buffer(tmp_path)
    assert len(first) == 8  # two chunks of 4 were on disk before the crash
    assert all(r["seconds"] > 0 for r in first)  # each sample's share of its chunk's generation
    # a torn line from a kill mid-write is dropped, not fatal
    with (tmp_path / "buffer" / "round0" / "rank0.jsonl").open("a") as fh:
        fh.write('{"index": 99, "prompt": "tor')
    before = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)[LEDGER_KEY]["train_seconds"]
    added = []
    real = TrainingCost.add_seconds
    monkeypatch.setattr(TrainingCost, "add_seconds", lambda self, s: (added.append(s), real(self, s)))
    resumed = RiCCLI(args=["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    rows = _buffer(tmp_path)
    assert sorted(r["index"] for r in rows) == list(range(16))
    done = {r["index"] for r in first}
    assert [r for r in rows if r["index"] in done] == first  # finished samples were not regenerated
    assert resumed.trainer.global_step == 4
    # the killed process's generation time is counted: the checkpoint it resumed from never held it
    assert added == [pytest.approx(sum(r["seconds"] for r in first))]
    after = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)[LEDGER_KEY]["train_seconds"]
    assert after >= before + added[0]
    summary = json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())
    assert summary["seconds_generating_all_runs"] == pytest.approx(sum(r["seconds"] for r in rows))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
def test_ddp_two_processes_match_one(tmp_path, tiny_llama, text_data):
    """Greedy generation from the initial weights (no offline steps): the buffer and MORS thresholds of 2
    gloo processes equal those of 1."""
    results = {}
    for devices in (1, 2):
        folder = tmp_path / f"d{devices}"
        folder.mkdir()
        config = _config(
            folder,
            tiny_llama,
            text_data,
            offline_steps=0,
            online={"sampling": {"max_new_tokens": 8, "do_sample": False}},
        )
        cmd = [sys.executable, "-m", "ric.cli", "fit", "--config", str(config), "--trainer.devices", str(devices)]
        if devices == 2:
            cmd += ["--trainer.strategy", "ddp"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((folder / "buffer" / "round0" / "summary.json").read_text())
        if devices == 2:
            assert len(list((folder / "buffer" / "round0").glob("rank*.jsonl"))) == 2
    assert results[1]["generated"] == results[2]["generated"] == 16
    assert results[1]["kept_by_mors"] == results[2]["kept_by_mors"]
    assert results[1]["buffer_original"] == results[2]["buffer_original"]
    for name, value in results[1]["thresholds"].items():
        assert results[2]["thresholds"][name] == pytest.approx(value)


def test_ddp_trains_then_runs_an_online_round(tmp_path, tiny_llama, text_data):
    """Two gloo processes: offline steps, one online round, the online steps; one checkpoint at the end;
    then the sweep, each process generating half of the prompts, rank 0 writing all of them."""
    config = _config(tmp_path, tiny_llama, text_data, offline_steps=2, checkpoint_every=4, sweep=True)
    cmd = [sys.executable, "-m", "ric.cli", "fit", "--config", str(config), "--trainer.devices", "2",
           "--trainer.strategy", "ddp"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())
    assert summary["generated"] == 16 and summary["global_step"] == 2
    ranks = {f.name: len(read_rows(f)) for f in (tmp_path / "buffer" / "round0").glob("rank*.jsonl")}
    assert ranks == {"rank0.jsonl": 8, "rank1.jsonl": 8}
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    samples = [json.loads(line) for line in (tmp_path / "sweep" / "samples.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert metrics["num_prompts"] >= 2 and len(samples) == 3 * metrics["num_prompts"]
    assert all(s["response"] is not None and set(s["scores"]) == {"verbosity", "readability"} for s in samples)


def test_compare_three_runs(tmp_path):
    import csv

    def fake(name, shift):
        folder = tmp_path / name
        folder.mkdir()
        with (folder / "front.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                ["w_a", "w_b", "desired_a", "desired_b", "obtained_a", "obtained_a_sem", "obtained_b", "obtained_b_sem"]
            )
            for t in np.linspace(0, 1, 5):
                writer.writerow([t, 1 - t, 0, 0, t + shift, 0.1, 1 - t + shift, 0.1])
        return folder

    runs = [fake("base", 0.0), fake("sft", 0.2), fake("ric", 0.5)]
    (runs[2] / "metrics.json").write_text(json.dumps({"cost": {
        "train_seconds": 30.0, "sweep_seconds": 5.0, "generated_samples_sweep": 10, "reward_calls_sweep": 20,
        "training_tokens": 900}}))  # fmt: skip
    (runs[1] / "metrics.json").write_text(json.dumps({"cost": {
        "train_seconds": 50.0, "generated_samples_training": 64, "generated_samples_sweep": 10}}))  # fmt: skip
    summary = compare(runs, ["base", "SFT", "RiC"], tmp_path / "out")
    hv = {r["run"]: r["hypervolume"] for r in summary["runs"]}
    assert hv["base"] < hv["SFT"] < hv["RiC"]
    by_run = {r["run"]: r for r in summary["runs"]}
    assert by_run["base"]["train_seconds"] is None  # nothing recorded: blank, not zero
    assert by_run["RiC"]["train_seconds"] == 30.0 and by_run["RiC"]["reward_calls"] == 20
    assert by_run["SFT"]["generated_samples"] == 74 and by_run["SFT"]["training_tokens"] is None
    table = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert table[0].split(",")[3:] == ["train_seconds", "generation_seconds", "generated_samples", "reward_calls",
                                        "training_tokens"]  # fmt: skip
    assert (tmp_path / "out" / "front.png").stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["reference_point"] == summary["reference_point"]
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        compare(runs, ["a", "b"], tmp_path / "x")


def test_online_config_errors():
    from ric.online import OnlineLoop

    with pytest.raises(ValueError, match="target_variant"):
        OnlineLoop(target_variant="best")
    with pytest.raises(ValueError, match="reward_range moved"):
        OnlineLoop(reward_range="wide")
    with pytest.raises(ValueError, match=r"original_ratio must be >= 0.*-0.5"):
        OnlineLoop(original_ratio=-0.5)
    with pytest.raises(ValueError, match=r"prompts_per_iteration must be an integer >= 1, got 0"):
        OnlineLoop(prompts_per_iteration=0)


def test_contiguous_shares_cover_every_prompt_once():
    from ric.distributed import contiguous_share

    shares = [contiguous_share(7, rank, 3) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6]]
    assert contiguous_share(1, 1, 2) == []  # a rank without prompts (the rollout fills its calls in lockstep)
    # contiguous blocks: the copies of a repeated prompt (samples_per_prompt) mostly share one rank's call
    prompts = [p for p in "abc" for _ in range(2)]
    ranks_of = {p: {r for r in range(2) for i in contiguous_share(6, r, 2) if prompts[i] == p} for p in "abc"}
    assert sum(len(r) for r in ranks_of.values()) <= 4 and ranks_of["a"] == {0} and ranks_of["c"] == {1}


@pytest.mark.parametrize("n, world", [(7, 3), (2, 3), (6, 2), (1, 1)])
def test_sweep_shares_reassemble_in_prompt_order(n, world):
    from ric.distributed import contiguous_share
    from ric.sweep import assemble

    parts = []
    for rank in range(world):
        idx = contiguous_share(n, rank, world)
        samples = [f"sample of {i}" for i in idx]
        parts.append((idx, samples, np.array([[i, -i] for i in idx], dtype=float).reshape(-1, 2)))
    samples, raw = assemble(parts[::-1], n, 2)  # arrival order does not matter
    assert samples == [f"sample of {i}" for i in range(n)]
    np.testing.assert_array_equal(raw, [[i, -i] for i in range(n)])
    with pytest.raises(RuntimeError, match="lost samples"):
        assemble(parts[1:], n, 2) if world > 1 else assemble([], n, 2)


def test_sweep_after_fit_runs_before_teardown_moves_the_model(tmp_path, tiny_llama, text_data, monkeypatch):
    """Lightning's teardown moves the module to the CPU before ``on_fit_end``; a sweep there would generate
    on the CPU (or, with 8-bit weights, on half-moved ones)."""
    from ric.text.policy import TextPolicy

    events = []
    for name in ("cpu", "generate_stream"):
        original = getattr(TextPolicy, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TextPolicy, name, spy)
    callbacks = [
        {
            "class_path": "ric.evaluation.PreferenceSweep",
            "init_args": {
                "num_points": 2,
                "after_fit": True,
                "output_dir": str(tmp_path / "sweep"),
                "sampling": {"max_new_tokens": 3},
            },
        }
    ]
    config = tiny_cli_config(tmp_path, tiny_llama, text_data, {"verbosity": "Verbosity"}, callbacks, max_steps=1,
                             limit_val_batches=0)  # fmt: skip
    RiCCLI(args=["fit", "--config", str(config)])
    assert (tmp_path / "sweep" / "front.csv").is_file()
    assert events.count("generate_stream") >= 1 and "cpu" in events
    assert events.index("cpu") > max(i for i, e in enumerate(events) if e == "generate_stream")


LOCKSTEP_LAUNCHER = """
import json, os, sys
import ric.rollout, ric.text.policy
from ric.distributed import rank_and_world
from ric.text.policy import TextPolicy

# stand in for FSDP / ZeRO-3 (which Lightning runs on GPUs only): weights count as sharded across 2 ranks
sharded = lambda trainer: trainer is not None and rank_and_world()[1] > 1
ric.rollout.sharded_weights = ric.text.policy.sharded_weights = sharded
log = os.environ["RIC_LOCKSTEP_LOG"]
original = TextPolicy._generate_sorted


def spy(self, encoded, order, batch_size, device, settings, fixed_shapes=False):
    with open(f"{log}.rank{rank_and_world()[0]}", "a") as fh:
        fh.write(json.dumps([len(order), bool(settings.get("synced_gpus"))]) + "\\n")
    return original(self, encoded, order, batch_size, device, settings, fixed_shapes)


TextPolicy._generate_sorted = spy
from ric.cli import main
main(sys.argv[1:])
"""


def test_sharded_weights_generate_in_lockstep(tmp_path, tiny_llama, text_data):
    """With sharded weights every forward is collective: both ranks must make the same generate calls with
    the same prompt counts (15 online prompts: 8 and 7 per rank; the sweep's prompts likewise) and pass
    ``synced_gpus``, or the run would hang. gloo carries transformers' per-step all-reduce on the CPU."""
    online = {"prompts_per_iteration": 15, "chunk_size": 4}
    config = _config(tmp_path, tiny_llama, text_data, offline_steps=2, checkpoint_every=4, sweep=True, online=online)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LOCKSTEP_LAUNCHER)
    log = tmp_path / "calls"
    cmd = [sys.executable, str(launcher), "fit", "--config", str(config), "--trainer.devices", "2",
           "--trainer.strategy", "ddp"]  # fmt: skip
    env = {**os.environ, "RIC_LOCKSTEP_LOG": str(log), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [[json.loads(line) for line in Path(f"{log}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert calls[0] == calls[1] and all(synced for _, synced in calls[0])
    assert [n for n, _ in calls[0][:2]] == [4, 4]  # online chunks, rank 1's last one filled up
    assert len(calls[0]) == 2 + 3  # two online chunks, three sweep preferences
    assert json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())["generated"] == 15
    samples = (tmp_path / "sweep" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * json.loads((tmp_path / "sweep" / "metrics.json").read_text())["num_prompts"]


def test_online_round_merges_the_adapter_once(tmp_path, tiny_llama, text_data, monkeypatch):
    """16 prompts handed on in chunks of 4 are one stream of samples (the continuous batch stays full across
    the chunks) inside one generation session: one merge."""
    from ric.text.policy import TextPolicy

    merges, calls, chunks = [], [], []
    original_merge, original_generate = TextPolicy._mergeable_lora_layers, TextPolicy.generate_stream
    original_store = TextPolicy.store_samples

    def counting_merge(self):
        merges.append(1)
        return original_merge(self)

    def counting_generate(self, *args, **kwargs):
        calls.append(self._merged)  # generation runs on merged weights
        return original_generate(self, *args, **kwargs)

    def counting_store(self, samples, *args):
        chunks.append(len(samples))
        return original_store(self, samples, *args)

    monkeypatch.setattr(TextPolicy, "_mergeable_lora_layers", counting_merge)
    monkeypatch.setattr(TextPolicy, "generate_stream", counting_generate)
    monkeypatch.setattr(TextPolicy, "store_samples", counting_store)
    config = _config(tmp_path, tiny_llama, text_data, offline_steps=1, checkpoint_every=10)
    RiCCLI(args=["fit", "--config", str(config)])
    assert calls == [True] and chunks == [4] * 4 and len(merges) == 1


def test_each_rank_samples_from_its_own_stream_and_the_global_one_is_restored(monkeypatch):
    from ric import distributed, rollout
    from ric.rollout import random_stream

    torch.manual_seed(0)
    state = torch.get_rng_state()
    draws, seeded = [], []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(rollout, "rank_and_world", lambda rank=rank: (rank, 2))
        with random_stream(None):
            draws.append(torch.rand(4))
        with random_stream(7):
            seeded.append(torch.rand(4))
        assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(seeded[0], seeded[1])
    monkeypatch.undo()
    with random_stream(None):  # one process without a seed: its stream goes on as it is
        single = torch.rand(4)
    torch.set_rng_state(state)
    assert torch.equal(single, torch.rand(4))
    state = torch.get_rng_state()
    with random_stream(7):  # a seed gives the same draws every time, and leaves the global stream alone
        first = torch.rand(4)
    with random_stream(7):
        assert torch.equal(first, torch.rand(4))
    assert torch.equal(torch.get_rng_state(), state)


def test_sweep_runs_when_a_finished_fit_is_resumed(tmp_path, tiny_llama, text_data):
    """Resuming from the final checkpoint trains nothing (no on_train_end): the sweep still runs, once."""

    def config(out):
        callbacks = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
            {"class_path": "ric.evaluation.PreferenceSweep", "init_args": {
                "num_points": 2, "after_fit": True, "output_dir": str(out), "sampling": {"max_new_tokens": 3}}},
        ]  # fmt: skip
        folder = tmp_path / out.name
        folder.mkdir()
        return tiny_cli_config(folder, tiny_llama, text_data, {"verbosity": "Verbosity"}, callbacks, max_steps=1,
                               limit_val_batches=0)  # fmt: skip

    RiCCLI(args=["fit", "--config", str(config(tmp_path / "first"))])
    assert (tmp_path / "first" / "front.csv").is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    cli = RiCCLI(
        args=["fit", "--config", str(config(tmp_path / "again")), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    assert cli.trainer.global_step == 1  # nothing trained
    assert (tmp_path / "again" / "front.csv").is_file()
    first, again = (json.loads((tmp_path / name / "metrics.json").read_text())["cost"] for name in ("first", "again"))
    for key in ("training_steps", "training_tokens"):  # the cost is the first fit's, as its last checkpoint kept it
        assert again[key] == first[key] > 0, key
    assert 0 < again["train_seconds"] <= first["train_seconds"] and again["counted_from_step"] == 0


def record_batches(monkeypatch, crash_at: int | None = None, sigterm_at: int | None = None) -> list[tuple]:
    """The token rows of every training batch, in order; with ``crash_at``, that step (1-based) raises, as a
    kill in the middle of an epoch would; with ``sigterm_at``, the process sends itself SIGTERM in that step."""
    from ric.text.policy import TextPolicy

    seen: list[tuple] = []
    original = TextPolicy.training_step

    def recording(self, batch, batch_idx):
        if crash_at is not None and len(seen) + 1 == crash_at:
            raise RuntimeError("simulated kill")
        if sigterm_at is not None and len(seen) + 1 == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(tuple(map(tuple, batch["input_ids"].tolist())))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TextPolicy, "training_step", recording)
    return seen


@pytest.mark.parametrize(("stage", "crash"), [("offline", 5), ("online", 4), ("online", 5)])
def test_a_run_killed_mid_epoch_resumes_the_same_data_order(tmp_path, tiny_llama, text_data, monkeypatch, stage, crash):
    # offline: 7 steps inside the first epoch, killed at step 5. online: 2 offline steps, then a round whose pool
    # trains 4 steps; the round runs before step 3, which still trains on the offline pass, so a kill at step 4
    # resumes from the checkpoint of that last offline batch, and one at step 5 in the new pool's first pass
    # (64 prompts, so that the new pool's pass is longer than the 3 batches its epoch could wrongly skip)
    online = {"steps_per_iteration": 4, "prompts_per_iteration": 64, "chunk_size": 16}
    offline, online = (7, {"iterations": 0}) if stage == "offline" else (2, online)
    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    whole = record_batches(monkeypatch)
    RiCCLI(args=["fit", "--config", str(_config(tmp_path / "whole", tiny_llama, text_data, offline_steps=offline,
                                                 online=online))])  # fmt: skip
    monkeypatch.undo()
    config = _config(tmp_path / "parts", tiny_llama, text_data, offline_steps=offline, online=online)
    first = record_batches(monkeypatch, crash_at=crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        RiCCLI(args=["fit", "--config", str(config)])
    monkeypatch.undo()
    assert torch.load(tmp_path / "parts" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == crash - 1
    second = record_batches(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RiCCLI(args=["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "parts" / "ckpt" / "last.ckpt")])
    assert len(whole) == (7 if stage == "offline" else 6)
    # the resumed run trains on the batches the killed one had not reached, not on its epoch's first ones again
    assert first + second == whole
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]


def test_a_run_stopped_by_sigterm_mid_epoch_resumes_the_same_data_order(tmp_path, tiny_llama, text_data, monkeypatch):
    """The studies' stop: Lightning finishes the step under way, and their checkpoint saves where it stopped."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from benchmarks.experiment import checkpoints

    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()

    def config(folder):
        bar = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 1}}
        return tiny_cli_config(folder, tiny_llama, text_data, {"verbosity": "Verbosity"},
                               [checkpoints(folder, 10**6), bar], max_steps=7, limit_val_batches=0,
                               enable_progress_bar=True)  # fmt: skip

    whole = record_batches(monkeypatch)
    RiCCLI(args=["fit", "--config", str(config(tmp_path / "whole"))])
    monkeypatch.undo()
    first = record_batches(monkeypatch, sigterm_at=4)
    with pytest.raises(SIGTERMException):
        RiCCLI(args=["fit", "--config", str(config(tmp_path / "parts"))])
    monkeypatch.undo()
    last = tmp_path / "parts" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == len(first) == 4
    second = record_batches(monkeypatch)
    resumed = RiCCLI(args=["fit", "--config", str(config(tmp_path / "parts")), "--ckpt_path", str(last)])
    assert len(whole) == 7 and first + second == whole
    # the resumed epoch's bar knows its number, its length (the 7 steps) and where it started, as a fresh one does
    bar = resumed.trainer.progress_bar_callback.train_progress_bar
    assert (bar.desc, bar.initial, bar.n, bar.total) == ("Epoch 0: ", 4, 7, 7)


@pytest.mark.parametrize("case", ["rounds", "resumed at a round", "pools shorter than a round"])
def test_each_epochs_bar_ends_where_its_pass_ends(tmp_path, tiny_llama, text_data, monkeypatch, case):
    """Lightning counts the loader once, but each online pool has its own size, and a round ends the running pass
    early: each epoch's bar has its pass's length, also in a run resumed at a round (killed while generating),
    where the round runs before the bar's first batch."""
    from ric.progress import ResumableProgressBar
    from ric.text.policy import TextPolicy

    ended = []
    original = ResumableProgressBar.on_train_epoch_end

    def record(self, trainer, module):
        ended.append((self.train_progress_bar.n, self.train_progress_bar.total))
        original(self, trainer, module)

    monkeypatch.setattr(ResumableProgressBar, "on_train_epoch_end", record)
    online = {"iterations": 2, "steps_per_iteration": 4, "prompts_per_iteration": 64, "chunk_size": 16}
    if case == "pools shorter than a round":
        online = {"iterations": 1, "steps_per_iteration": 8, "prompts_per_iteration": 8, "chunk_size": 8}
    path = _config(tmp_path, tiny_llama, text_data, offline_steps=2, online=online)
    config = json.loads(path.read_text())
    config["trainer"]["enable_progress_bar"] = True
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"})
    path.write_text(json.dumps(config))
    args = ["fit", "--config", str(path)]
    if case == "resumed at a round":
        with monkeypatch.context() as patch:
            crash_on_chunk(patch, TextPolicy, 6)  # round 2's second chunk (round 1 has 4)
            with pytest.raises(RuntimeError, match="simulated crash"):
                RiCCLI(args=args)
        assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 6
        ended.clear()
        args += ["--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    cli = RiCCLI(args=args)
    assert cli.trainer.global_step == 10
    assert all(n == total for n, total in ended), ended
    # offline: steps 0-2 (round 1 at step 2 comes after that batch was drawn); round 1's pool: 3-6; round 2's: 7-9
    if case == "rounds":
        assert ended == [(3, 3), (4, 4), (3, 3)]
    elif case == "resumed at a round":
        assert ended == [(4, 4), (3, 3)]
    else:  # the pool of 8 samples' kept share is 1 or 2 batches of 4, so the round's 8 steps take several passes
        pool = len(cli.datamodule.train_examples())
        assert pool <= 8 and ended[1:-1] == [(-(-pool // 4),) * 2] * (len(ended) - 2) and len(ended) >= 4
        assert sum(n for n, _ in ended) == 10

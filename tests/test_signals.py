"""SIGTERM, as a cluster scheduler sends it before preemption, to a real run: it stops at the next chunk,
keeps what it generated, leaves a checkpoint, exits non-zero, and the resumed run regenerates nothing."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_cli_config

from ric.online import read_rows

ROOT = Path(__file__).resolve().parents[1]


def _launch(args):
    return subprocess.Popen([sys.executable, "-m", "ric.cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for(condition, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("condition not reached in time")


def _stop(proc, timeout=60):
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.monotonic() - start


def test_sigterm_in_an_online_round_keeps_the_samples_and_resumes(tmp_path, tiny_llama, text_data):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
        {"class_path": "ric.online.OnlineLoop",
         "init_args": {"iterations": 1, "steps_per_iteration": 2, "prompts_per_iteration": 96, "chunk_size": 4,
                       "buffer_dir": str(tmp_path / "buffer"), "sampling": {"max_new_tokens": 12}}},
    ]  # fmt: skip
    config = tiny_cli_config(tmp_path, tiny_llama, text_data, {"verbosity": "Verbosity"}, callbacks, max_steps=2,
                             limit_val_batches=0)  # fmt: skip
    buffer = tmp_path / "buffer" / "round0" / "rank0.jsonl"
    proc = _launch(["fit", "--config", config])
    _wait_for(lambda: buffer.is_file() and len(read_rows(buffer)) >= 8, proc)
    code, out, seconds = _stop(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert seconds < 30 and "stopped by SIGTERM during online round 1" in out
    first = read_rows(buffer)
    assert 8 <= len(first) < 96 and len(first) % 4 == 0  # whole chunks only
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # the offline steps, ready for the round
    proc = _launch(["fit", "--config", config, "--ckpt_path", "last"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = read_rows(buffer)
    assert sorted(r["index"] for r in rows) == list(range(96))
    assert rows[: len(first)] == first  # nothing generated before the stop was generated again
    summary = json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())
    assert summary["generated_this_run"] == 96 - len(first)


def test_sigterm_in_a_sweep_keeps_finished_preferences(tmp_path, trained):
    sweep = tmp_path / "sweep"
    config = json.loads((trained["root"] / "config.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "ric.evaluation.PreferenceSweep",
         "init_args": {"num_points": 11, "output_dir": str(sweep), "samples_per_prompt": 4,
                       "sampling": {"max_new_tokens": 24}}},
    ]  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proc = _launch(["test", "--config", path, "--ckpt_path", trained["ckpt"]])
    _wait_for(lambda: len(list((sweep / ".partial").glob("*.json"))) >= 1, proc)
    code, out, seconds = _stop(proc)
    assert code == 128 + signal.SIGTERM and seconds < 30, out[-3000:]
    done = len(list((sweep / ".partial").glob("*.json")))
    assert 1 <= done < 11 and not (sweep / "front.csv").exists()
    for kept in (sweep / ".partial").glob("*.json"):  # marks the stopped run's seconds: the cost keeps them
        kept.write_text(json.dumps({**json.loads(kept.read_text()), "seconds": 1000.0}))
    started = time.perf_counter()
    proc = _launch(["test", "--config", path, "--ckpt_path", trained["ckpt"]])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("was finished before, reusing it") == done
    seconds = json.loads((sweep / "metrics.json").read_text())["cost"]["sweep_seconds"]
    assert 1000.0 * done < seconds < 1000.0 * done + time.perf_counter() - started
    assert (sweep / "front.csv").is_file() and not (sweep / ".partial").exists()
    assert len((sweep / "samples.jsonl").read_text().splitlines()) == 11 * 4 * len(
        {json.loads(line)["prompt"] for line in (sweep / "samples.jsonl").read_text().splitlines()}
    )


def test_sigterm_in_a_plain_fit_leaves_a_checkpoint_to_resume(tmp_path, tiny_llama, text_data):
    """The studies' checkpoints (``benchmarks.experiment.checkpoints``) save where a SIGTERM stops training, so a
    long offline stage killed between its periodic checkpoints resumes from there rather than from scratch."""
    from benchmarks.experiment import checkpoints

    progress = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "progress"), "every_n_train_steps": 3, "save_top_k": -1},
    }
    tested = checkpoints(tmp_path / "run", 10**6)  # no periodic save before the stop: only the stop's own
    config = tiny_cli_config(tmp_path, tiny_llama, text_data, {"verbosity": "Verbosity"}, [progress, tested],
                             max_steps=10**6, limit_val_batches=0)  # fmt: skip
    proc = _launch(["fit", "--config", config])
    _wait_for(lambda: any((tmp_path / "progress").glob("*.ckpt")), proc)
    code, out, _ = _stop(proc)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]  # not a finished fit
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert step >= 3, out[-3000:]
    proc = _launch(["fit", "--config", config, "--ckpt_path", last, "--trainer.max_steps", step + 1])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == step + 1

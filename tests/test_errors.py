"""The error family: every raise on purpose derives from LayerFreezeError,
names the offending value and changes nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import layerfreeze as lf


def test_moved_errors_keep_their_import_paths() -> None:
    from layerfreeze.distributed import RankMismatchError
    from layerfreeze.rules import ScheduleTypeError

    assert RankMismatchError is lf.RankMismatchError and ScheduleTypeError is lf.ScheduleTypeError
    assert issubclass(lf.ScheduleTypeError, lf.ScheduleError) and issubclass(lf.ScheduleTypeError, TypeError)
    assert issubclass(lf.RankMismatchError, lf.LayerFreezeError)


@pytest.mark.parametrize(
    "call, kind, message",
    [
        (lambda net: lf.freeze(net, mode="frozen"), lf.ArgumentError, r"mode='frozen' is not one of"),
        (lambda net: lf.freeze([1, 2]), lf.ArgumentTypeError, "expected a torch.nn.Module"),
        (lambda net: lf.Freezer(net, guard=-1), lf.ArgumentError, "guard must be True, False or a positive"),
        (lambda net: lf.Freezer(net, schedule="fc1"), lf.ArgumentTypeError, "schedule must be a layerfreeze"),
        (lambda net: lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), unfreeze_lr=-1),
         lf.ArgumentError, "unfreeze_lr must be a finite non-negative number"),
        (lambda net: lf.Freezer(net).unfreeze("fc1", lr="fast"), lf.ArgumentError, "lr must be a finite non-negative"),
        (lambda net: lf.Freezer(net, None, lf.Schedule().adaptive_freeze(["fc1", "fc2"], check_every=2)),
         lf.ArgumentError, "adaptive_freeze rule needs the optimizer"),
        (lambda net: lf.Schedule().add("rule"), lf.ArgumentTypeError, "expected a layerfreeze Rule"),
        (lambda net: lf.Schedule().freeze("fc1", until_epoch=1).timeline(net, 0), lf.ArgumentError,
         "epochs must be a positive int"),
        (lambda net: lf.summary(net, depth=-1), lf.ArgumentError, "depth must be a non-negative int"),
        (lambda net: lf.apply_change(net, freeze=["fc1.weight"], unfreeze=["fc1.weight"]), lf.ArgumentError,
         "cannot freeze and unfreeze the same parameters"),
        (lambda net: lf.apply_change(net, freeze="fc1.weight"), lf.ArgumentTypeError,
         r"write freeze=\['fc1.weight'\]"),
    ],
)
def test_bad_arguments_raise_from_the_family_and_change_nothing(net, call, kind, message) -> None:
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(kind, match=message) as info:
        call(net)
    assert isinstance(info.value, lf.LayerFreezeError)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before


def test_no_control_flow_asserts_in_the_library() -> None:
    src = Path(lf.__file__).parent
    sources = [path for path in sorted(src.glob("*.py")) if path.name != "cache.py"]  # cache.py: rewritten elsewhere
    assert {"core.py", "freezer.py", "selectors.py"} <= {path.name for path in sources}  # the walk sees the library
    found = [
        f"{path.name}:{node.lineno}"
        for path in sources
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []

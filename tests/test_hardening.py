"""Failures found by trying to break the core: each fails on the code before its fix."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from tests.conftest import Net
from torch import nn

import layerfreeze as lf


def _step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    net(torch.randn(4, 10)).sum().backward()
    opt.step()


# --------------------------------------------------------------------------- lifetime


def test_a_dropped_freezer_is_collected_and_vetoes_nothing() -> None:
    torch.manual_seed(0)
    net = Net()
    lf.freeze(net, "fc1")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    fz = lf.Freezer(net, opt, on_missing="raise")
    dead = weakref.ref(fz)
    del fz
    gc.collect()
    assert dead() is None
    # a later, unrelated Freezer on the same model unfreezes freely
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1)
    fz2 = lf.Freezer(net, opt2)
    assert fz2.unfreeze("fc1") == ["fc1.weight", "fc1.bias"]
    assert net.fc1.weight.requires_grad
    _step(net, opt)  # the old optimizer has no hook of the dead Freezer left


def test_a_dropped_freezer_frees_its_optimizer_state() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    _step(net, opt)
    opt_ref = weakref.ref(opt)
    del fz, opt
    gc.collect()
    assert opt_ref() is None


def test_close_detaches_every_party() -> None:
    net = Net()
    opt = torch.optim.SGD([p for p in net.parameters() if p is not net.fc1.weight], lr=0.1)
    fz = lf.Freezer(net, opt, on_missing="raise")
    fz.close()
    lf.freeze(net, "fc1")
    lf.unfreeze(net, "fc1")  # the closed Freezer's sync would refuse this
    assert net.fc1.weight.requires_grad
    with torch.no_grad():
        net.fc5.bias.add_(1)
    _step(net, opt)  # no guard hook left


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_from_another_schedule_is_refused_and_nothing_changes() -> None:
    torch.manual_seed(0)
    a = Net()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    saved = lf.Freezer(a, opt, lf.Schedule().freeze("fc1", until_epoch=4))
    saved.set_epoch(0)
    state = saved.state_dict()
    saved.close()
    b = Net()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    fz = lf.Freezer(b, opt_b, lf.Schedule().gradual_unfreeze(["fc2", "fc3"], start_epoch=1))
    fz.set_epoch(0)
    before = {n: p.requires_grad for n, p in b.named_parameters()}
    groups = len(opt_b.param_groups)
    with pytest.raises(lf.StateDictError, match=r"another schedule: rule 0 there is \{\"freeze\": \"fc1\".*"
                       r"here it is \{\"gradual_unfreeze\".*Nothing was changed"):
        fz.load_state_dict(state)
    assert {n: p.requires_grad for n, p in b.named_parameters()} == before
    assert len(opt_b.param_groups) == groups and fz.epoch == 0


def test_a_checkpoint_without_signature_still_loads() -> None:
    net = Net()
    fz = lf.Freezer(net, None, lf.Schedule().freeze("fc1", until_epoch=2))
    fz.set_epoch(0)
    state = fz.state_dict()
    del state["schedule"]["signature"]  # as saved before signatures existed
    other = Net()
    fz2 = lf.Freezer(other, None, lf.Schedule().freeze("fc1", until_epoch=2))
    fz2.load_state_dict(state)
    assert not other.fc1.weight.requires_grad and fz2.epoch == 0


# --------------------------------------------------------------------------- bad input


def test_an_explicit_empty_list_selects_nothing() -> None:
    net = Net()
    assert lf.freeze(net, []) == []
    assert all(p.requires_grad for p in net.parameters())
    assert lf.select(net, []) == []
    lf.freeze(net)
    assert lf.unfreeze(net, []) == []
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(lf.SelectorError, match="nope"):
        lf.freeze(net, [], exclude="nope")  # the exclusion is still checked


def test_an_empty_freeze_window_is_refused() -> None:
    with pytest.raises(lf.ScheduleError, match=r"from_epoch=5 is not below until_epoch=2.*never freeze"):
        lf.Schedule().freeze("fc2", from_epoch=5, until_epoch=2)
    with pytest.raises(lf.ScheduleError, match="from_step=3 is not below until_step=3"):
        lf.Schedule.from_dict({"rules": [{"freeze": "fc2", "from_step": 3, "until_step": 3}]})


def test_numpy_integers_are_integers() -> None:
    net = Net()
    s = lf.Schedule().freeze("fc1", until_epoch=np.int64(2)).gradual_unfreeze(
        ["fc2", "fc3"], start_epoch=np.int32(1), every=np.int64(1)
    )
    fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), s, guard=np.int64(2))
    fz.set_epoch(np.int64(1))
    assert fz.epoch == 1 and type(fz.epoch) is int
    assert not net.fc1.weight.requires_grad and net.fc3.weight.requires_grad
    fz.set_step(np.int16(3))
    assert fz.step == 3
    assert s.to_dict()["rules"][0] == {"freeze": "fc1", "until_epoch": 2}
    with pytest.raises(lf.ArgumentTypeError, match=r"epoch must be an int.*1\.5"):
        fz.set_epoch(1.5)


def test_a_non_utf8_config_names_the_file(tmp_path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_bytes("rules:\n  - freeze: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(lf.ScheduleError, match=r"plan\.yaml: not UTF-8 text .*save the config as UTF-8"):
        lf.Schedule.from_file(path)


def test_apply_change_with_an_unknown_name_is_a_selector_error() -> None:
    net = Net()
    with pytest.raises(lf.SelectorError, match=r"freeze= names parameter\(s\) this model does not have: \['nope'\]"):
        lf.apply_change(net, freeze=["nope"])
    with pytest.raises(lf.SelectorError, match="closest names: 'fc1.weight'"):
        lf.apply_change(net, freeze=["fc1.wieght"])
    with pytest.raises(lf.SelectorError, match="hold= names module"):
        lf.apply_change(net, freeze=["fc1.weight"], hold={"fc9": "eval"})
    assert net.fc1.weight.requires_grad  # nothing changed


def test_the_visible_name_of_a_parametrized_weight_selects_its_originals() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    nn.utils.parametrizations.weight_norm(net[0])
    assert lf.select(net, "0.weight") == [
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
    ]
    lf.freeze(net, "0.weight")
    assert not net[0].parametrizations.weight.original1.requires_grad
    assert net[0].bias.requires_grad and net[2].weight.requires_grad


def test_the_visible_name_after_old_style_weight_norm() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(net[0])
    assert lf.select(net, "0.weight") == ["0.weight_g", "0.weight_v"]


def test_frozen_restores_gradients_even_when_the_block_unfreezes() -> None:
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(2, 10)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    with lf.frozen(net):
        lf.unfreeze(net)
    for n, p in net.named_parameters():
        assert p.requires_grad
        assert p.grad is not None and torch.equal(p.grad, grads[n]), n


# --------------------------------------------------------------------------- the error family


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
def test_bad_arguments_raise_from_the_family_and_change_nothing(call, kind, message) -> None:
    net = Net()
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(kind, match=message) as info:
        call(net)
    assert isinstance(info.value, lf.LayerFreezeError)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before


def test_no_control_flow_asserts_in_the_library() -> None:
    import ast
    from pathlib import Path

    src = Path(lf.__file__).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(src.glob("*.py"))
        if path.name != "cache.py"  # rewritten elsewhere
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


# --------------------------------------------------------------------------- guard through the Freezer


def test_the_guard_names_the_step_after_which_a_frozen_value_changed() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    _step(net, opt)
    _step(net, opt)
    with torch.no_grad():
        net.fc2.weight.copy_(net.fc2.weight.flip(0))  # a permutation, no value changed
    with pytest.raises(lf.FrozenParameterChanged, match=r"fc2\.weight\. First seen by the check after optimizer "
                       r"step 3\.") as info:
        _step(net, opt)
    assert info.value.step == 3 and info.value.names == ["fc2.weight"]


def test_a_recorded_change_vetoes_the_next_freeze_change(monkeypatch) -> None:
    """Where the verdict is read late (a GPU), a freeze change reads it first and changes nothing."""
    from layerfreeze import guard as guard_mod

    net = Net()
    fz = lf.Freezer(net)
    fz.freeze("fc2")
    real = guard_mod.Guard.verdict
    monkeypatch.setattr(guard_mod.Guard, "verdict", lambda self: None)
    with torch.no_grad():
        net.fc2.bias.add_(1)
    fz.guard.observe(step=7)  # recorded, not read
    monkeypatch.setattr(guard_mod.Guard, "verdict", real)
    with pytest.raises(lf.FrozenParameterChanged, match="fc2.bias. First seen by the check after optimizer step 7"):
        fz.freeze("fc3")
    assert net.fc3.weight.requires_grad  # the freeze did not happen


def test_a_dropped_freezer_leaves_no_hook_on_the_optimizer() -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    before = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    fz = lf.Freezer(net, opt, lf.Schedule().adaptive_freeze(["fc1", "fc2", "fc3"], check_every=2))
    assert len(opt._optimizer_step_post_hooks) > before[1]
    del fz
    gc.collect()
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == before

"""The lr contract: an lr asked for at unfreeze is the group's base lr."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import stack
from torch import nn
from torch.optim import lr_scheduler as sched

import layerfreeze as lf


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    nn.functional.mse_loss(net(x), torch.zeros(8, 1)).backward()
    opt.step()


def _group_of(opt: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def test_lr_asked_at_unfreeze_moves_held_parameters_keeping_state_and_options() -> None:
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.3)
    fz = lf.Freezer(net, opt)
    _step(net, opt)
    w = net.backbone[0].weight
    moment = opt.state[w]["exp_avg"]
    fz.freeze("backbone")
    fz.unfreeze("backbone", lr=1e-4)
    group = _group_of(opt, w)
    assert group["lr"] == 1e-4
    assert group["weight_decay"] == 0.3
    assert opt.state[w]["exp_avg"] is moment  # the optimizer state stayed
    assert _group_of(opt, net.head.weight)["lr"] == 1e-2
    before = w.detach().clone()
    _step(net, opt)
    assert not torch.equal(w, before)


def test_unfreeze_lr_moves_held_parameters_of_a_schedule() -> None:
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze("backbone", until_epoch=1), unfreeze_lr=1e-3)
    groups = len(opt.param_groups)  # made up front, so a checkpoint has them at every epoch
    fz.set_epoch(0)
    fz.set_epoch(1)
    assert len(opt.param_groups) == groups == 2
    assert _group_of(opt, net.backbone[0].weight)["lr"] == 1e-3
    assert _group_of(opt, net.head.weight)["lr"] == 1e-2


def test_one_cycle_backbone_peaks_at_the_lr_asked_for() -> None:
    net = Net()
    lf.freeze(net, "backbone")
    opt = torch.optim.AdamW(net.head.parameters(), lr=1e-2)
    s = sched.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze("backbone", until_step=2), unfreeze_lr=1e-3, lr_scheduler=s)
    peaks = [0.0, 0.0]
    for step in range(20):
        fz.set_step(step)
        _step(net, opt)
        s.step()
        head, backbone = opt.param_groups[0]["lr"], _group_of(opt, net.backbone[0].weight)["lr"]
        assert backbone == pytest.approx(head / 10, rel=1e-9)
        peaks = [max(peaks[0], head), max(peaks[1], backbone)]
    assert peaks[0] == pytest.approx(1e-2, rel=0.05)
    assert peaks[1] == pytest.approx(1e-3, rel=0.05)
    assert _group_of(opt, net.backbone[0].weight)["max_lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, "1e-3", True])
def test_bad_lrs_are_refused_and_nothing_changes(bad: object) -> None:
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with pytest.raises(lf.ArgumentError, match="unfreeze_lr must be a finite non-negative number"):
        lf.Freezer(net, opt, unfreeze_lr=bad)  # type: ignore[arg-type]
    fz = lf.Freezer(net, opt)
    fz.freeze("backbone")
    layout = [(len(g["params"]), g["lr"]) for g in opt.param_groups]
    with pytest.raises(lf.ArgumentError, match="lr must be a finite non-negative number"):
        fz.unfreeze("backbone", lr=bad)  # type: ignore[arg-type]
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert [(len(g["params"]), g["lr"]) for g in opt.param_groups] == layout


@pytest.mark.parametrize("kind", ["LambdaLR", "OneCycleLR", "StepLR"])
def test_a_scheduler_made_before_and_not_passed_is_named(kind: str) -> None:
    net = Net()
    lf.freeze(net, "backbone")
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    make = {
        "LambdaLR": lambda: sched.LambdaLR(opt, lambda e: 0.9**e),
        "OneCycleLR": lambda: sched.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        "StepLR": lambda: sched.StepLR(opt, step_size=1),
    }
    s = make[kind]()
    with pytest.raises(lf.ArgumentError, match=r"lr_scheduler=scheduler"):
        lf.Freezer(net, opt, lf.Schedule().freeze("backbone", until_epoch=1))
    assert len(opt.param_groups) == 1
    # a direct unfreeze that would add a group is refused, with nothing changed
    fz = lf.Freezer(net, opt)
    with pytest.raises(lf.ArgumentError, match=r"lr_scheduler=scheduler"):
        fz.unfreeze("backbone")
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert len(opt.param_groups) == 1
    # passed, it works
    fz = lf.Freezer(net, opt, lr_scheduler=s)
    fz.unfreeze("backbone")
    _step(net, opt)
    s.step()
    assert len(opt.param_groups) == 2


def test_load_state_dict_is_taken_as_the_frozen_reference() -> None:
    net, other = Net(), Net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("backbone")
    net.load_state_dict(other.state_dict())
    _step(net, opt)  # no FrozenParameterChanged
    fz.check()
    torch.testing.assert_close(net.backbone[0].weight, other.backbone[0].weight, rtol=0, atol=0)
    with torch.no_grad():
        net.backbone[0].weight.add_(1.0)  # a rogue edit is still caught
    with pytest.raises(lf.FrozenParameterChanged, match="backbone.0.weight"):
        _step(net, opt)


def test_a_closed_freezer_leaves_no_load_hook() -> None:
    net = Net()
    fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert len(net._load_state_dict_post_hooks) == 1
    fz.close()
    assert len(net._load_state_dict_post_hooks) == 0


# ---------------------------------------------------------------- the contract, every scheduler kind

LR, ASK, DECAY = 0.1, 0.03, 0.5

SCHEDULERS = {
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda e: 0.9**e),
    "StepLR": lambda opt: sched.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[2, 5, 7], gamma=0.3),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.8),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=10),
    # each group's base is its peak: max_lr per group is the group's lr
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=40),
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def _asked(model: nn.Sequential, ask: str) -> dict[int, float]:
    """The base lr each backbone parameter was asked for."""
    layers = list(model[0])
    if ask == "lr_decay":
        return {id(p): LR * DECAY**k for k, layer in enumerate(reversed(layers)) for p in layer.parameters()}
    return {id(p): ASK for p in model[0].parameters()}


@pytest.mark.parametrize("built_from", ["trainable", "all"])
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("ask", ["lr_decay", "unfreeze_lr", "unfreeze(lr=)"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_group_trains_at_its_base_times_the_head_factor(name: str, ask: str, order: str, built_from: str) -> None:
    model = stack()
    lf.freeze(model, "0")
    params = model[1].parameters() if built_from == "trainable" else model.parameters()
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    schedule = {
        "lr_decay": lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=DECAY),
        "unfreeze_lr": lf.Schedule().freeze("0", until_epoch=1),
        "unfreeze(lr=)": None,
    }[ask]
    kwargs = {"unfreeze_lr": ASK} if ask == "unfreeze_lr" else {}
    if order == "before":
        s = SCHEDULERS[name](opt)
        fz = lf.Freezer(model, opt, schedule, lr_scheduler=s, **kwargs)
    else:
        fz = lf.Freezer(model, opt, schedule, **kwargs)
        s = SCHEDULERS[name](opt)
        fz.add_lr_scheduler(s)  # a group no rule foresaw may still be added
    asked = _asked(model, ask)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    factors = []
    for epoch in range(5):
        fz.set_epoch(epoch)
        if ask == "unfreeze(lr=)" and epoch == 1:
            fz.unfreeze("0", lr=ASK)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            s.step(1.0) if isinstance(s, sched.ReduceLROnPlateau) else s.step()
            factor = opt.param_groups[0]["lr"] / LR  # what the scheduler applies to the original group
            factors.append(factor)
            for group in opt.param_groups:
                trained = [p for p in group["params"] if p.requires_grad and id(p) in asked]
                if not trained:
                    continue
                bases = {asked[id(p)] for p in trained}
                assert len(bases) == 1, "parameters asked for different lrs share a group"
                assert group["lr"] == pytest.approx(bases.pop() * factor, rel=1e-9)
    assert len({round(f, 12) for f in factors}) > 2  # the scheduler did change the lr
    assert all(p.requires_grad for p in model.parameters())


def test_a_group_moved_by_unfreeze_lr_is_moved_again_on_load() -> None:
    def make() -> tuple[Net, torch.optim.Optimizer, lf.Freezer]:
        net = Net()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.2)
        return net, opt, lf.Freezer(net, opt)

    net, opt, fz = make()
    fz.freeze("backbone")
    _step(net, opt)
    fz.unfreeze("backbone", lr=1e-4)
    _step(net, opt)
    saved = {"fz": fz.state_dict(), "opt": opt.state_dict()}
    net2, opt2, fz2 = make()
    fz2.load_state_dict(saved["fz"])  # before the optimizer, as documented
    opt2.load_state_dict(saved["opt"])  # the same groups: no "different number of parameter groups"
    layout = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in opt2.param_groups] == layout
    assert _group_of(opt2, net2.backbone[0].weight)["lr"] == 1e-4


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    ask=st.floats(1e-6, 1.0),
    gamma=st.floats(0.5, 1.0),
    before=st.integers(0, 4),
    after=st.integers(1, 4),
    built_from_all=st.booleans(),
)
def test_property_the_unfrozen_group_trains_at_its_ask_times_the_factor(
    ask: float, gamma: float, before: int, after: int, built_from_all: bool
) -> None:
    net = Net()
    lf.freeze(net, "backbone")
    opt = torch.optim.SGD(net.parameters() if built_from_all else net.head.parameters(), lr=0.1, momentum=0.5)
    s = sched.LambdaLR(opt, lambda e: gamma**e)
    fz = lf.Freezer(net, opt, lr_scheduler=s)
    for _ in range(before):
        _step(net, opt)
        s.step()
    fz.unfreeze("backbone", lr=ask)
    for _ in range(after):
        _step(net, opt)
        s.step()
        factor = opt.param_groups[0]["lr"] / 0.1
        assert _group_of(opt, net.backbone[0].weight)["lr"] == pytest.approx(ask * factor, rel=1e-9)
        assert _group_of(opt, net.head.weight)["lr"] == pytest.approx(0.1 * factor, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(bad=st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")), st.just(float("inf")),
                     st.just(float("-inf"))))
def test_property_a_bad_lr_changes_nothing(bad: float) -> None:
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("backbone")
    before = [(len(g["params"]), g["lr"]) for g in opt.param_groups]
    with pytest.raises(lf.ArgumentError, match="lr must be a finite non-negative number"):
        fz.unfreeze("backbone", lr=bad)
    assert [(len(g["params"]), g["lr"]) for g in opt.param_groups] == before
    assert not any(p.requires_grad for p in net.backbone.parameters())
